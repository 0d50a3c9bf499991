"""Executors: where and how a solver's batched denoiser calls run. Selecting one is
configuration: :func:`make_executor`."""

from __future__ import annotations

import torch

from policy_accel.execution.base import DenoiserOutputError, Executor
from policy_accel.execution.local import LocalExecutor
from policy_accel.execution.multi_device import DeviceExecutionError, MultiDeviceExecutor


def make_executor(
    device: str | None = None,
    devices: list[str] | None = None,
    distributed: bool = False,
    *,
    dtype: torch.dtype | str | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    num_threads: int | None = None,
) -> Executor:
    """``device="cuda:0"`` (one device), ``devices=["cuda:0", "cuda:1"]`` (a window split over
    several) or ``distributed=True`` (rank 0 of a torch.distributed group; the other ranks run
    :func:`policy_accel.execution.distributed.serve`)."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            dtype
        ]
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
    return LocalExecutor(
        device, dtype, num_threads=num_threads, compile=compile, cuda_graphs=cuda_graphs
    )


__all__ = [
    "DenoiserOutputError",
    "DeviceExecutionError",
    "Executor",
    "LocalExecutor",
    "MultiDeviceExecutor",
    "make_executor",
]
