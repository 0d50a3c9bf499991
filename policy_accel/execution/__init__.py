"""Executors: where and how a solver's batched denoiser calls run."""

from policy_accel.execution.base import DenoiserOutputError, Executor
from policy_accel.execution.local import LocalExecutor

__all__ = ["DenoiserOutputError", "Executor", "LocalExecutor"]
