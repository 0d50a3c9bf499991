"""Small analytic problems shared by the sampling tests."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from policy_accel import DenoisingProblem
from policy_accel.sampling.analytic import GaussianMixtureDenoiser, action_chunk_means

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}


def make_scheduler(kind: str, **config):
    defaults = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"}
    if kind != "dpm":
        defaults["clip_sample"] = True
    return SCHEDULERS[kind](**{**defaults, **config})


def mixture(scheduler, modes: int = 4, std: float = 0.1, horizon: int = 16, prediction_type=None):
    return GaussianMixtureDenoiser(
        action_chunk_means(modes, horizon),
        std,
        scheduler.alphas_cumprod,
        prediction_type=prediction_type or scheduler.config.prediction_type,
    )


def chunk_problem(kind: str = "ddpm", steps: int = 100, batch: int = 2, seed: int = 0, **config):
    """A Gaussian-mixture action-chunk problem ``[batch, 16, 2]``."""
    scheduler = make_scheduler(kind, **config)
    generator = torch.Generator().manual_seed(seed)
    return DenoisingProblem.from_scheduler(
        scheduler, mixture(scheduler), steps, (batch, 16, 2), generator=generator
    )


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean().sqrt())
