"""DPM-Solver++ multistep (Lu et al. 2022) as diffusers' ``DPMSolverMultistepScheduler.step``
computes it, vectorised over positions.

Supported: ``algorithm_type="dpmsolver++"``, ``solver_order`` 1 or 2, ``solver_type`` midpoint or
heun, any sigma schedule the scheduler builds (default, Karras, exponential, beta, Lu lambdas),
``final_sigmas_type`` zero or sigma_min, ``lower_order_final``, ``euler_at_final``. The second-order
step reads the converted (clean-sample) output of the previous position of the same iterate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.sampling.rules.base import StepRule, UnsupportedSchedulerError, per_position


@dataclass(frozen=True)
class DPMSolverRule(StepRule):
    """``x[i+1] = (s_t/s_s) x - c0 D0 - c1 D1`` in the scheduler's own operation order."""

    convert_alpha: Tensor  # alpha_t of position i (for converting model output to x0)
    convert_sigma: Tensor  # sigma_t of position i
    sample_coefficient: Tensor  # sigma_t / sigma_s0
    d0_coefficient: Tensor  # alpha_t * (exp(-h) - 1)
    d1_coefficient: Tensor  # 0.5 * d0 (midpoint) or alpha_t * ((exp(-h) - 1) / h + 1) (heun)
    inverse_r0: Tensor  # 1 / r0 (1 where the step is first order)
    second_order: Tensor  # bool: which steps use the previous output
    heun: bool

    def convert(self, idx: Tensor, x: Tensor, model_output: Tensor) -> Tensor:
        if self.prediction_type == "sample":
            return model_output
        alpha = per_position(self.convert_alpha, idx, model_output)
        sigma = per_position(self.convert_sigma, idx, model_output)
        if self.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha
        return alpha * x - sigma * model_output

    def predict_x0(self, idx: Tensor, x: Tensor, model_output: Tensor) -> Tensor:
        return self.convert(idx, x, model_output)

    def step_and_x0(self, idx, x, model_output, converted, converted_prev):
        return self.step(idx, x, converted, converted_prev), converted

    def step(
        self, idx: Tensor, x: Tensor, converted: Tensor, converted_prev: Tensor | None
    ) -> Tensor:
        sample = x.to(torch.float32)  # as diffusers: the update runs on a float32 sample
        first_part = per_position(self.sample_coefficient, idx, sample) * sample
        d0_term = per_position(self.d0_coefficient, idx, converted) * converted
        first_order = first_part - d0_term
        if converted_prev is None:
            return first_order.to(converted.dtype)
        d1 = per_position(self.inverse_r0, idx, converted) * (converted - converted_prev)
        d1_term = per_position(self.d1_coefficient, idx, converted) * d1
        second = first_part - d0_term + d1_term if self.heun else first_part - d0_term - d1_term
        use_second = per_position(self.second_order, idx, converted).to(torch.bool)
        return torch.where(use_second, second, first_order).to(converted.dtype)


def dpm_solver_rule(scheduler, num_inference_steps: int) -> DPMSolverRule:
    """Build the rule for a configured ``DPMSolverMultistepScheduler``."""
    config = scheduler.config
    refusals = {
        "algorithm_type": (config.algorithm_type != "dpmsolver++", "must be 'dpmsolver++'"),
        "solver_order": (config.solver_order not in (1, 2), "must be 1 or 2"),
        "thresholding": (bool(config.thresholding), "must be False (it couples sample elements)"),
        "variance_type": (config.variance_type is not None, "must be None (no learned variance)"),
        "use_flow_sigmas": (bool(getattr(config, "use_flow_sigmas", False)), "must be False"),
        "use_dynamic_shifting": (
            bool(getattr(config, "use_dynamic_shifting", False)),
            "must be False",
        ),
    }
    for name, (bad, expected) in refusals.items():
        if bad:
            raise UnsupportedSchedulerError(
                f"DPMSolverMultistepScheduler {name}={getattr(config, name)!r} is not supported: "
                f"{name} {expected} for exact parallel sampling."
            )
    local = copy.deepcopy(scheduler)
    local.set_timesteps(num_inference_steps)
    timesteps = local.timesteps.to(torch.int64)
    n = len(timesteps)
    if n > 1 and (timesteps == timesteps[0]).sum() > 1:
        raise UnsupportedSchedulerError(
            f"DPMSolverMultistepScheduler with {num_inference_steps} steps repeats its first "
            f"timestep {int(timesteps[0])}; diffusers would then start at the second entry. Use "
            "a different number of steps or sigma schedule."
        )
    sigmas = local.sigmas

    def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    conv_alpha, conv_sigma, c_sample, c_d0, c_d1, inv_r0, second = [], [], [], [], [], [], []
    for i in range(n):
        # Scalar arithmetic exactly as DPMSolverMultistepScheduler.step (diffusers 0.30 - 0.42).
        lower_order_final = (i == n - 1) and (
            config.euler_at_final
            or (config.lower_order_final and n < 15)
            or config.final_sigmas_type == "zero"
        )
        use_second = config.solver_order == 2 and i >= 1 and not lower_order_final
        alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        conv_alpha.append(alpha_s0)
        conv_sigma.append(sigma_s0)
        c_sample.append(sigma_t / sigma_s0)
        c_d0.append(alpha_t * (torch.exp(-h) - 1.0))
        if use_second:
            alpha_s1, sigma_s1 = alpha_sigma(sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            inv_r0.append(1.0 / r0)
            if config.solver_type == "heun":
                c_d1.append(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
            else:
                c_d1.append(0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
        else:
            inv_r0.append(torch.tensor(1.0))
            c_d1.append(torch.tensor(0.0))
        second.append(use_second)

    for name, values in (("d0", c_d0), ("d1", c_d1), ("1/r0", inv_r0), ("sample", c_sample)):
        bad = [i for i, value in enumerate(values) if not torch.isfinite(value)]
        if bad:
            raise UnsupportedSchedulerError(
                f"DPMSolverMultistepScheduler with {num_inference_steps} steps and this sigma "
                f"schedule has a non-finite {name} coefficient at step {bad[0]} (two equal "
                "consecutive sigmas); diffusers' own loop returns NaN there. Use "
                "final_sigmas_type='zero', solver_type='midpoint' or another step count."
            )
    position_alpha = torch.stack([alpha_sigma(s)[0] for s in sigmas[: n + 1]]).to(torch.float64)
    position_sigma = torch.stack([alpha_sigma(s)[1] for s in sigmas[: n + 1]]).to(torch.float64)
    f32 = lambda values: torch.stack(values).to(torch.float32)  # noqa: E731
    return DPMSolverRule(
        timesteps=timesteps,
        noise_scale=torch.zeros(n),
        draws_noise=torch.zeros(n, dtype=torch.bool),
        alphas=position_alpha,
        sigmas=position_sigma,
        prediction_type=config.prediction_type,
        history=1 if config.solver_order == 2 else 0,
        convert_alpha=f32(conv_alpha),
        convert_sigma=f32(conv_sigma),
        sample_coefficient=f32(c_sample),
        d0_coefficient=f32(c_d0),
        d1_coefficient=f32(c_d1),
        inverse_r0=f32(inv_r0),
        second_order=torch.tensor(second),
        heun=config.solver_type == "heun",
    )
