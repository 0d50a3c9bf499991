"""One device: every window in a single batched call.

Options: run the model on another ``device`` or in another ``dtype`` than the solver's state
(inputs are moved and cast for the call, outputs come back on the solver's device and dtype, so
an fp16/bf16 model runs under an fp32 solver); ``compile`` the network with ``torch.compile``;
capture it in CUDA graphs (``cuda_graphs``). Captures and compilations belong to the network, not
to one replan's denoiser (:class:`~policy_accel.execution.graphs.NetworkRunner`): every later
replan of the policy copies its conditioning into the capture's static buffers and replays it.
With either option windows run in a few padded sizes (``bucket_ratio``: 2 for graphs, 4 for
compile; see :func:`~policy_accel.execution.graphs.bucket_size`), so a replan touches one or two
shapes. The
CPU thread count is a process setting made once at the entry points (the CLI, benchmarks);
:meth:`describe` records it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from policy_accel.execution.autodiff import jvp as locked_jvp
from policy_accel.execution.base import Denoiser, Executor, flatten_window, unflatten_output
from policy_accel.execution.graphs import GraphCache, NetworkRunner, bucket_size

DEFAULT_BUCKET_RATIO = 2
# a compiled shape costs a compilation (seconds to a minute), a captured one a capture: coarser
COMPILE_BUCKET_RATIO = 4


class LocalExecutor(Executor):
    """Evaluates every window in one batched call on one device."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        compile: bool = False,
        cuda_graphs: bool = False,
        bucket_ratio: int | None = None,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        if cuda_graphs and (self.device is None or self.device.type != "cuda"):
            raise ValueError(
                "cuda_graphs=True needs device='cuda[:i]': CUDA graphs replay on a GPU only."
            )
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        captured = compile or cuda_graphs
        if bucket_ratio is None:
            bucket_ratio = (
                DEFAULT_BUCKET_RATIO if cuda_graphs else COMPILE_BUCKET_RATIO if compile else 1
            )
        self.bucket_ratio = int(bucket_ratio)
        self.runner = (
            NetworkRunner("graphs" if cuda_graphs else "compile", compile=compile)
            if captured
            else None
        )
        self.graphs = GraphCache()  # whole loops and rounds a solver captures (cuda_graphs)

    @classmethod
    def emulating_graphs(cls, device: str = "cpu", **options) -> LocalExecutor:
        """An executor that takes the CUDA-graph path everywhere but replays a capture by
        running it again on its static buffers (:class:`GraphCache`'s ``emulate``): on a CPU
        it checks what a GPU replay would read, which the suite cannot capture."""
        executor = cls(device, **options)
        executor.cuda_graphs = True
        executor.bucket_ratio = options.get("bucket_ratio") or DEFAULT_BUCKET_RATIO
        executor.runner = NetworkRunner("graphs", emulate=True)
        executor.graphs = GraphCache(emulate=True)
        return executor

    def describe(self) -> dict:
        """Settings to record beside timings."""
        return {
            "executor": "local",
            "device": str(self.device) if self.device is not None else "tensors' own",
            "dtype": str(self.dtype) if self.dtype is not None else "solver's",
            "torch_threads": torch.get_num_threads(),
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "bucket_ratio": self.bucket_ratio,
        }

    @property
    def captures(self) -> int:
        """Graphs captured or network shapes compiled so far (tests read it)."""
        return (self.runner.captures if self.runner is not None else 0) + self.graphs.captures

    def window_size(self, positions: int, total: int) -> int:
        return bucket_size(positions, total, self.bucket_ratio)

    def captures_loops(self) -> bool:
        """Whether a solver may capture whole loops or rounds through :attr:`graphs`."""
        return self.cuda_graphs

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        flat_x, flat_t = flatten_window(x, t)
        flat_x, flat_t = self._to_model(flat_x), flat_t.to(self.device or flat_t.device)
        with torch.no_grad():
            if self.runner is not None:
                output = self.runner(denoiser, flat_x, flat_t)
            else:
                output = denoiser(flat_x, flat_t)
        return unflatten_output(self._to_solver(output, x), x)

    def jvp(
        self, denoiser: Denoiser, x: Tensor, t: Tensor, tangents: Tensor
    ) -> tuple[Tensor, Tensor]:
        directions = tangents.shape[0]
        flat_x, flat_t = flatten_window(x, t)
        rows = flat_x.shape[0]
        # Rows are independent samples, so one forward-mode pass over K stacked copies of the
        # window, copy k carrying tangent k, yields every directional derivative at once.
        stacked_x = self._to_model(flat_x.repeat(directions, *([1] * (flat_x.dim() - 1))))
        stacked_t = flat_t.repeat(directions).to(self.device or flat_t.device)
        stacked_tangent = self._to_model(tangents.reshape(directions * rows, *flat_x.shape[1:]))
        # Fused attention kernels have no forward-mode derivative; the math kernel does.
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            output, d_output = locked_jvp(
                lambda inputs: denoiser(inputs, stacked_t), (stacked_x,), (stacked_tangent,)
            )
        shape = (directions, *x.shape)
        output = unflatten_output(self._to_solver(output, x), stacked_x.unsqueeze(1))
        d_output = self._to_solver(d_output, x)
        return output.reshape(shape)[0], d_output.reshape(shape)

    # --- helpers ------------------------------------------------------------------------------

    def _to_model(self, tensor: Tensor) -> Tensor:
        return tensor.to(device=self.device or tensor.device, dtype=self.dtype or tensor.dtype)

    @staticmethod
    def _to_solver(output: Tensor, like: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            return output  # unflatten_output names the problem
        return output.to(device=like.device, dtype=like.dtype)
