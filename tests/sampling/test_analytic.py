"""The analytic denoiser is what the solver tests rely on: check it against the truth."""

from __future__ import annotations

import torch

from policy_accel import DenoisingProblem, sample
from policy_accel.sampling.analytic import GaussianMixtureDenoiser
from tests.sampling.helpers import make_scheduler


def test_posterior_mean_matches_monte_carlo():
    scheduler = make_scheduler("ddpm")
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])
    denoiser = GaussianMixtureDenoiser(means, 0.3, scheduler.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    t = 40
    abar = scheduler.alphas_cumprod[t].double()
    x0 = means[torch.randint(0, 2, (400_000,), generator=generator)].double()
    x0 = x0 + 0.3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(
        x0.shape, generator=generator, dtype=torch.float64
    )
    query = torch.tensor([0.2, 0.1], dtype=torch.float64)
    near = (xt - query).norm(dim=1) < 0.05
    empirical = x0[near].mean(0)
    exact = denoiser.posterior_mean(query.unsqueeze(0), torch.tensor([t]))[0]
    assert torch.allclose(exact, empirical, atol=0.03)


def test_ddpm_samples_have_the_data_distribution():
    # DDPM-1000 with the exact denoiser samples the data (DDPM-100 measurably shrinks the
    # variance, to 0.37 here, sequential and parallel alike).
    scheduler = make_scheduler(
        "ddpm", num_train_timesteps=1000, beta_schedule="linear", clip_sample=False
    )
    denoiser = GaussianMixtureDenoiser(torch.tensor([[0.5, -1.0]]), 0.4, scheduler.alphas_cumprod)
    problem = DenoisingProblem.from_scheduler(
        scheduler, denoiser, 1000, (4000, 2), generator=torch.Generator().manual_seed(0)
    )
    result = sample(problem, "picard")
    assert result.rounds < 50
    assert torch.allclose(result.sample.mean(0), torch.tensor([0.5, -1.0]), atol=0.03)
    assert torch.allclose(result.sample.std(0), torch.tensor([0.4, 0.4]), atol=0.03)


def test_prediction_types_are_consistent():
    scheduler = make_scheduler("ddpm")
    means = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 20, 50, 80, 99])
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1)
    outputs = {
        p: GaussianMixtureDenoiser(means, 0.2, scheduler.alphas_cumprod, prediction_type=p)(x, t)
        for p in ("epsilon", "sample", "v_prediction")
    }
    x0_from_eps = (x - (1 - abar).sqrt() * outputs["epsilon"]) / abar.sqrt()
    x0_from_v = abar.sqrt() * x - (1 - abar).sqrt() * outputs["v_prediction"]
    assert torch.allclose(x0_from_eps, outputs["sample"], atol=1e-4)
    assert torch.allclose(x0_from_v, outputs["sample"], atol=1e-5)
