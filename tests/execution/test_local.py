"""LocalExecutor: the flat denoiser layout and batched JVPs."""

from __future__ import annotations

import pytest
import torch

from policy_accel.execution import DenoiserOutputError, LocalExecutor


def denoiser(x, t):
    return (
        torch.tanh(x * (1 + t.reshape(-1, 1, 1) / 10)) + x.sum(dim=(1, 2), keepdim=True) ** 2 / 10
    )


def test_evaluate_flattens_position_major():
    x = torch.randn(3, 2, 4, 2)
    t = torch.tensor([5, 6, 7])
    seen = {}

    def recording(flat_x, flat_t):
        seen["t"] = flat_t.clone()
        return denoiser(flat_x, flat_t)

    out = LocalExecutor().evaluate(recording, x, t)
    assert torch.equal(seen["t"], torch.tensor([5, 5, 6, 6, 7, 7]))
    assert torch.allclose(out[1, 0], denoiser(x[1, 0:1], t[1:2])[0])


def test_jvp_matches_the_jacobian():
    x = torch.randn(3, 2, 4, 2, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    tangents = torch.randn(5, 3, 2, 4, 2, dtype=torch.float64)
    out, d_out = LocalExecutor().jvp(denoiser, x, t, tangents)
    assert torch.allclose(out, LocalExecutor().evaluate(denoiser, x, t))
    for k in range(5):
        for p in range(3):
            for b in range(2):
                jacobian = torch.autograd.functional.jacobian(
                    lambda v, p=p: denoiser(v.unsqueeze(0), t[p : p + 1])[0], x[p, b]
                )
                expected = (jacobian.reshape(8, 8) @ tangents[k, p, b].reshape(8)).reshape(4, 2)
                assert torch.allclose(d_out[k, p, b], expected)


def test_wrong_output_shape_is_named():
    with pytest.raises(DenoiserOutputError, match=r"returned shape \(6, 4\), expected \(6, 4, 2\)"):
        LocalExecutor().evaluate(
            lambda x, t: x[..., 0], torch.zeros(3, 2, 4, 2), torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(DenoiserOutputError, match="returned tuple"):
        LocalExecutor().evaluate(
            lambda x, t: (x,), torch.zeros(3, 2, 4, 2), torch.zeros(3, dtype=torch.long)
        )
