"""Typed configuration of ``policy-accel eval`` (the CLI fills it from hydra; the library never
imports hydra)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from policy_accel.control.config import SamplerConfig
from policy_accel.control.runtime import MERGES, TRANSITIONS

__all__ = [
    "EnvConfig",
    "EvalConfig",
    "EvalSettings",
    "PolicyConfig",
    "RuntimeConfig",
    "SamplerConfig",
    "eval_config_from_dict",
]


@dataclass
class PolicyConfig:
    path: str = "checkpoints/pusht_keypoints"
    device: str = "cpu"


@dataclass
class EnvConfig:
    name: str = "pusht"
    obs: str | None = "keypoints"
    first_seed: int = 100000
    max_episode_steps: int | None = 300
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RuntimeConfig:
    inference_delay_steps: int | str = 0
    transition: str = "naive"  # "inpaint": the replan continues the actions it is committed to;
    # "soft_inpaint": and follows the rest of the old chunk softly (RTC's prefix schedule)
    merge: str = "latest"  # or "average": the new chunk's overlap with the old one is averaged
    merge_weight: float = 0.5  # the new chunk's weight in "average" merges
    n_action_steps: int | None = None  # actions executed per replan (None: the checkpoint's)
    control_hz: float = 10.0
    threads: int = 1
    vector: str = "async"


@dataclass
class EvalSettings:
    n_episodes: int = 50
    batch_size: int = 10
    n_videos: int = 0
    noise_seed: int = 0
    compare: list[str] = field(default_factory=list)
    name: str | None = None
    output_dir: str = "outputs/eval"


@dataclass
class EvalConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    compare_samplers: list[SamplerConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        delay = self.runtime.inference_delay_steps
        if delay != "auto" and not (isinstance(delay, int) and delay >= 0):
            raise ValueError(
                f"runtime.inference_delay_steps must be a non-negative int or 'auto', got {delay!r}"
            )
        if self.runtime.transition not in TRANSITIONS:
            raise ValueError(
                f"runtime.transition must be one of {list(TRANSITIONS)}, got "
                f"{self.runtime.transition!r}"
            )
        if self.runtime.merge not in MERGES:
            raise ValueError(
                f"runtime.merge must be one of {list(MERGES)}, got {self.runtime.merge!r}"
            )
        if not 0.0 < self.runtime.merge_weight <= 1.0:
            raise ValueError(
                f"runtime.merge_weight must be in (0, 1], got {self.runtime.merge_weight!r}"
            )
        steps = self.runtime.n_action_steps
        if steps is not None and not (isinstance(steps, int) and steps >= 1):
            raise ValueError(
                f"runtime.n_action_steps must be a positive int or null, got {steps!r}"
            )
        if self.runtime.vector not in ("async", "sync"):
            raise ValueError(
                f"runtime.vector must be 'async' or 'sync', got {self.runtime.vector!r}"
            )
        if self.eval.n_episodes < 1 or self.eval.batch_size < 1:
            raise ValueError("eval.n_episodes and eval.batch_size must be >= 1")


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; expected some of {sorted(known)}")
    return cls(**values)


def eval_config_from_dict(values: dict[str, Any], samplers: dict[str, dict] | None = None):
    """An :class:`EvalConfig` from plain nested dicts (a resolved hydra config); ``samplers``
    maps the names in ``eval.compare`` to their sampler dicts."""
    values = dict(values)
    compare = []
    for name in values.get("eval", {}).get("compare", []) or []:
        if samplers is None or name not in samplers:
            raise ValueError(f"eval.compare names sampler {name!r}, which has no config")
        compare.append(SamplerConfig.from_dict(samplers[name], name=name))
    return EvalConfig(
        policy=_build(PolicyConfig, values.get("policy", {}), "policy"),
        env=_build(EnvConfig, values.get("env", {}), "env"),
        sampler=SamplerConfig.from_dict(values.get("sampler", {})),
        runtime=_build(RuntimeConfig, values.get("runtime", {}), "runtime"),
        eval=_build(EvalSettings, values.get("eval", {}), "eval"),
        compare_samplers=compare,
    )
