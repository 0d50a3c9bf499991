"""Stable Diffusion (diffusers ``StableDiffusionPipeline``) -> :class:`DenoisingProblem`.

The prompt is encoded once; the denoiser runs classifier-free guidance (Ho & Salimans 2022) on one
UNet batch holding the unconditional and conditional halves, with the optional guidance rescale of
Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4), in
exactly the arithmetic of ``StableDiffusionPipeline.__call__``. Latents are ``[B, 4, H/f, W/f]``
(``f = pipe.vae_scale_factor``) scaled by ``scheduler.init_noise_sigma``; with the same generator
the latents and the per-step noise are drawn in the pipeline's order, so every solver converges to
the pipeline's own sample.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from policy_accel.adapters.common import check_identity_input_scaling, model_dtype
from policy_accel.sampling import DenoisingProblem


class GuidedUNetDenoiser:
    """``eps(x, t)`` of a text-conditioned UNet with classifier-free guidance.

    ``x`` is a flat batch of ``P*B`` rows (window position major, sample minor); the per-sample
    prompt embeddings are tiled ``P`` times. With guidance (``guidance_scale > 1``) one UNet call
    holds ``[uncond rows; cond rows]`` and returns ``uncond + s * (cond - uncond)``. Inputs are cast
    to the UNet's dtype and outputs back to the solver's, so an fp16/bf16 UNet runs under an fp32
    solver. ``to(device)`` returns a replica (for multi-device executors).
    """

    def __init__(
        self,
        unet: Any,
        prompt_embeds: Tensor,
        negative_prompt_embeds: Tensor | None,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        timestep_cond: Tensor | None = None,
    ) -> None:
        if guidance_scale > 1 and negative_prompt_embeds is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} > 1 needs negative_prompt_embeds (the "
                "unconditional embeddings); pass them or use guidance_scale <= 1."
            )
        self.unet = unet
        self.prompt_embeds = prompt_embeds
        self.negative_prompt_embeds = negative_prompt_embeds
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.timestep_cond = timestep_cond
        self.batch = int(prompt_embeds.shape[0])

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] % self.batch:
            raise ValueError(
                f"the denoiser got {x.shape[0]} rows, not a multiple of the batch size "
                f"{self.batch}."
            )
        copies = x.shape[0] // self.batch
        dtype = model_dtype(self.unet)
        embeds = self.prompt_embeds.repeat(copies, 1, 1)
        model_input, timesteps = x.to(dtype), t.to(torch.int64)
        timestep_cond = None
        if self.timestep_cond is not None:
            timestep_cond = self.timestep_cond.repeat(copies, 1)
        if self.guided:
            negative = self.negative_prompt_embeds.repeat(copies, 1, 1)
            embeds = torch.cat([negative, embeds])
            model_input = torch.cat([model_input, model_input])
            timesteps = torch.cat([timesteps, timesteps])
            if timestep_cond is not None:
                timestep_cond = torch.cat([timestep_cond, timestep_cond])
        noise_pred = self.unet(
            model_input,
            timesteps,
            encoder_hidden_states=embeds,
            timestep_cond=timestep_cond,
            return_dict=False,
        )[0]
        if self.guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + self.guidance_scale * (
                noise_pred_text - noise_pred_uncond
            )
            if self.guidance_rescale > 0.0:
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, self.guidance_rescale)
        return noise_pred.to(x.dtype)

    def to(self, device: str | torch.device) -> GuidedUNetDenoiser:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return GuidedUNetDenoiser(
            copy.deepcopy(self.unet).to(device),
            move(self.prompt_embeds),
            move(self.negative_prompt_embeds),
            self.guidance_scale,
            self.guidance_rescale,
            move(self.timestep_cond),
        )


def rescale_noise_cfg(
    noise_cfg: Tensor, noise_pred_text: Tensor, guidance_rescale: float
) -> Tensor:
    """Guidance rescale (Lin et al. 2023, section 3.4), per row, as diffusers computes it."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def stable_diffusion_problem(
    pipe: Any,
    prompt: str | list[str],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    noise: Tensor | None = None,
    eta: float = 0.0,
    guidance_rescale: float = 0.0,
    device: str | torch.device | None = None,
) -> DenoisingProblem:
    """The denoising problem ``StableDiffusionPipeline(prompt, ...)`` solves, in fp32 latents.

    ``latents`` (``[B, C, H/f, W/f]``, unscaled, as the pipeline takes them) and ``noise``
    (``[N, B, C, H/f, W/f]``) are optional; missing ones are drawn from ``generator`` in the
    pipeline's order. ``B = len(prompt) * num_images_per_prompt``.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings. Got {prompt!r}.")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(
            f"num_images_per_prompt must be a positive int. Got {num_images_per_prompt!r}."
        )
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    if height % factor or width % factor:
        raise ValueError(
            f"height={height} and width={width} must be multiples of the VAE's scale factor "
            f"{factor}; round them to a multiple of {factor}."
        )
    device = torch.device(device) if device is not None else pipe._execution_device
    check_identity_input_scaling(pipe.scheduler)
    with torch.no_grad():
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompts, device, num_images_per_prompt, guidance_scale > 1.0, negative_prompt
        )
    timestep_cond = None
    batch = len(prompts) * num_images_per_prompt
    if pipe.unet.config.time_cond_proj_dim is not None:
        scale = torch.tensor(guidance_scale - 1).repeat(batch)
        timestep_cond = pipe.get_guidance_scale_embedding(
            scale, embedding_dim=pipe.unet.config.time_cond_proj_dim
        ).to(device=device, dtype=prompt_embeds.dtype)
    denoiser = GuidedUNetDenoiser(
        pipe.unet,
        prompt_embeds,
        negative_prompt_embeds,
        guidance_scale,
        guidance_rescale,
        timestep_cond,
    )
    shape = (batch, pipe.unet.config.in_channels, height // factor, width // factor)
    x_T = None
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}, expected {shape} (batch = "
                f"{len(prompts)} prompts x {num_images_per_prompt} images, channels, H/{factor}, "
                f"W/{factor})."
            )
        x_T = latents.to(device=device, dtype=torch.float32) * pipe.scheduler.init_noise_sigma
    return DenoisingProblem.from_scheduler(
        pipe.scheduler,
        denoiser,
        num_inference_steps,
        shape,
        generator=generator,
        x_T=x_T,
        noise=noise,
        eta=eta,
        device=device,
    )


def decode_stable_diffusion(
    pipe: Any, latents: Tensor, output_type: str = "pil", generator: torch.Generator | None = None
):
    """Latents -> images as ``StableDiffusionPipeline`` decodes them (VAE, safety checker if the
    pipeline has one, ``image_processor.postprocess``); ``output_type="latent"`` returns them."""
    if output_type == "latent":
        return latents
    with torch.no_grad():
        vae_input = latents.to(model_dtype(pipe.vae)) / pipe.vae.config.scaling_factor
        image = pipe.vae.decode(vae_input, return_dict=False, generator=generator)[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, image.dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
    return pipe.image_processor.postprocess(
        image, output_type=output_type, do_denormalize=denormalize
    )
