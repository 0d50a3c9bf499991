"""Windows split across several devices (ParaDiGMS offloads its windows the same way).

The denoiser is replicated once per device through its ``to(device)`` method (policy denoisers
have one; a plain function works only where every device is the inputs' own). A window
``[P, B, ...]`` is cut along the window axis in proportion to each device's weight (equal, or
measured with :meth:`MultiDeviceExecutor.calibrate`), every shard is launched before any result is
awaited (CUDA launches are asynchronous, so one Python thread keeps all devices busy; pass
``threads=True`` where a thread per device was measured to help, e.g. CPU devices), and the
outputs are gathered on the solver's device. Windows with fewer than ``min_positions`` positions
stay on the first device.
"""

from __future__ import annotations

import copy
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from policy_accel.execution.base import Denoiser, Executor
from policy_accel.execution.bound import ConditionedDenoiser
from policy_accel.execution.local import LocalExecutor


class DeviceExecutionError(RuntimeError):
    """A shard failed on one device; names the device."""


def split_sizes(total: int, weights: list[float]) -> list[int]:
    """``total`` positions cut in proportion to ``weights`` (largest remainders first)."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    sizes = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


class MultiDeviceExecutor(Executor):
    """One window, several devices."""

    def __init__(
        self,
        devices: list[str | torch.device],
        *,
        weights: list[float] | None = None,
        min_positions: int = 2,
        threads: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not devices:
            raise ValueError("devices must name at least one device, e.g. ['cuda:0', 'cuda:1'].")
        self.devices = [torch.device(d) for d in devices]
        if weights is not None and (len(weights) != len(devices) or min(weights) <= 0):
            raise ValueError(
                f"weights must hold one positive number per device ({len(devices)}). Got {weights}."
            )
        self.weights = list(weights) if weights is not None else [1.0] * len(devices)
        self.min_positions = max(1, int(min_positions))
        self.locals = [LocalExecutor(device, dtype) for device in self.devices]
        self._pool = ThreadPoolExecutor(len(devices)) if threads else None
        self._replicas: tuple[weakref.ref, list[Denoiser]] | None = None
        self._networks: tuple[weakref.ref, list] | None = None

    def describe(self) -> dict:
        return {
            "executor": "multi_device",
            "devices": [str(d) for d in self.devices],
            "weights": self.weights,
            "min_positions": self.min_positions,
            "threads": self._pool is not None,
            "torch_threads": torch.get_num_threads(),
        }

    def replicas(self, denoiser: Denoiser) -> list[Denoiser]:
        """The denoiser on every device. A :class:`ConditionedDenoiser`'s network is copied
        once per network and device, and kept across replans (only the small per-replan
        context moves); another denoiser is copied once per denoiser."""
        if isinstance(denoiser, ConditionedDenoiser):
            networks = self._network_replicas(denoiser.network)
            return [
                ConditionedDenoiser(
                    network, {k: v.to(device) for k, v in denoiser.context.items()}, denoiser.batch
                )
                for network, device in zip(networks, self.devices, strict=True)
            ]
        if self._replicas is not None and self._replicas[0]() is denoiser:
            return self._replicas[1]
        copies = [self._copy(denoiser, device) for device in self.devices]
        self._replicas = (weakref.ref(denoiser), copies)
        return copies

    def _network_replicas(self, network) -> list:
        entry = self._networks
        if entry is None or entry[0]() is not network:
            copies = [self._copy(network, device) for device in self.devices]
            entry = self._networks = (weakref.ref(network), copies)
        return entry[1]

    @staticmethod
    def _copy(model, device: torch.device):
        if isinstance(model, torch.nn.Module):
            return copy.deepcopy(model).to(device)
        if hasattr(model, "to"):
            return model.to(device)
        if device.type == "cpu":
            return model
        raise TypeError(
            f"the denoiser ({type(model).__name__}) has no to(device) method, so it cannot be "
            f"replicated onto {device}; give it one (policy denoisers have it)."
        )

    def calibrate(self, denoiser: Denoiser, x: Tensor, t: Tensor, repeats: int = 3) -> list[float]:
        """Measure each device's throughput on window ``x`` and use it as its weight."""
        replicas = self.replicas(denoiser)
        rates = []
        for local, replica in zip(self.locals, replicas, strict=True):
            local.evaluate(replica, x, t)  # warm-up
            _synchronize(local.device)
            start = time.perf_counter()
            for _ in range(repeats):
                local.evaluate(replica, x, t)
            _synchronize(local.device)
            rates.append(repeats / (time.perf_counter() - start))
        self.weights = rates
        return rates

    def evaluate(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        return self._split(denoiser, x, t, None)[0]

    def jvp(
        self, denoiser: Denoiser, x: Tensor, t: Tensor, tangents: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self._split(denoiser, x, t, tangents)

    def _split(self, denoiser, x: Tensor, t: Tensor, tangents: Tensor | None):
        replicas = self.replicas(denoiser)
        positions = x.shape[0]
        sizes = [positions] + [0] * (len(self.devices) - 1)
        if positions >= self.min_positions:
            sizes = split_sizes(positions, self.weights)
        jobs, start = [], 0
        for index, size in enumerate(sizes):
            if size:
                part = slice(start, start + size)
                shard_tangents = None if tangents is None else tangents[:, part]
                jobs.append((index, x[part], t[part], shard_tangents))
            start += size

        def run(job):
            index, shard_x, shard_t, shard_tangents = job
            local, replica = self.locals[index], replicas[index]
            try:
                if shard_tangents is None:
                    return (local.evaluate(replica, shard_x, shard_t),)
                return local.jvp(replica, shard_x, shard_t, shard_tangents)
            except Exception as error:
                raise DeviceExecutionError(
                    f"the denoiser failed on {self.devices[index]} (device {index} of "
                    f"{len(self.devices)}): {type(error).__name__}: {error}"
                ) from error

        # JVP shards take the process-wide forward-AD lock (execution.autodiff), so they run one
        # device after another; plain evaluations run on all devices at once
        results = list(self._pool.map(run, jobs)) if self._pool else [run(job) for job in jobs]
        output = torch.cat([r[0] for r in results], dim=0)
        if tangents is None:
            return (output,)
        return output, torch.cat([r[1] for r in results], dim=1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
