"""Names of the simulated tasks and how to build them.

Modules are imported only when their task is made, so PushT never imports robosuite and vice versa.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym


@dataclass(frozen=True)
class EnvSpec:
    """One task: ``factory`` and ``expert`` are ``"module:attribute"`` strings."""

    name: str
    factory: str
    obs_modes: tuple[str, ...]
    default_obs: str
    expert: str
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, EnvSpec] = {}


def register(spec: EnvSpec) -> None:
    if spec.default_obs not in spec.obs_modes:
        raise ValueError(f"{spec.name}: default obs {spec.default_obs!r} not in {spec.obs_modes}")
    _REGISTRY[spec.name] = spec


def names() -> list[str]:
    """Every task :func:`make` accepts."""
    return sorted(_REGISTRY)


def spec(name: str) -> EnvSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"Unknown env {name!r}; known envs: {', '.join(names())}.") from None


def _resolve(target: str) -> Any:
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def make(name: str, obs: str | None = None, **kwargs: Any) -> gym.Env:
    """A gymnasium env for task ``name`` with observation mode ``obs`` (the task's default when
    omitted); ``kwargs`` go to the task's constructor (e.g. ``legacy_seeds=True`` for PushT)."""
    task = spec(name)
    obs = task.default_obs if obs is None else obs
    if obs not in task.obs_modes:
        raise ValueError(
            f"{name} has no observation mode {obs!r}; choose one of {', '.join(task.obs_modes)}."
        )
    return _resolve(task.factory)(obs=obs, **{**task.kwargs, **kwargs})


def make_expert(name: str, env: gym.Env, seed: int | None = None) -> Any:
    """The scripted expert for task ``name``, acting in ``env`` (it reads the simulator state)."""
    return _resolve(spec(name).expert)(env, seed=seed)


register(
    EnvSpec(
        name="pusht",
        factory="envs.pusht:PushTEnv",
        obs_modes=("keypoints", "image", "state"),
        default_obs="keypoints",
        expert="envs.experts.pusht:PushTExpert",
        description="Push a T-shaped block onto a target pose (gym-pusht physics, 10 Hz).",
    )
)
for _task, _text in (
    ("lift", "Lift a cube from the table (robosuite Panda, OSC_POSE, 20 Hz)."),
    ("can", "Pick a can and place it in its bin (robosuite Panda, OSC_POSE, 20 Hz)."),
    ("square", "Fit a square nut onto its peg (robosuite Panda, OSC_POSE, 20 Hz)."),
):
    register(
        EnvSpec(
            name=f"robomimic/{_task}",
            factory="envs.robomimic:RobomimicEnv",
            obs_modes=("lowdim", "image"),
            default_obs="lowdim",
            expert=f"envs.experts.robomimic:{_task.capitalize()}Expert",
            description=_text,
            kwargs={"task": _task},
        )
    )
