"""How a controller samples: one frozen, validated configuration for every layer.

:class:`SamplerConfig` is what ``Controller``, ``BatchController``, the server, ``eval`` and
``bench`` take (the CLI fills it from a hydra ``sampler/`` YAML): the solver and its options, the
warm start, the per-replan budget and its fallback, the executor, and the scheduler and number
of inference steps (``scheduler="ddim", num_inference_steps=10`` is what most DiffusionPolicy
users run instead of DDPM-100: ``sampler=ddim10``). Invalid settings fail when the config is
built, naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policy_accel.execution import ExecutorConfig
from policy_accel.sampling.errors import SolverOptionError
from policy_accel.sampling.sample import option_names, solver_options
from policy_accel.sampling.schedulers import scheduler_name
from policy_accel.sampling.solvers import SOLVERS
from policy_accel.sampling.warm_start import SPACES

WARM_NOISE = ("fresh", "shifted")


@dataclass(frozen=True)
class SamplerConfig:
    """Attributes:
    method: a solver (``sequential``, ``picard``, ``paradigms``, ``taa``, ``srds``, ``newton``,
        ``chord``).
    options: the solver's options (``tolerance``, ``window``, ``max_rounds``, ...).
    warm_start: start each row's next replan from its previous solution, shifted by the
        executed actions (see :mod:`policy_accel.control.planner`).
    warm_noise: ``"fresh"`` (default): every replan draws new noise, as the sequential sampler
        does, so warm-started chunks are the very samples a cold sampler with the same seed
        draws; ``"shifted"``: reuse the previous replan's noise shifted by the executed actions,
        a fresh tail (consecutive chunks then share noise on their overlap; on PushT's 50 test
        seeds this cost success, 74% against 92% with sequential sampling either way).
    warm_space: ``"prediction"`` (recommended) or ``"trajectory"``, see
        :func:`~policy_accel.sampling.warm_start.warm_start_guess`.
    budget_ms: per-replan time budget: no solver round starts after it, and the best chunk so
        far is returned flagged ``deadline_hit``; ``None``: no deadline.
    fallback_steps: when the budget is missed, re-plan sequentially with ``fallback_scheduler``
        at this many steps from the same initial noise (a cheaper sampler of known cost).
    fallback_scheduler: the fallback's scheduler (registry name, default ``ddim``).
    scheduler: sample with this scheduler instead of the checkpoint's (``ddpm``, ``ddim``,
        ``dpm_solver``; built from the checkpoint's training schedule); ``None``: the policy's.
    num_inference_steps: solver steps (``None``: the policy's own).
    executor: where the denoiser runs (default: the policy's device).
    jacobian_stride: with ``method="chord"`` and the warm start, measure the model Jacobians
        of every ``jacobian_stride``-th step at each converged replan *off the critical path*
        (a background thread, started once the chunk is returned) and start the row's next
        replan from them, shifted by the executed actions; a replan never waits for it (an
        unfinished refresh is dropped). ``None``: no estimate (chord's secant updates only).
    name: a label for tables and files (default: ``method`` plus ``_warm``).
    """

    method: str = "chord"
    options: Mapping[str, Any] = field(default_factory=dict)
    warm_start: bool = True
    warm_noise: str = "fresh"
    warm_space: str = "prediction"
    budget_ms: float | None = None
    fallback_steps: int | None = None
    fallback_scheduler: str = "ddim"
    scheduler: str | None = None
    num_inference_steps: int | None = None
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    jacobian_stride: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(SOLVERS)}.")
        options = dict(self.options or {})
        if "deadline" in options:
            raise ValueError("set budget_ms, not the solver's deadline: it is set per replan.")
        solver_options(self.method, **options)  # unknown options and bad values fail now
        object.__setattr__(self, "options", options)
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be true or false. Got {self.warm_start!r}.")
        if self.warm_space not in SPACES:
            raise ValueError(f"warm_space must be one of {list(SPACES)}. Got {self.warm_space!r}.")
        if self.warm_noise not in WARM_NOISE:
            raise ValueError(
                f"warm_noise must be one of {list(WARM_NOISE)}. Got {self.warm_noise!r}."
            )
        if self.warm_noise == "fresh" and self.warm_space == "trajectory":
            raise ValueError(
                "warm_space='trajectory' reuses the previous trajectory, which only fits the "
                "previous noise: use warm_noise='shifted' with it, or warm_space='prediction'."
            )
        if self.budget_ms is not None and not (
            isinstance(self.budget_ms, (int, float)) and self.budget_ms > 0
        ):
            raise ValueError(f"budget_ms must be positive or None. Got {self.budget_ms!r}.")
        if self.method == "sequential" and self.budget_ms is not None:
            raise ValueError(
                "the sequential sampler cannot stop early: use a parallel method with budget_ms."
            )
        if self.fallback_steps is not None:
            if self.budget_ms is None:
                raise ValueError("fallback_steps only applies with a budget_ms.")
            _positive_int(self.fallback_steps, "fallback_steps")
        scheduler_name(self.fallback_scheduler)
        if self.scheduler is not None:
            scheduler_name(self.scheduler)
        if self.num_inference_steps is not None:
            _positive_int(self.num_inference_steps, "num_inference_steps")
        if self.jacobian_stride is not None:
            _positive_int(self.jacobian_stride, "jacobian_stride")
            if self.method != "chord":
                raise ValueError(
                    f"jacobian_stride applies to method='chord' only. Got method={self.method!r}."
                )
        if isinstance(self.executor, Mapping):
            object.__setattr__(self, "executor", ExecutorConfig(**self.executor))
        if not isinstance(self.executor, ExecutorConfig):
            raise ValueError(f"executor must be an ExecutorConfig. Got {self.executor!r}.")

    @classmethod
    def from_settings(cls, sampler: SamplerConfig | None = None, **settings: Any) -> SamplerConfig:
        """``sampler`` (default: the defaults) with ``settings`` replaced: names of this class'
        fields set them, any other name is a solver option (``tolerance=1e-4``). Changing the
        method drops the base's solver options (they belong to its method)."""
        base = sampler if sampler is not None else cls()
        fields = [f.name for f in dataclasses.fields(cls)]
        own = {k: v for k, v in settings.items() if k in fields}
        method = own.get("method", base.method)
        rest = {k: v for k, v in settings.items() if k not in fields}
        if method in SOLVERS:  # an unknown method is refused below, naming the methods
            _check_setting_names(rest, fields, method)
        options = dict(base.options) if method == base.method else {}
        options.update(own.pop("options", None) or {})
        options.update(rest)
        return dataclasses.replace(base, **own, options=options)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], name: str | None = None) -> SamplerConfig:
        """A config from plain data (a ``sampler/`` YAML); unknown keys are refused, listed."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"unknown sampler setting(s) {unknown}{f' in {name}' if name else ''}; "
                f"expected some of {sorted(fields)}."
            )
        values = dict(values)
        if name is not None and values.get("name") is None:
            values["name"] = name
        if isinstance(values.get("executor"), Mapping):
            values["executor"] = ExecutorConfig(**values["executor"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON reports and YAML files)."""
        values = dataclasses.asdict(self)
        values["options"] = dict(self.options)
        return values

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        steps = f"_{self.scheduler or ''}{self.num_inference_steps or ''}"
        return f"{self.method}{steps if steps != '_' else ''}{'_warm' if self.warm_start else ''}"

    def solver_options(self, deadline: float | None = None) -> dict[str, Any]:
        """The solver's keyword options for one replan (``deadline`` from the budget)."""
        options = dict(self.options)
        if deadline is not None:
            options["deadline"] = deadline
        return options


def _check_setting_names(names: Mapping[str, Any], fields: list[str], method: str) -> None:
    """Refuse ``names`` that are neither ``SamplerConfig`` fields nor options of ``method``,
    listing both and the closest valid name (``budget_msec`` -> ``budget_ms``)."""
    options = option_names(method)
    unknown = sorted(set(names) - set(options))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, [*fields, *options], n=1)
        if close:
            hints.append(f"{name!r}: did you mean {close[0]!r}?")
    raise SolverOptionError(
        f"unknown option(s) {unknown}: neither SamplerConfig fields nor options of method "
        f"{method!r}. {' '.join(hints) + ' ' if hints else ''}SamplerConfig fields: {fields}; "
        f"options of {method!r}: {options or 'none'}."
    )


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None. Got {value!r}.")
