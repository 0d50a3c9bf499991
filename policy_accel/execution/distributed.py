"""Windows split across processes and machines with ``torch.distributed``.

Launch every process with ``torchrun`` (or any ``init_process_group``): rank 0 runs the solver
with a :class:`DistributedExecutor`; every other rank calls :func:`serve` and answers shards until
rank 0 calls :meth:`DistributedExecutor.close`. Conditioning never travels implicitly: before
sampling a new problem, rank 0 calls :meth:`DistributedExecutor.bind` with a dict of tensors (the
observation, a prompt embedding, ...) and every rank turns it into its own denoiser with the same
``make_denoiser(payload)``. Only tensors cross the wire (no pickle): a fixed int64 header, then the
data.

When it pays: a round costs one network hop plus the largest shard's compute. For big models
(Stable Diffusion, DiT) a window of tens of positions is seconds of compute on one GPU, so
splitting it over machines wins. For small robot policies a round is a millisecond or less on one
GPU, below a network round trip: keep them on one machine (:class:`MultiDeviceExecutor`).
Use NCCL between GPUs and gloo between CPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from policy_accel.execution.base import Denoiser, Executor
from policy_accel.execution.local import LocalExecutor
from policy_accel.execution.multi_device import split_sizes

STOP, EVALUATE, JVP, BIND = 0, 1, 2, 3
HEADER = 16  # [op, positions, batch, directions, dtype, ndim, *shape]
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
]


def _header(
    op: int, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32, extra=(0, 0, 0)
):
    if len(shape) > HEADER - 6:
        raise ValueError(f"tensor rank {len(shape)} too large for the wire header.")
    values = [op, *extra, DTYPES.index(dtype), len(shape), *shape]
    return torch.tensor(values + [0] * (HEADER - len(values)), dtype=torch.int64)


def _send(tensor: Tensor, rank: int, group) -> None:
    dist.send(_header(-1, tuple(tensor.shape), tensor.dtype), rank, group=group)
    dist.send(tensor.contiguous(), rank, group=group)


def _recv(rank: int, group, device) -> Tensor:
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.recv(header, rank, group=group)
    dtype, ndim = DTYPES[int(header[4])], int(header[5])
    tensor = torch.empty([int(s) for s in header[6 : 6 + ndim]], dtype=dtype, device=device)
    dist.recv(tensor, rank, group=group)
    return tensor


class DistributedExecutor(Executor):
    """Rank 0's executor: splits each window over all ranks of ``group`` (itself included)."""

    def __init__(self, group=None, device: str | torch.device = "cpu", min_positions: int = 2):
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: launch with torchrun and call "
                "torch.distributed.init_process_group first."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank != 0:
            raise RuntimeError(
                f"DistributedExecutor runs on rank 0; rank {self.rank} must call serve()."
            )
        self.device = torch.device(device)
        self.local = LocalExecutor(self.device)
        self.min_positions = max(1, int(min_positions))

    def describe(self) -> dict:
        return {
            "executor": "distributed",
            "world_size": self.world,
            "backend": dist.get_backend(self.group),
        }

    def bind(
        self, payload: dict[str, Tensor], make_denoiser: Callable[[dict], Denoiser]
    ) -> Denoiser:
        """Send ``payload`` to every rank; each builds its denoiser with ``make_denoiser``. Returns
        rank 0's denoiser (use it in the problem)."""
        for rank in range(1, self.world):
            dist.send(_header(BIND, extra=(len(payload), 0, 0)), rank, group=self.group)
            for name, tensor in payload.items():
                _send(torch.tensor(list(name.encode()), dtype=torch.uint8), rank, self.group)
                _send(tensor.detach().cpu(), rank, self.group)
        return make_denoiser(payload)

    def close(self) -> None:
        """Release the serving ranks."""
        for rank in range(1, self.world):
            dist.send(_header(STOP), rank, group=self.group)

    def evaluate(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        return self._split(denoiser, x, t, None)[0]

    def jvp(
        self, denoiser: Denoiser, x: Tensor, t: Tensor, tangents: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self._split(denoiser, x, t, tangents)

    def _split(self, denoiser, x, t, tangents):
        positions = x.shape[0]
        ranks = self.world if positions >= self.min_positions else 1
        sizes = split_sizes(positions, [1.0] * ranks) + [0] * (self.world - ranks)
        starts = [sum(sizes[:i]) for i in range(self.world)]
        for rank in range(1, self.world):
            if not sizes[rank]:
                continue
            part = slice(starts[rank], starts[rank] + sizes[rank])
            op = EVALUATE if tangents is None else JVP
            dist.send(_header(op), rank, group=self.group)
            _send(x[part].cpu(), rank, self.group)
            _send(t[part].cpu(), rank, self.group)
            if tangents is not None:
                _send(tangents[:, part].cpu(), rank, self.group)
        mine = slice(0, sizes[0])
        if tangents is None:
            results = [(self.local.evaluate(denoiser, x[mine], t[mine]),)]
        else:
            results = [self.local.jvp(denoiser, x[mine], t[mine], tangents[:, mine])]
        for rank in range(1, self.world):
            if sizes[rank]:
                parts = 1 if tangents is None else 2
                results.append(tuple(_recv(rank, self.group, x.device) for _ in range(parts)))
        output = torch.cat([r[0] for r in results if r[0].shape[0]], dim=0)
        if tangents is None:
            return (output,)
        return output, torch.cat([r[1] for r in results if r[1].shape[1]], dim=1)


def serve(
    make_denoiser: Callable[[dict], Denoiser], group=None, device: str | torch.device = "cpu"
) -> None:
    """A worker rank's loop: build denoisers on ``bind``, answer shards, return on ``close``."""
    local = LocalExecutor(torch.device(device))
    denoiser = None
    while True:
        header = torch.empty(HEADER, dtype=torch.int64)
        dist.recv(header, 0, group=group)
        op = int(header[0])
        if op == STOP:
            return
        if op == BIND:
            payload = {}
            for _ in range(int(header[1])):
                name = bytes(_recv(0, group, "cpu").tolist()).decode()
                payload[name] = _recv(0, group, device)
            denoiser = make_denoiser(payload)
            continue
        if denoiser is None:
            raise RuntimeError("rank 0 sent a window before bind(); no denoiser to evaluate.")
        x, t = _recv(0, group, device), _recv(0, group, device)
        if op == EVALUATE:
            _send(local.evaluate(denoiser, x, t).cpu(), 0, group)
        else:
            output, d_output = local.jvp(denoiser, x, t, _recv(0, group, device))
            _send(output.cpu(), 0, group)
            _send(d_output.cpu(), 0, group)
