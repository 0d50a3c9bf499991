"""The Stable Diffusion adapter: every solver converges to StableDiffusionPipeline's own sample."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from policy_accel.adapters import GuidedUNetDenoiser, generate, stable_diffusion_problem
from policy_accel.adapters.compare import compare_with_paradigms
from tests.adapters.conftest import SD_BETAS, relative_rms, schedulers

PROMPTS = ["a red cube", "a dog", "tree"]
STEPS = 8
# A parallel window batches many timesteps into one UNet call; a different batch composition
# changes the last bits of the convolutions (~1e-7 relative per call), nothing more.
EXACT = 1e-5


def pipeline_latents(pipe, seed=0, **call):
    call = {"num_inference_steps": STEPS, **call}
    generator = torch.Generator().manual_seed(seed)
    return pipe(generator=generator, output_type="latent", **call).images


def ours(pipe, method, seed=0, **call):
    options = {} if method == "sequential" else {"tolerance": 0.0}
    call = {"num_inference_steps": STEPS, **call}
    generator = torch.Generator().manual_seed(seed)
    return generate(
        pipe, method=method, generator=generator, output_type="latent", **call, **options
    )


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpmsolver++"])
def test_solvers_match_the_pipeline(sd_pipe, scheduler, guidance_scale):
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = schedulers()[scheduler]
    call = dict(prompt=PROMPTS, guidance_scale=guidance_scale)
    expected = pipeline_latents(pipe, **call)
    sequential, result = ours(pipe, "sequential", **call)
    assert torch.equal(sequential, expected)  # same arithmetic, same order: bit for bit
    assert result.rounds == STEPS
    for method in ("picard", "taa"):
        got, result = ours(pipe, method, **call)
        assert got.shape == (len(PROMPTS), 4, 16, 16)
        assert relative_rms(got, expected) < EXACT, (method, relative_rms(got, expected))
        assert result.converged and result.rounds <= STEPS


def test_options_match_the_pipeline(sd_pipe):
    """Negative prompts, several images per prompt, guidance rescale, explicit latents."""
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = schedulers()["ddim"]
    latents = torch.randn((4, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    call = dict(
        prompt=["a cat", "a boat"],
        negative_prompt=["blurry", "dark"],
        num_images_per_prompt=2,
        guidance_scale=5.0,
        guidance_rescale=0.7,
        latents=latents,
    )
    expected = pipeline_latents(pipe, **call)
    got, _ = ours(pipe, "picard", **call)
    assert relative_rms(got, expected) < EXACT


def test_ddim_eta_matches_the_pipeline(sd_pipe):
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = schedulers()["ddim"]
    call = dict(prompt=PROMPTS[:2], eta=0.6)
    expected = pipeline_latents(pipe, **call)
    got, _ = ours(pipe, "taa", **call)
    assert relative_rms(got, expected) < EXACT


def test_images_decode_as_the_pipeline_does(sd_pipe):
    pipe = copy.copy(sd_pipe)
    pipe.scheduler = schedulers()["dpmsolver++"]
    generator = torch.Generator().manual_seed(1)
    expected = pipe("a cat", num_inference_steps=STEPS, generator=generator, output_type="np")
    images, _ = generate(
        pipe,
        "a cat",
        "sequential",
        STEPS,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    )
    np.testing.assert_array_equal(images, expected.images)
    pil, result = generate(
        pipe, "a cat", "picard", STEPS, generator=torch.Generator().manual_seed(1)
    )
    assert len(pil) == 1 and pil[0].size == (32, 32)
    assert result.model_evals >= STEPS


def test_newton_is_refused_for_latents(sd_pipe):
    with pytest.raises(ValueError, match="max_event_size"):
        generate(sd_pipe, "a cat", "newton", 4, output_type="latent")


def test_denoiser_replicas_and_low_precision(sd_pipe):
    problem = stable_diffusion_problem(sd_pipe, ["a", "b"], 4, guidance_scale=3.0)
    denoiser = problem.denoiser
    assert isinstance(denoiser, GuidedUNetDenoiser)
    x = torch.randn((6, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 900, 500, 500, 100, 100])
    with torch.no_grad():
        expected = denoiser(x, t)
        replica = denoiser.to("cpu")
        assert replica.unet is not denoiser.unet
        assert torch.equal(replica(x, t), expected)
        low = GuidedUNetDenoiser(
            copy.deepcopy(sd_pipe.unet).to(torch.bfloat16),
            denoiser.prompt_embeds.to(torch.bfloat16),
            denoiser.negative_prompt_embeds.to(torch.bfloat16),
            3.0,
        )
        got = low(x, t)
    assert got.dtype == torch.float32
    assert relative_rms(got, expected) < 0.05


def test_bad_inputs_name_the_fix(sd_pipe):
    with pytest.raises(ValueError, match="multiples of the VAE's scale factor"):
        stable_diffusion_problem(sd_pipe, "a", 4, height=33)
    with pytest.raises(ValueError, match="latents has shape"):
        stable_diffusion_problem(sd_pipe, ["a", "b"], 4, latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="prompt must be"):
        stable_diffusion_problem(sd_pipe, [], 4)
    with pytest.raises(TypeError, match="StableDiffusionPipeline or DiTPipeline"):
        generate(object(), "a")


@pytest.mark.parametrize(
    "name,scheduler,steps,paradigms_exact",
    [
        ("ddpm", DDPMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False), 10, True),
        ("ddim alpha_to_one", DDIMScheduler(**SD_BETAS, clip_sample=False), 10, True),
        (
            "ddim set_alpha_to_one=False",
            DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
            10,
            False,
        ),
        (  # sequential DDIM itself steps by the fixed stride N_train // N, as the parallel one
            "ddim trailing, 12 steps",
            DDIMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="trailing"),
            12,
            True,
        ),
        (  # sequential DDPM steps to the previous timestep, the parallel one by a fixed stride
            "ddpm trailing, 12 steps",
            DDPMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="trailing"),
            12,
            False,
        ),
        (
            "ddpm linspace",
            DDPMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="linspace"),
            10,
            False,
        ),
    ],
)
def test_paradigms_pipeline_comparison(sd_pipe, name, scheduler, steps, paradigms_exact):
    """diffusers' own ParaDiGMS pipeline reproduces the sequential pipeline only for some
    configurations; ours reproduces it for all."""
    report = compare_with_paradigms(
        sd_pipe, PROMPTS[:2], scheduler, steps, paradigms_tolerance=1e-6
    )
    for method in ("picard", "taa"):
        entry = report[method]
        assert entry["rms"] / entry["reference_rms"] < EXACT, (name, method, entry)
    theirs = report["paradigms_diffusers"]
    assert (theirs["rms"] / theirs["reference_rms"] < EXACT) == paradigms_exact, (name, theirs)
    assert theirs["rounds"] <= steps


def test_paradigms_pipeline_refuses_ddim_eta(sd_pipe):
    scheduler = DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False)
    report = compare_with_paradigms(sd_pipe, "a", scheduler, 6, eta=0.5, methods=("picard",))
    assert "error" in report["paradigms_diffusers"]
    assert report["picard"]["rms"] / report["picard"]["reference_rms"] < EXACT
