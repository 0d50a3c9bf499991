"""The DiT adapter: every solver converges to DiTPipeline's own sample (class labels, CFG with
the null class, learned-sigma output)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from policy_accel.adapters import GuidedDiTDenoiser, dit_pipeline_noise, dit_problem, generate
from tests.adapters.conftest import relative_rms, schedulers

LABELS = [1, 207, 999]
STEPS = 8
EXACT = 1e-5


def with_scheduler(pipe, name):
    pipe = copy.copy(pipe)
    pipe.scheduler = schedulers()[name]
    return pipe


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_solvers_match_the_pipeline(dit_pipe, scheduler, guidance_scale):
    pipe = with_scheduler(dit_pipe, scheduler)
    generator = torch.Generator().manual_seed(0)
    expected = pipe(LABELS, guidance_scale, generator, STEPS, output_type="np").images
    images, result = generate(
        pipe,
        LABELS,
        "sequential",
        STEPS,
        guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    np.testing.assert_allclose(images, expected, atol=1e-6, rtol=0)
    reference, _ = generate(
        pipe,
        LABELS,
        "sequential",
        STEPS,
        guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    for method in ("picard", "taa"):
        got, result = generate(
            pipe,
            LABELS,
            method,
            STEPS,
            guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            tolerance=0.0,
        )
        assert got.shape == (len(LABELS), 4, 16, 16)
        assert relative_rms(got, reference) < EXACT, (method, relative_rms(got, reference))
        assert result.converged


def test_ddpm_with_the_pipelines_noise(dit_pipe):
    """DiTPipeline draws DDPM's step noise from torch's global generator (guided batch shape)."""
    pipe = with_scheduler(dit_pipe, "ddpm")
    torch.manual_seed(5)
    expected = pipe(LABELS, 4.0, torch.Generator().manual_seed(0), STEPS, output_type="np").images
    torch.manual_seed(5)
    noise = dit_pipeline_noise(pipe, STEPS, len(LABELS), 4.0)
    images, _ = generate(
        pipe,
        LABELS,
        "picard",
        STEPS,
        4.0,
        generator=torch.Generator().manual_seed(0),
        noise=noise,
        output_type="np",
        tolerance=0.0,
    )
    assert np.abs(images - expected).max() < 1e-4


def test_learned_sigma_and_guidance_channels(dit_pipe):
    problem = dit_problem(dit_pipe, [3, 4], 4, guidance_scale=4.0)
    denoiser = problem.denoiser
    assert isinstance(denoiser, GuidedDiTDenoiser)
    assert dit_pipe.transformer.config.out_channels == 8  # learned sigma
    x = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700, 700, 300, 300])
    with torch.no_grad():
        got = denoiser(x, t)
        raw = dit_pipe.transformer(
            torch.cat([x, x]),
            timestep=torch.cat([t, t]),
            class_labels=torch.tensor([3, 4, 3, 4, 1000, 1000, 1000, 1000]),
        ).sample
        replica = denoiser.to("cpu")(x, t)
    cond, uncond = raw[:4, :4], raw[4:, :4]
    assert got.shape == x.shape
    assert torch.allclose(got, uncond + 4.0 * (cond - uncond), atol=1e-6)
    assert torch.equal(replica, got)


def test_bad_inputs_name_the_fix(dit_pipe):
    with pytest.raises(ValueError, match="class ids"):
        dit_problem(dit_pipe, [1000], 4)
    with pytest.raises(ValueError, match="do not apply to a DiTPipeline"):
        generate(dit_pipe, [1], negative_prompt="x")
    with pytest.raises(ValueError, match="latents has shape"):
        dit_problem(dit_pipe, [1, 2], 4, latents=torch.zeros(1, 4, 16, 16))
