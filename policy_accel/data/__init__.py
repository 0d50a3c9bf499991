"""Demonstration data: DiffusionPolicy's zarr ReplayBuffer layout and the training sequences."""

from policy_accel.data.replay_buffer import ReplayBuffer, ReplayBufferError
from policy_accel.data.sequence import SequenceDataset

__all__ = ["ReplayBuffer", "ReplayBufferError", "SequenceDataset"]
