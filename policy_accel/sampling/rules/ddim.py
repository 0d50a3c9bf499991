"""DDIM (Song et al. 2021) as diffusers' ``DDIMScheduler.step`` computes it, vectorised.

Faithful to the scheduler's own semantics, including the ones diffusers' parallel schedulers get
wrong: the previous timestep is ``t - num_train_timesteps // N`` (a fixed stride, whatever the
spacing), the last step lands on ``final_alpha_cumprod`` (1, or ``alphas_cumprod[0]`` when
``set_alpha_to_one=False``), and with ``eta > 0`` every step draws noise.
"""

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


@dataclass(frozen=True)
class DDIMRule(StepRule):
    """``x[i+1] = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z``."""

    sqrt_alpha_prod: Tensor
    sqrt_beta_prod: Tensor
    sqrt_alpha_prod_prev: Tensor
    direction_coefficient: Tensor  # (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5
    clip_range: float | None
    use_clipped_model_output: bool

    def _x0_and_eps(self, idx: Tensor, x: Tensor, model_output: Tensor) -> tuple[Tensor, Tensor]:
        sqrt_alpha = per_position(self.sqrt_alpha_prod, idx, x)
        sqrt_beta = per_position(self.sqrt_beta_prod, idx, x)
        if self.prediction_type == "epsilon":
            x0 = (x - sqrt_beta * model_output) / sqrt_alpha
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - sqrt_alpha * x0) / sqrt_beta
        else:
            x0 = sqrt_alpha * x - sqrt_beta * model_output
            eps = sqrt_alpha * model_output + sqrt_beta * x
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        if self.use_clipped_model_output:
            eps = (x - sqrt_alpha * x0) / sqrt_beta
        return x0, eps

    def predict_x0(self, idx: Tensor, x: Tensor, model_output: Tensor) -> Tensor:
        return self._x0_and_eps(idx, x, model_output)[0]

    def step(
        self, idx: Tensor, x: Tensor, converted: Tensor, converted_prev: Tensor | None
    ) -> Tensor:
        return self.step_and_x0(idx, x, converted, converted, converted_prev)[0]

    def step_and_x0(self, idx, x, model_output, converted, converted_prev):
        x0, eps = self._x0_and_eps(idx, x, converted)
        moved = (
            per_position(self.sqrt_alpha_prod_prev, idx, x) * x0
            + per_position(self.direction_coefficient, idx, x) * eps
        )
        return moved, x0


def ddim_rule(
    scheduler, num_inference_steps: int, eta: float = 0.0, use_clipped_model_output: bool = False
) -> DDIMRule:
    """Build the rule for a configured ``DDIMScheduler`` (the caller's object is not modified)."""
    config = scheduler.config
    if config.thresholding:
        raise UnsupportedSchedulerError(
            "DDIMScheduler with thresholding=True is not supported: dynamic thresholding couples "
            "all elements of a sample. Use clip_sample instead."
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0. Got {eta}.")
    local = copy.deepcopy(scheduler)
    local.set_timesteps(num_inference_steps)
    timesteps = local.timesteps.to(torch.int64)
    acp = local.alphas_cumprod
    stride = config.num_train_timesteps // local.num_inference_steps

    sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction, scale, abar = [], [], [], [], [], []
    for t in timesteps:
        # Scalar arithmetic exactly as DDIMScheduler.step (diffusers 0.30 - 0.42).
        prev_timestep = t - stride
        alpha_prod_t = acp[t]
        alpha_prod_t_prev = acp[prev_timestep] if prev_timestep >= 0 else local.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        variance = local._get_variance(t, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        sqrt_alpha.append(alpha_prod_t ** (0.5))
        sqrt_beta.append(beta_prod_t ** (0.5))
        sqrt_alpha_prev.append(alpha_prod_t_prev ** (0.5))
        direction.append((1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5))
        scale.append(std_dev_t if eta > 0 else torch.tensor(0.0))
        abar.append(alpha_prod_t)
    abar.append(alpha_prod_t_prev)

    return DDIMRule(
        **common_fields(timesteps, scale, [eta > 0] * len(timesteps), abar, config),
        sqrt_alpha_prod=torch.stack(sqrt_alpha),
        sqrt_beta_prod=torch.stack(sqrt_beta),
        sqrt_alpha_prod_prev=torch.stack(sqrt_alpha_prev),
        direction_coefficient=torch.stack(direction),
        clip_range=clip_range(config),
        use_clipped_model_output=use_clipped_model_output,
    )
