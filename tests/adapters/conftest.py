"""Tiny Stable Diffusion and DiT pipelines, saved with ``save_pretrained`` and loaded back with
``from_pretrained`` (the real loading path), shared by the adapter tests."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the Stable Diffusion adapter tests need CLIP")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils import logging  # noqa: E402

from policy_accel.adapters.tiny import tiny_dit, tiny_stable_diffusion  # noqa: E402

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def schedulers() -> dict:
    """The scheduler configurations the tests run: Stable Diffusion's own (leading spacing,
    steps_offset=1, DDIM with set_alpha_to_one=False) and DPM-Solver++."""
    return {
        "ddpm": DDPMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False),
        "ddim": DDIMScheduler(
            **SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False
        ),
        "dpmsolver++": DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++"),
    }


def _quiet() -> None:
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory) -> StableDiffusionPipeline:
    _quiet()
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_stable_diffusion(folder).save_pretrained(folder / "pipeline")
    pipe = StableDiffusionPipeline.from_pretrained(folder / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def dit_pipe(tmp_path_factory) -> DiTPipeline:
    _quiet()
    folder = tmp_path_factory.mktemp("tiny_dit")
    tiny_dit().save_pretrained(folder / "pipeline")
    pipe = DiTPipeline.from_pretrained(folder / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative_rms(got: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over the RMS of the reference."""
    difference = (got.float() - expected.float()).pow(2).mean().sqrt()
    return float(difference / expected.float().pow(2).mean().sqrt())
