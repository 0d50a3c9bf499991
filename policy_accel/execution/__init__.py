"""Executors: where and how a solver's batched denoiser calls run. Selecting one is
configuration: :func:`make_executor`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy_accel.execution.base import DenoiserOutputError, Executor
from policy_accel.execution.local import LocalExecutor
from policy_accel.execution.multi_device import DeviceExecutionError, MultiDeviceExecutor


@dataclass(frozen=True)
class ExecutorConfig:
    """Where a controller's denoiser calls run (see :func:`make_executor`): ``device`` (one
    device; None: the policy's), ``devices`` (a window split over several), ``distributed``,
    ``dtype`` (``float32``, ``float16``, ``bfloat16``), ``compile`` and ``cuda_graphs``."""

    device: str | None = None
    devices: tuple[str, ...] | None = None
    distributed: bool = False
    dtype: str | None = None
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None. Got {self.dtype!r}.")
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def is_default(self) -> bool:
        return self == ExecutorConfig()

    def build(self) -> Executor:
        return make_executor(
            self.device,
            list(self.devices) if self.devices else None,
            self.distributed,
            dtype=self.dtype,
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
        )


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_executor(
    device: str | None = None,
    devices: list[str] | None = None,
    distributed: bool = False,
    *,
    dtype: torch.dtype | str | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> Executor:
    """``device="cuda:0"`` (one device), ``devices=["cuda:0", "cuda:1"]`` (a window split over
    several) or ``distributed=True`` (rank 0 of a torch.distributed group; the other ranks run
    :func:`policy_accel.execution.distributed.serve`)."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    chosen = [
        name
        for name, on in (("device", device), ("devices", devices), ("distributed", distributed))
        if on
    ]
    if len(chosen) > 1:
        raise ValueError(f"choose one of device, devices and distributed. Got {chosen}.")
    if distributed:
        from policy_accel.execution.distributed import DistributedExecutor

        return DistributedExecutor(device=device or "cpu")
    if devices:
        if compile or cuda_graphs:
            raise ValueError("compile and cuda_graphs apply to a single device (device=...).")
        return MultiDeviceExecutor(devices, dtype=dtype)
    return LocalExecutor(device, dtype, compile=compile, cuda_graphs=cuda_graphs)


__all__ = [
    "DenoiserOutputError",
    "DeviceExecutionError",
    "Executor",
    "ExecutorConfig",
    "LocalExecutor",
    "MultiDeviceExecutor",
    "make_executor",
]
