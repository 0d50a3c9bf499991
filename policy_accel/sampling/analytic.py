"""Denoisers with exact closed forms, for testing and benchmarking solvers.

Data ``x0 ~ sum_k w_k N(mu_k, std^2 I)`` noised as ``x_t = alpha_t x0 + sigma_t eps`` with
``alpha_t^2 = alphas_cumprod[t]``. The posterior mean ``E[x0 | x_t]`` has a closed form for any
noise schedule, so the denoiser is exact: component responsibilities are a softmax of
``-|x_t - alpha mu_k|^2 / (2 (alpha^2 std^2 + sigma^2))`` and each component's mean is
``mu_k + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mu_k)``. One component gives the
Gaussian case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policy_accel.sampling.rules import PREDICTION_TYPES


class GaussianMixtureDenoiser:
    """Exact denoiser of an isotropic Gaussian mixture, in the ``denoiser(x, t)`` convention."""

    def __init__(
        self,
        means: Tensor,
        std: float,
        alphas_cumprod: Tensor,
        weights: Tensor | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {list(PREDICTION_TYPES)}. Got {prediction_type!r}."
            )
        if std <= 0:
            raise ValueError(f"std must be > 0. Got {std}.")
        self.means = means
        self.std = float(std)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        count = means.shape[0]
        self.weights = (
            torch.full((count,), 1.0 / count) if weights is None else weights / weights.sum()
        )
        self.prediction_type = prediction_type

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def shifted(self, offset: Tensor | float) -> GaussianMixtureDenoiser:
        """The same mixture with every mean moved by ``offset`` (a nearby problem)."""
        return GaussianMixtureDenoiser(
            self.means + offset, self.std, self.alphas_cumprod, self.weights, self.prediction_type
        )

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod.to(x.device)[t.long()].to(x.dtype)
        alpha, sigma2 = abar.sqrt(), 1 - abar
        rows = x.shape[0]
        flat = x.reshape(rows, -1)
        means = self.means.reshape(self.means.shape[0], -1).to(x)
        variance = alpha**2 * self.std**2 + sigma2  # [M]
        centred = flat.unsqueeze(1) - alpha[:, None, None] * means.unsqueeze(0)  # [M, K, E]
        logits = torch.log(self.weights.to(x)).unsqueeze(0) - centred.pow(2).sum(-1) / (
            2 * variance[:, None]
        )
        responsibility = torch.softmax(logits, dim=1)  # [M, K]
        component = means.unsqueeze(0) + (alpha * self.std**2 / variance)[:, None, None] * centred
        return (responsibility.unsqueeze(-1) * component).sum(1).reshape(x.shape)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        x0 = self.posterior_mean(x, t)
        if self.prediction_type == "sample":
            return x0
        abar = self.alphas_cumprod.to(x.device)[t.long()].to(x.dtype)
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha, sigma = abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)
        eps = (x - alpha * x0) / sigma
        if self.prediction_type == "epsilon":
            return eps
        return alpha * eps - sigma * x0


def action_chunk_means(
    modes: int = 4, horizon: int = 16, action_dim: int = 2, seed: int = 0
) -> Tensor:
    """Smooth, distinct trajectories ``[modes, horizon, action_dim]`` in [-1, 1]: a stand-in for
    the modes of a multi-modal action distribution (e.g. pushing the T from either side)."""
    generator = torch.Generator().manual_seed(seed)
    phase = torch.linspace(0, 1, horizon).unsqueeze(-1)
    start = torch.rand(modes, 1, action_dim, generator=generator) * 1.2 - 0.6
    goal = torch.rand(modes, 1, action_dim, generator=generator) * 1.2 - 0.6
    bend = torch.rand(modes, 1, action_dim, generator=generator) * 0.6 - 0.3
    return start + (goal - start) * phase + bend * torch.sin(torch.pi * phase)
