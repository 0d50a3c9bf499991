"""Loaded diffusion policies: checkpoints -> networks -> DenoisingProblem."""

from policy_accel.policies.base import ObservationError, Policy

__all__ = ["ObservationError", "Policy"]
