"""Helpers shared by the diffusers adapters."""

from __future__ import annotations

from typing import Any

import torch


def model_dtype(module: Any) -> torch.dtype:
    """The floating dtype a diffusers model runs in (its ``dtype``, else its first parameter's)."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


def check_identity_input_scaling(scheduler: Any) -> None:
    """Refuse a scheduler whose ``scale_model_input`` is not the identity.

    Pipelines call ``scheduler.scale_model_input(x, t)`` before the model. For DDPM, DDIM and
    DPM-Solver++ (the schedulers the engine supports) it returns ``x`` unchanged, so the denoiser
    skips it; a scheduler that rescales (Euler, Heun, ...) would need the scaling inside the
    denoiser, and its step rule is not supported anyway.
    """
    probe = torch.linspace(-1.0, 1.0, 8)
    timestep = getattr(scheduler, "timesteps", None)
    timestep = timestep[0] if timestep is not None and len(timestep) else 0
    try:
        scaled = scheduler.scale_model_input(probe, timestep)
    except Exception as error:  # stateful schedulers may need set_timesteps first
        raise ValueError(
            f"{type(scheduler).__name__}.scale_model_input could not be checked ({error}); use "
            "DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler."
        ) from error
    if not torch.equal(scaled, probe):
        raise ValueError(
            f"{type(scheduler).__name__} rescales the model input (scale_model_input is not the "
            "identity), which the adapters do not reproduce; use DDPMScheduler, DDIMScheduler or "
            "DPMSolverMultistepScheduler."
        )
