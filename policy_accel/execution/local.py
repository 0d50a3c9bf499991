"""One device: every window in a single batched call.

Options: run the model on another ``device`` or in another ``dtype`` than the solver's state
(inputs are moved and cast for the call, outputs come back on the solver's device and dtype, so
an fp16/bf16 model runs under an fp32 solver); ``compile`` the denoiser with ``torch.compile``;
capture each window shape in a CUDA graph (``cuda_graphs``: static input and output buffers
reused across rounds, one replay per round, no allocation or host synchronisation inside it).
The CPU thread count is a process setting made once at the entry points (the CLI, benchmarks);
:meth:`describe` records it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from policy_accel.execution.autodiff import jvp as locked_jvp
from policy_accel.execution.base import Denoiser, Executor, flatten_window, unflatten_output


class LocalExecutor(Executor):
    """Evaluates every window in one batched call on one device."""

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        if cuda_graphs and (self.device is None or self.device.type != "cuda"):
            raise ValueError(
                "cuda_graphs=True needs device='cuda[:i]': CUDA graphs replay on a GPU only."
            )
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self._compiled: dict[int, Denoiser] = {}
        self._graphs: dict[tuple, tuple] = {}

    def describe(self) -> dict:
        """Settings to record beside timings."""
        return {
            "executor": "local",
            "device": str(self.device) if self.device is not None else "tensors' own",
            "dtype": str(self.dtype) if self.dtype is not None else "solver's",
            "torch_threads": torch.get_num_threads(),
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
        }

    # --- evaluation ---------------------------------------------------------------------------

    def evaluate(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        flat_x, flat_t = flatten_window(x, t)
        flat_x, flat_t = self._to_model(flat_x), flat_t.to(self.device or flat_t.device)
        with torch.no_grad():
            if self.cuda_graphs:
                output = self._replay(denoiser, flat_x, flat_t)
            else:
                output = self._model(denoiser)(flat_x, flat_t)
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

    def _model(self, denoiser: Denoiser) -> Denoiser:
        if not self.compile:
            return denoiser
        key = id(denoiser)
        if key not in self._compiled:
            self._compiled = {key: torch.compile(denoiser, dynamic=False)}  # one live denoiser
        return self._compiled[key]

    def _replay(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        """Run through a CUDA graph captured for this denoiser and input shape."""
        key = (id(denoiser), tuple(x.shape), x.dtype, tuple(t.shape))
        if key not in self._graphs:
            if len(self._graphs) and next(iter(self._graphs))[0] != id(denoiser):
                self._graphs.clear()  # a new problem: drop the old denoiser's graphs
            static_x, static_t = x.clone(), t.clone()
            model = self._model(denoiser)
            stream = torch.cuda.Stream(device=x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm up allocator and autotuning outside the capture
                    model(static_x, static_t)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(static_x, static_t)
            self._graphs[key] = (graph, static_x, static_t, static_out)
        graph, static_x, static_t, static_out = self._graphs[key]
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        return static_out.clone()
