"""Loaded diffusion policies: checkpoints -> networks -> DenoisingProblem."""

from policy_accel.policies.base import ObservationError, Policy
from policy_accel.policies.diffusion_policy import DiffusionPolicyLowdim
from policy_accel.policies.diffusion_policy_image import DiffusionPolicyImage
from policy_accel.policies.errors import (
    CheckpointContentError,
    CheckpointError,
    CheckpointFormatError,
    LeRobotCheckpointError,
    UnsafeCheckpointError,
)
from policy_accel.policies.lerobot import LeRobotDiffusionPolicy
from policy_accel.policies.loading import convert, load_policy

__all__ = [
    "CheckpointContentError",
    "CheckpointError",
    "CheckpointFormatError",
    "DiffusionPolicyImage",
    "DiffusionPolicyLowdim",
    "LeRobotCheckpointError",
    "LeRobotDiffusionPolicy",
    "ObservationError",
    "Policy",
    "UnsafeCheckpointError",
    "convert",
    "load_policy",
]
