"""The front door for image pipelines: ``generate(pipe, prompt, method=...)``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from policy_accel.adapters.dit import decode_dit, dit_problem
from policy_accel.adapters.stable_diffusion import (
    decode_stable_diffusion,
    stable_diffusion_problem,
)
from policy_accel.execution import Executor
from policy_accel.sampling import SampleResult, sample

DEFAULT_GUIDANCE = {"StableDiffusionPipeline": 7.5, "DiTPipeline": 4.0}


def pipeline_kind(pipe: Any) -> str:
    """``"StableDiffusionPipeline"`` or ``"DiTPipeline"`` (subclasses included), else an error."""
    from diffusers import DiTPipeline, StableDiffusionPipeline

    for kind in (StableDiffusionPipeline, DiTPipeline):
        if isinstance(pipe, kind):
            return kind.__name__
    raise TypeError(
        f"generate() takes a diffusers StableDiffusionPipeline or DiTPipeline. Got "
        f"{type(pipe).__name__}; load one with StableDiffusionPipeline.from_pretrained(...) or "
        "DiTPipeline.from_pretrained(...)."
    )


def generate(
    pipe: Any,
    prompt,
    method: str = "picard",
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    eta: float = 0.0,
    output_type: str = "pil",
    executor: Executor | None = None,
    *,
    noise: Tensor | None = None,
    guidance_rescale: float = 0.0,
    init: Tensor | None = None,
    **solver_options,
) -> tuple[Any, SampleResult]:
    """Sample images from a diffusers pipeline with any registered solver.

    ``prompt`` is the text prompt(s) of a Stable Diffusion pipeline, or the class labels (ids or
    label words) of a DiT pipeline. ``guidance_scale`` defaults to the pipeline's own default
    (7.5 for Stable Diffusion, 4.0 for DiT). With the same ``generator`` seed (and, for DiT with
    DDPM, :func:`~policy_accel.adapters.dit.dit_pipeline_noise` as ``noise``) every method
    converges to the pipeline's own output; ``tolerance`` (a solver option) bounds how far it stops
    from it. Returns ``(images, result)``: images as ``output_type`` (``"pil"``, ``"np"``,
    ``"pt"`` or ``"latent"``) and the solver's :class:`SampleResult` (rounds, model evals).
    """
    kind = pipeline_kind(pipe)
    scale = DEFAULT_GUIDANCE[kind] if guidance_scale is None else guidance_scale
    if kind == "StableDiffusionPipeline":
        problem = stable_diffusion_problem(
            pipe,
            prompt,
            num_inference_steps,
            scale,
            negative_prompt,
            num_images_per_prompt,
            height,
            width,
            generator,
            latents,
            noise,
            eta,
            guidance_rescale,
        )
    else:
        unsupported = {
            "negative_prompt": negative_prompt,
            "height": height,
            "width": width,
            "guidance_rescale": guidance_rescale or None,
        }
        given = sorted(name for name, value in unsupported.items() if value is not None)
        if given:
            raise ValueError(
                f"{given} do not apply to a DiTPipeline (class labels, fixed latent size "
                f"{pipe.transformer.config.sample_size}); leave them out."
            )
        problem = dit_problem(
            pipe,
            prompt,
            num_inference_steps,
            scale,
            num_images_per_prompt,
            generator,
            latents,
            noise,
            eta,
        )
    # newton differentiates the denoiser; every other solver runs it without autograd
    context = contextlib.nullcontext() if method == "newton" else torch.no_grad()
    with context:
        result = sample(problem, method, init=init, executor=executor, **solver_options)
    if kind == "StableDiffusionPipeline":
        images = decode_stable_diffusion(pipe, result.sample, output_type, generator)
    else:
        images = decode_dit(pipe, result.sample, output_type)
    return images, result
