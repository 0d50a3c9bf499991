"""Our solvers vs diffusers' own ParaDiGMS pipeline vs the sequential pipeline, same latents.

``StableDiffusionParadigmsPipeline`` (Shih et al. 2023, deprecated in diffusers) runs Picard
iterations on the cumulative drift with diffusers' parallel schedulers (``DDPMParallelScheduler``,
``DDIMParallelScheduler``). :func:`compare_with_paradigms` runs, from the same components,
generator seed and scheduler configuration:

- the sequential ``StableDiffusionPipeline`` (the reference),
- ``StableDiffusionParadigmsPipeline`` with the matching parallel scheduler, and
- our :func:`~policy_accel.adapters.generate` with each requested method,

and returns each one's maximum and RMS difference from the reference latents, its rounds
(sequential batched UNet calls) and model evaluations (UNet rows per sample, guidance halves
counted once). The parallel schedulers do not reproduce every sequential configuration (DDIM's
last step with ``set_alpha_to_one=False``, strides under ``trailing`` spacing, DDIM with
``eta > 0`` treated as an ODE): this harness measures by how much.
"""

from __future__ import annotations

from typing import Any

import torch

from policy_accel.adapters.generate import generate

PARALLEL_SCHEDULERS = {
    "DDPMScheduler": "DDPMParallelScheduler",
    "DDIMScheduler": "DDIMParallelScheduler",
}


class CallCounter:
    """A forward hook counting a module's calls and the rows it was given."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls, self.rows = 0, 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def remove(self) -> None:
        self.handle.remove()


def _run_pipeline(pipeline: Any, call: dict) -> tuple[torch.Tensor, int, int]:
    counter = CallCounter(pipeline.unet)
    try:
        latents = pipeline(**call).images
    finally:
        counter.remove()
    return latents.float(), counter.calls, counter.rows


def compare_with_paradigms(
    pipe: Any,
    prompt: str | list[str],
    scheduler: Any,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
    methods: tuple[str, ...] = ("picard", "taa"),
    tolerance: float = 0.0,
    paradigms_tolerance: float = 1e-4,
    paradigms_parallel: int | None = None,
) -> dict[str, dict]:
    """Run the three samplers on ``pipe``'s components with ``scheduler`` (a DDPM or DDIM
    scheduler; its config also builds the parallel one) and compare their latents.

    Returns ``{name: {"max_abs", "rms", "reference_rms", "rounds", "model_evals"}}`` for
    ``"sequential"``, ``"paradigms_diffusers"`` and each method, differences against
    ``"sequential"``; where diffusers' pipeline refuses the configuration (it asserts ``eta == 0``
    for DDIM) its entry is ``{"error": ...}``.
    """
    import diffusers
    from diffusers import StableDiffusionParadigmsPipeline, StableDiffusionPipeline

    name = type(scheduler).__name__
    if name not in PARALLEL_SCHEDULERS:
        raise ValueError(
            f"diffusers has parallel schedulers for {sorted(PARALLEL_SCHEDULERS)} only. Got {name}."
        )
    components = {
        key: pipe.components[key]
        for key in (
            "vae",
            "text_encoder",
            "tokenizer",
            "unet",
            "safety_checker",
            "feature_extractor",
        )
    }
    components["requires_safety_checker"] = False
    sequential = StableDiffusionPipeline(**components, scheduler=scheduler)
    # built after the sequential pipeline, whose constructor may rewrite legacy scheduler configs
    # (clip_sample=True -> False, steps_offset -> 1), so both samplers see the same configuration
    # (and drop `_use_default_values`: from_config would reset a rewritten default to its default)
    config = {k: v for k, v in sequential.scheduler.config.items() if k != "_use_default_values"}
    parallel_scheduler = getattr(diffusers, PARALLEL_SCHEDULERS[name]).from_config(config)
    paradigms = StableDiffusionParadigmsPipeline(**components, scheduler=parallel_scheduler)
    for pipeline in (sequential, paradigms):
        pipeline.set_progress_bar_config(disable=True)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    call = dict(
        prompt=prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        output_type="latent",
    )

    def rows_per_sample(rows: int) -> int:
        return rows // (batch * (2 if guidance_scale > 1 else 1))

    reference, calls, rows = _run_pipeline(
        sequential, {**call, "generator": torch.Generator().manual_seed(seed)}
    )
    report = {"sequential": _entry(reference, reference, calls, rows_per_sample(rows))}
    try:
        latents, calls, rows = _run_pipeline(
            paradigms,
            {
                **call,
                "generator": torch.Generator().manual_seed(seed),
                "parallel": paradigms_parallel or num_inference_steps,
                "tolerance": paradigms_tolerance,
            },
        )
        report["paradigms_diffusers"] = _entry(latents, reference, calls, rows_per_sample(rows))
    except AssertionError as error:  # e.g. DDIMParallelScheduler asserts eta == 0
        where = error.__traceback__
        while where.tb_next is not None:
            where = where.tb_next
        code = where.tb_frame.f_code
        report["paradigms_diffusers"] = {
            "error": f"AssertionError in {code.co_name} ({code.co_filename.split('/')[-1]}) "
            f"{error}".strip()
        }
    for method in methods:
        options = {} if method == "sequential" else {"tolerance": tolerance}
        latents, result = generate(
            sequential,
            prompt,
            method,
            num_inference_steps,
            guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            eta=eta,
            output_type="latent",
            **options,
        )
        report[method] = _entry(latents, reference, result.rounds, result.model_evals // batch)
    return report


def _entry(latents: torch.Tensor, reference: torch.Tensor, rounds: int, evals: int) -> dict:
    difference = (latents.float() - reference.float()).flatten()
    return {
        "max_abs": float(difference.abs().max()),
        "rms": float(difference.pow(2).mean().sqrt()),
        "reference_rms": float(reference.float().pow(2).mean().sqrt()),
        "rounds": int(rounds),
        "model_evals": int(evals),
    }
