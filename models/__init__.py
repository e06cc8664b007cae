"""Detectors, one file per method, built by name: ``models.build("laanet")``."""
from models.registry import (CHECKPOINT_FORMAT, available, build, build_from_checkpoint, builder_arguments,
                             check_finite, checkpoint_entry, extract_state_dict, fit_weights, load_weights,
                             read_weight_file, register)

# Importing a method's module registers it.
from models import etd, fpg, laanet, lfm, npr, sbi_effnet  # noqa: E402,F401

__all__ = ["CHECKPOINT_FORMAT", "available", "build", "build_from_checkpoint", "builder_arguments", "check_finite",
           "checkpoint_entry", "extract_state_dict", "fit_weights", "load_weights", "read_weight_file",
           "register"]
