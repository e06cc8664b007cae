"""Detectors, one file per method, built by name: ``models.build("laanet")``; all follow :mod:`models.base`."""
from models.base import (IMAGENET_MEAN, IMAGENET_STD, BatchNeeds, Detector, model_input, predict,
                         to_memory_format, uses_channels_last)
from models.registry import (CHECKPOINT_FORMAT, available, build, build_from_checkpoint, builder_arguments,
                             check_finite, checkpoint_entry, extract_state_dict, fit_weights, is_checkpoint,
                             load_model, load_weights, read_weight_file, register, trained_input_size, UnnamedModelError)

# Importing a method's module registers it.
from models import etd, fpg, laanet, lfm, npr, sbi_effnet  # noqa: E402,F401

__all__ = ["CHECKPOINT_FORMAT", "IMAGENET_MEAN", "IMAGENET_STD", "BatchNeeds", "Detector", "available", "build",
           "build_from_checkpoint", "builder_arguments", "check_finite", "checkpoint_entry", "extract_state_dict",
           "fit_weights", "is_checkpoint", "load_model", "load_weights", "model_input", "predict",
           "read_weight_file", "register", "to_memory_format", "trained_input_size", "UnnamedModelError",
           "uses_channels_last"]
