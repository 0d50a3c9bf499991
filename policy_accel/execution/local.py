"""One device: the denoiser runs where the solver's tensors live."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from policy_accel.execution.base import Denoiser, Executor, flatten_window, unflatten_output


class LocalExecutor(Executor):
    """Evaluates every window in a single batched call on the tensors' own device."""

    def evaluate(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        flat_x, flat_t = flatten_window(x, t)
        with torch.no_grad():
            output = denoiser(flat_x, flat_t)
        return unflatten_output(output, x)

    def jvp(
        self, denoiser: Denoiser, x: Tensor, t: Tensor, tangents: Tensor
    ) -> tuple[Tensor, Tensor]:
        directions = tangents.shape[0]
        flat_x, flat_t = flatten_window(x, t)
        rows = flat_x.shape[0]
        # Rows are independent samples, so one forward-mode pass over K stacked copies of the
        # window, copy k carrying tangent k, yields every directional derivative at once.
        stacked_x = flat_x.repeat(directions, *([1] * (flat_x.dim() - 1)))
        stacked_t = flat_t.repeat(directions)
        stacked_tangent = tangents.reshape(directions * rows, *flat_x.shape[1:]).to(flat_x.dtype)
        # Fused attention kernels have no forward-mode derivative; the math kernel does.
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            output, d_output = torch.func.jvp(
                lambda inputs: denoiser(inputs, stacked_t), (stacked_x,), (stacked_tangent,)
            )
        like = stacked_x.reshape(directions, *x.shape)
        output = unflatten_output(output, stacked_x.unsqueeze(1)).reshape(like.shape)
        d_output = d_output.reshape(like.shape)
        return output[0], d_output
