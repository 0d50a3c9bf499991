"""A compact DiffusionPolicy trainer for the low-dim UNet policy (the paper's recipe)."""

from policy_accel.training.trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
