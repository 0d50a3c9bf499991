"""DDPM (Ho et al. 2020) as diffusers' ``DDPMScheduler.step`` computes it, vectorised."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.sampling.rules.base import (
    StepRule,
    UnsupportedSchedulerError,
    clip_range,
    common_fields,
    per_position,
)

SUPPORTED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class DDPMRule(StepRule):
    """``x[i+1] = c0_i * x0(x, m) + cx_i * x + s_i z_i`` with the scheduler's own x0 and clip."""

    sqrt_alpha_prod: Tensor  # alpha_prod_t ** 0.5
    sqrt_beta_prod: Tensor  # beta_prod_t ** 0.5
    x0_coefficient: Tensor  # pred_original_sample_coeff
    sample_coefficient: Tensor  # current_sample_coeff
    clip_range: float | None

    def predict_x0(self, idx: Tensor, x: Tensor, model_output: Tensor) -> Tensor:
        sqrt_alpha = per_position(self.sqrt_alpha_prod, idx, x)
        sqrt_beta = per_position(self.sqrt_beta_prod, idx, x)
        if self.prediction_type == "epsilon":
            x0 = (x - sqrt_beta * model_output) / sqrt_alpha
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = sqrt_alpha * x - sqrt_beta * model_output
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def step(
        self, idx: Tensor, x: Tensor, converted: Tensor, converted_prev: Tensor | None
    ) -> Tensor:
        return self.step_and_x0(idx, x, converted, converted, converted_prev)[0]

    def step_and_x0(self, idx, x, model_output, converted, converted_prev):
        x0 = self.predict_x0(idx, x, converted)
        moved = (
            per_position(self.x0_coefficient, idx, x) * x0
            + per_position(self.sample_coefficient, idx, x) * x
        )
        return moved, x0


def ddpm_rule(scheduler, num_inference_steps: int) -> DDPMRule:
    """Build the rule for a configured ``DDPMScheduler`` (the caller's object is not modified)."""
    config = scheduler.config
    if config.variance_type not in SUPPORTED_VARIANCE_TYPES:
        raise UnsupportedSchedulerError(
            f"DDPMScheduler variance_type={config.variance_type!r} is not supported: "
            "it must be one of "
            f"{list(SUPPORTED_VARIANCE_TYPES)}. Learned variances need the model's variance output "
            "inside the step; split it off in the denoiser and use a fixed variance type."
        )
    if config.thresholding:
        raise UnsupportedSchedulerError(
            "DDPMScheduler with thresholding=True is not supported: dynamic thresholding couples "
            "all elements of a sample. Use clip_sample instead."
        )
    local = copy.deepcopy(scheduler)
    local.set_timesteps(num_inference_steps)
    timesteps = local.timesteps.to(torch.int64)
    acp = local.alphas_cumprod

    sqrt_alpha, sqrt_beta, c_x0, c_x, scale, draws, abar = [], [], [], [], [], [], []
    for t in timesteps:
        # Scalar arithmetic exactly as DDPMScheduler.step (diffusers 0.30 - 0.42).
        prev_t = local.previous_timestep(t)
        alpha_prod_t = acp[t]
        alpha_prod_t_prev = acp[prev_t] if prev_t >= 0 else local.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        sqrt_alpha.append(alpha_prod_t ** (0.5))
        sqrt_beta.append(beta_prod_t ** (0.5))
        c_x0.append((alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t)
        c_x.append(current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t)
        abar.append(alpha_prod_t)
        if t > 0:
            variance = local._get_variance(t)
            scale.append(variance if config.variance_type == "fixed_small_log" else variance**0.5)
            draws.append(True)
        else:
            scale.append(torch.tensor(0.0))
            draws.append(False)
    abar.append(alpha_prod_t_prev)  # the final sample's noise level

    return DDPMRule(
        **common_fields(timesteps, scale, draws, abar, config),
        sqrt_alpha_prod=torch.stack(sqrt_alpha),
        sqrt_beta_prod=torch.stack(sqrt_beta),
        x0_coefficient=torch.stack(c_x0),
        sample_coefficient=torch.stack(c_x),
        clip_range=clip_range(config),
    )
