"""A network with its per-sample conditioning bound: the denoiser policies and adapters hand to
solvers, and the unit executors capture (its network is what stays the same across replans, its
context is what changes)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor


class ConditionedDenoiser:
    """``network(x, t, **context)`` with per-sample ``context`` tiled over the window positions
    of a flat batch (position major). ``to(device)`` gives a replica on another device, which
    multi-device executors use; :meth:`with_context` the same network with other conditioning
    (a captured runner's static buffers)."""

    def __init__(self, network: Any, context: dict[str, Tensor], batch: int) -> None:
        self.network, self.context, self.batch = network, context, batch

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.network(x, t.to(torch.int64), **self.tiled(x.shape[0]))

    def tiled(self, rows: int) -> dict[str, Tensor]:
        """The context repeated for ``rows`` flat rows (a multiple of the batch)."""
        if rows % self.batch:
            raise ValueError(
                f"the denoiser got {rows} rows, not a multiple of the batch size {self.batch}."
            )
        copies = rows // self.batch
        return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in self.context.items()}

    def with_context(self, context: dict[str, Tensor]) -> ConditionedDenoiser:
        return ConditionedDenoiser(self.network, context, self.batch)

    def to(self, device: str | torch.device) -> ConditionedDenoiser:
        network = copy.deepcopy(self.network).to(device)
        context = {k: v.to(device) for k, v in self.context.items()}
        return ConditionedDenoiser(network, context, self.batch)
