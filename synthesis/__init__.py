"""Online pseudo-fake synthesis on batches of tensors (any device): hull masks, colour transforms, SBI.

Pure tensor code: every random draw comes from a ``torch.Generator`` passed in, so one seed gives one batch.
``benchmarks.oracles.reference_sbi`` holds the per-sample numpy/OpenCV version used as a baseline and test oracle.
"""
from synthesis.masks import MASK_TYPES, hull_mask_numpy, hull_masks
from synthesis.sbi import SBIConfig, SelfBlender

__all__ = [
    "MASK_TYPES",
    "SBIConfig",
    "SelfBlender",
    "hull_mask_numpy",
    "hull_masks",
]
