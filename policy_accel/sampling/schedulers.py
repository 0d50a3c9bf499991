"""The diffusers schedulers policy_accel reproduces exactly: one registry for every layer.

Checkpoints name schedulers by class (``DDPMScheduler``, DiffusionPolicy's hydra targets) or by
LeRobot's short type (``DDPM``); sampler configs by a short name (``ddim``). All resolve here, and
:func:`scheduler_like` swaps a policy's scheduler for another one with the same training schedule
(betas, prediction type, clipping), as DiffusionPolicy users swap DDPM for DDIM at inference.
"""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

SCHEDULERS: dict[str, type] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
}
# other spellings of the same classes: the class name and LeRobot's noise_scheduler_type
ALIASES = {cls.__name__: name for name, cls in SCHEDULERS.items()}
ALIASES.update({"DDPM": "ddpm", "DDIM": "ddim"})


def scheduler_name(name: str) -> str:
    """The registry name for ``name`` (``ddim``, ``DDIMScheduler`` or ``DDIM``); raises
    ``ValueError`` listing the valid names."""
    if name in SCHEDULERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(
        f"scheduler {str(name)[:60]!r} is not supported; choose one of {sorted(SCHEDULERS)} "
        f"(or a class name: {sorted(cls.__name__ for cls in SCHEDULERS.values())})."
    )


def scheduler_class(name: str) -> type:
    return SCHEDULERS[scheduler_name(name)]


def build_scheduler(name: str, **config: Any):
    """A new scheduler of registry ``name`` with ``config`` (its constructor's arguments)."""
    return scheduler_class(name)(**config)


def scheduler_like(scheduler, name: str | None):
    """``scheduler`` itself when ``name`` is None or names its class, else a scheduler of class
    ``name`` built from its config (the same betas, prediction type and clipping)."""
    if name is None:
        return scheduler
    cls = scheduler_class(name)
    if type(scheduler) is cls:
        return scheduler
    return cls.from_config(scheduler.config)
