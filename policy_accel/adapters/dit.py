"""DiT (diffusers ``DiTPipeline``; Peebles & Xie 2023) -> :class:`DenoisingProblem`.

Class-conditional latent diffusion with a transformer. Classifier-free guidance follows
``DiTPipeline.__call__`` exactly: one batch ``[cond rows; null-class rows]`` (the null class is
1000), guidance ``uncond + s * (cond - uncond)`` applied to the first ``latent_channels`` output
channels (the epsilon part), and with a learned-sigma model (``out_channels = 2 *
latent_channels``) only the epsilon channels are the model output.

Noise: ``DiTPipeline`` draws its latents from ``generator`` but calls ``scheduler.step`` without
it, so DDPM's per-step noise comes from torch's global generator, with the shape of the guided
batch. :func:`dit_pipeline_noise` draws it that way, to reproduce the pipeline's DDPM samples;
by default the problem draws all noise from ``generator`` (deterministic samplers are unaffected).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from policy_accel.adapters.common import check_identity_input_scaling, model_dtype
from policy_accel.sampling import DenoisingProblem, rule_from_scheduler
from policy_accel.sampling.problem import noise_from_draws

NULL_CLASS = 1000


class GuidedDiTDenoiser:
    """``eps(x, t)`` of a class-conditional DiT transformer with classifier-free guidance.

    ``x`` is a flat batch of ``P*B`` rows (window position major); the ``B`` class labels are
    tiled ``P`` times. ``to(device)`` returns a replica (for multi-device executors).
    """

    def __init__(self, transformer: Any, class_labels: Tensor, guidance_scale: float) -> None:
        self.transformer = transformer
        self.class_labels = class_labels
        self.guidance_scale = float(guidance_scale)
        self.batch = int(class_labels.shape[0])
        self.latent_channels = int(transformer.config.in_channels)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] % self.batch:
            raise ValueError(
                f"the denoiser got {x.shape[0]} rows, not a multiple of the batch size "
                f"{self.batch}."
            )
        rows, channels = x.shape[0], self.latent_channels
        labels = self.class_labels.repeat(rows // self.batch)
        model_input, timesteps = x.to(model_dtype(self.transformer)), t.to(torch.int64)
        if self.guided:
            model_input = torch.cat([model_input, model_input])
            timesteps = torch.cat([timesteps, timesteps])
            labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
        noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample
        if self.guided:
            eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + self.guidance_scale * (cond_eps - uncond_eps)
            noise_pred = torch.cat([half_eps, rest[:rows]], dim=1)
        if self.transformer.config.out_channels // 2 == channels:
            noise_pred = noise_pred[:, :channels]
        return noise_pred.to(x.dtype)

    def to(self, device: str | torch.device) -> GuidedDiTDenoiser:
        return GuidedDiTDenoiser(
            copy.deepcopy(self.transformer).to(device),
            self.class_labels.to(device),
            self.guidance_scale,
        )


def class_label_tensor(pipe: Any, class_labels, num_images_per_prompt: int, device) -> Tensor:
    """Class ids (ints, or label words the pipeline knows) -> ``[B]`` int64, validated."""
    labels = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
    if not labels:
        raise ValueError("class_labels is empty; pass at least one ImageNet class id (0..999).")
    if all(isinstance(label, str) for label in labels):
        labels = pipe.get_label_ids(labels)
    num_classes = pipe.transformer.config.num_embeds_ada_norm or NULL_CLASS
    bad = [label for label in labels if not isinstance(label, int) or not 0 <= label < num_classes]
    if bad:
        raise ValueError(
            f"class_labels {bad} are not class ids in [0, {num_classes}) (the null class "
            f"{NULL_CLASS} is added by guidance); pass ints or label words in pipe.labels."
        )
    ids = torch.tensor(labels, dtype=torch.int64, device=device)
    return ids.repeat_interleave(num_images_per_prompt)


def dit_problem(
    pipe: Any,
    class_labels,
    num_inference_steps: int = 50,
    guidance_scale: float = 4.0,
    num_images_per_prompt: int = 1,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    noise: Tensor | None = None,
    eta: float = 0.0,
    device: str | torch.device | None = None,
) -> DenoisingProblem:
    """The denoising problem ``DiTPipeline(class_labels, ...)`` solves, in fp32 latents.

    ``latents`` are ``[B, C, S, S]`` (``S = transformer.config.sample_size``), used unscaled as the
    pipeline uses them; missing ones are drawn from ``generator``, then the step noise (see the
    module docstring for DDPM and :func:`dit_pipeline_noise`).
    """
    device = torch.device(device) if device is not None else pipe._execution_device
    check_identity_input_scaling(pipe.scheduler)
    labels = class_label_tensor(pipe, class_labels, num_images_per_prompt, device)
    config = pipe.transformer.config
    shape = (labels.shape[0], config.in_channels, config.sample_size, config.sample_size)
    if latents is None:
        source = generator.device if generator is not None else device
        latents = torch.randn(shape, generator=generator, device=source, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(
            f"latents has shape {tuple(latents.shape)}, expected {shape} (one per class label "
            "and image, transformer.config.in_channels, sample_size, sample_size)."
        )
    return DenoisingProblem.from_scheduler(
        pipe.scheduler,
        GuidedDiTDenoiser(pipe.transformer, labels, guidance_scale),
        num_inference_steps,
        shape,
        generator=generator,
        x_T=latents.to(device=device, dtype=torch.float32),
        noise=noise,
        eta=eta,
        device=device,
    )


def dit_pipeline_noise(
    pipe: Any, num_inference_steps: int, batch_size: int, guidance_scale: float, eta: float = 0.0
) -> Tensor:
    """Per-step noise ``[N, B, C, S, S]`` drawn as ``DiTPipeline`` draws it: from torch's global
    generator (seed it with ``torch.manual_seed`` as before the pipeline call), one tensor of the
    guided batch's shape (``2B`` rows with guidance) per noise-drawing step, of which the
    pipeline keeps the first ``B`` rows."""
    config = pipe.transformer.config
    rule = rule_from_scheduler(pipe.scheduler, num_inference_steps, eta, False)
    rows = 2 * batch_size if guidance_scale > 1 else batch_size
    event = (config.in_channels, config.sample_size, config.sample_size)
    count = int(rule.draws_noise.sum())
    draws = [torch.randn((rows, *event))[:batch_size] for _ in range(count)]
    stacked = torch.stack(draws) if draws else torch.zeros((0, batch_size, *event))
    return noise_from_draws(rule, stacked)


def decode_dit(pipe: Any, latents: Tensor, output_type: str = "pil"):
    """Latents -> images as ``DiTPipeline`` decodes them; ``output_type="latent"`` returns them."""
    if output_type == "latent":
        return latents
    with torch.no_grad():
        vae_input = latents.to(model_dtype(pipe.vae)) / pipe.vae.config.scaling_factor
        samples = pipe.vae.decode(vae_input).sample
    samples = (samples / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return samples
    samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(samples) if output_type == "pil" else samples
