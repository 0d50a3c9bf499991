"""The vectorised step rules reproduce diffusers' sequential loops."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from policy_accel import DenoisingProblem, sample
from policy_accel.sampling.analytic import GaussianMixtureDenoiser
from policy_accel.sampling.rules import UnsupportedSchedulerError, rule_from_scheduler

SHAPE = (2, 6, 2)
MEANS = torch.tensor([[[0.5, -0.3]] * 6, [[-0.4, 0.6]] * 6]) + torch.linspace(-0.2, 0.2, 6)[:, None]


def diffusers_loop(scheduler, denoiser, steps, dtype, seed, **step_kwargs):
    """The reference: the plain diffusers sampling loop, noise from a seeded generator."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator, dtype=dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = denoiser(x, torch.full((SHAPE[0],), int(t)))
        x = scheduler.step(model_output, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def ours(scheduler, denoiser, steps, dtype, seed, **step_kwargs):
    generator = torch.Generator().manual_seed(seed)
    problem = DenoisingProblem.from_scheduler(
        scheduler, denoiser, steps, SHAPE, generator=generator, dtype=dtype, **step_kwargs
    )
    return sample(problem, "sequential").sample


def check(scheduler_class, config, steps, step_kwargs=None):
    step_kwargs = step_kwargs or {}
    prediction = config.get("prediction_type", "epsilon")
    for dtype in (torch.float64, torch.float32):
        reference_scheduler = scheduler_class(**config)
        denoiser = GaussianMixtureDenoiser(
            MEANS, 0.2, reference_scheduler.alphas_cumprod, prediction_type=prediction
        )
        expected = diffusers_loop(reference_scheduler, denoiser, steps, dtype, 7, **step_kwargs)
        got = ours(scheduler_class(**config), denoiser, steps, dtype, 7, **step_kwargs)
        assert got.dtype == expected.dtype
        if dtype == torch.float64:
            assert torch.allclose(got, expected, atol=1e-6, rtol=0), float(
                (got - expected).abs().max()
            )
        else:  # same arithmetic in the same order: bit for bit
            assert torch.equal(got, expected), float((got - expected).abs().max())


SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "sample", "v_prediction")


@pytest.mark.parametrize(
    "variance_type,clip,prediction,spacing,offset,steps",
    list(
        itertools.product(
            ("fixed_small", "fixed_small_log"),
            (True, False),
            PREDICTIONS,
            SPACINGS,
            (0, 1),
            (7, 30),
        )
    ),
)
def test_ddpm_matches_diffusers(variance_type, clip, prediction, spacing, offset, steps):
    config = dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=clip,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    check(DDPMScheduler, config, steps)


@pytest.mark.parametrize(
    "eta,alpha_to_one,clip,prediction,spacing,offset,steps",
    list(
        itertools.product(
            (0.0, 0.7), (True, False), (True, False), PREDICTIONS, SPACINGS, (0, 1), (7, 30)
        )
    ),
)
def test_ddim_matches_diffusers(eta, alpha_to_one, clip, prediction, spacing, offset, steps):
    config = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        set_alpha_to_one=alpha_to_one,
        clip_sample=clip,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    check(DDIMScheduler, config, steps, {"eta": eta})


@pytest.mark.parametrize(
    "karras,solver_type,prediction,spacing,offset,steps,final",
    list(
        itertools.product(
            (False, True),
            ("midpoint", "heun"),
            PREDICTIONS,
            SPACINGS,
            (0, 1),
            (7, 20, 30),
            ("zero", "sigma_min"),
        )
    ),
)
def test_dpm_solver_matches_diffusers(
    karras, solver_type, prediction, spacing, offset, steps, final
):
    config = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        use_karras_sigmas=karras,
        solver_type=solver_type,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=offset,
        final_sigmas_type=final,
    )
    try:
        rule_from_scheduler(DPMSolverMultistepScheduler(**config), steps)
    except UnsupportedSchedulerError:
        # refused configurations are those where diffusers itself produces NaN
        scheduler = DPMSolverMultistepScheduler(**config)
        denoiser = GaussianMixtureDenoiser(
            MEANS, 0.2, scheduler.alphas_cumprod, prediction_type=prediction
        )
        assert not torch.isfinite(
            diffusers_loop(scheduler, denoiser, steps, torch.float64, 7)
        ).all()
        return
    check(DPMSolverMultistepScheduler, config, steps)


def test_dpm_solver_with_a_repeated_first_timestep_is_refused():
    # Karras sigmas on a cosine schedule start at sigma ~2e4: the first timesteps repeat and
    # diffusers' own step indexing then runs off the end of its sigmas.
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True
    )
    with pytest.raises(UnsupportedSchedulerError, match="repeats its first timestep"):
        rule_from_scheduler(scheduler, 7)


def test_ddim_clipped_model_output_matches_diffusers():
    config = dict(num_train_timesteps=1000, clip_sample=True, prediction_type="sample")
    check(DDIMScheduler, config, 12, {"eta": 0.3, "use_clipped_model_output": True})


def test_rule_leaves_the_callers_scheduler_untouched():
    scheduler = DDPMScheduler()
    rule_from_scheduler(scheduler, 10)
    assert scheduler.num_inference_steps is None


@pytest.mark.parametrize(
    "scheduler,message",
    [
        (DDPMScheduler(variance_type="learned_range"), "variance_type"),
        (DDPMScheduler(thresholding=True), "thresholding"),
        (DDIMScheduler(thresholding=True), "thresholding"),
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (DPMSolverMultistepScheduler(solver_order=3), "solver_order"),
        (DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
    ],
)
def test_configurations_that_cannot_be_exact_are_refused(scheduler, message):
    with pytest.raises(UnsupportedSchedulerError, match=message):
        rule_from_scheduler(scheduler, 10)


def test_unknown_scheduler_is_refused_naming_the_supported_ones():
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(UnsupportedSchedulerError, match="DDPMScheduler.*DDIMScheduler"):
        rule_from_scheduler(EulerDiscreteScheduler(), 10)


def test_eta_is_refused_outside_ddim():
    with pytest.raises(ValueError, match="DDIMScheduler step options"):
        rule_from_scheduler(DDPMScheduler(), 10, eta=0.5)


def test_rules_are_reused_across_problems_without_recomputation():
    """A control loop builds a problem every replan: the rule, its device copy and its derived
    coefficients are made once."""
    scheduler = DDPMScheduler(num_train_timesteps=100)
    rule = rule_from_scheduler(scheduler, 20)
    assert rule_from_scheduler(scheduler, 20) is rule
    assert rule.to("cpu") is rule
    assert rule.linear_coefficient() is rule.linear_coefficient()
    assert rule.tolerance_scale() is rule.tolerance_scale()
