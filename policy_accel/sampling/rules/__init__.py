"""Vectorised step rules for diffusers schedulers: one front door, :func:`rule_from_scheduler`."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from policy_accel.sampling.rules.base import (
    PREDICTION_TYPES,
    StepRule,
    UnsupportedSchedulerError,
    reference_scale,
)
from policy_accel.sampling.rules.ddim import DDIMRule, ddim_rule
from policy_accel.sampling.rules.ddpm import DDPMRule, ddpm_rule
from policy_accel.sampling.rules.dpm_solver import DPMSolverRule, dpm_solver_rule
from policy_accel.sampling.schedulers import SCHEDULERS

__all__ = [
    "PREDICTION_TYPES",
    "StepRule",
    "DDPMRule",
    "DDIMRule",
    "DPMSolverRule",
    "UnsupportedSchedulerError",
    "reference_scale",
    "rule_from_scheduler",
    "SUPPORTED_SCHEDULERS",
]

SUPPORTED_SCHEDULERS = tuple(cls.__name__ for cls in SCHEDULERS.values())
_CACHE: OrderedDict[str, StepRule] = OrderedDict()
_CACHE_SIZE = 64
# plans in several threads (the server's workers) build problems at once: the cache is shared
_CACHE_LOCK = threading.Lock()


def _config_key(scheduler, num_inference_steps: int, step_options: dict) -> str | None:
    config = dict(scheduler.config)
    if config.get("trained_betas") is not None:
        return None  # custom betas: not worth hashing, build every time
    try:
        return json.dumps(
            [type(scheduler).__name__, config, num_inference_steps, step_options],
            sort_keys=True,
            default=str,
        )
    except TypeError:
        return None


def rule_from_scheduler(
    scheduler,
    num_inference_steps: int,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
) -> StepRule:
    """The exact vectorised step rule of a diffusers scheduler for ``num_inference_steps``.

    ``eta`` and ``use_clipped_model_output`` are DDIM's ``step`` arguments. Rules are cached by
    scheduler configuration, so building a problem in a control loop costs no recomputation.
    Raises :class:`UnsupportedSchedulerError` for a scheduler or configuration that cannot be
    reproduced exactly, naming it.
    """
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise UnsupportedSchedulerError(
            f"{name} is not supported for parallel sampling. Supported schedulers: "
            f"{list(SUPPORTED_SCHEDULERS)} (build one with `Scheduler.from_config(your.config)`)."
        )
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise UnsupportedSchedulerError(
            f"{name} prediction_type={scheduler.config.prediction_type!r} is not supported: "
            "it must "
            f"be one of {list(PREDICTION_TYPES)}."
        )
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps must be a positive int. Got {num_inference_steps!r}."
        )
    if name != "DDIMScheduler" and (eta != 0.0 or use_clipped_model_output):
        raise ValueError(
            "eta and use_clipped_model_output are DDIMScheduler step options; "
            f"{name} takes neither."
        )
    options = {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
    key = _config_key(scheduler, num_inference_steps, options)
    with _CACHE_LOCK:
        if key is not None and key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    if name == "DDPMScheduler":
        rule = ddpm_rule(scheduler, num_inference_steps)
    elif name == "DDIMScheduler":
        rule = ddim_rule(scheduler, num_inference_steps, eta, use_clipped_model_output)
    else:
        rule = dpm_solver_rule(scheduler, num_inference_steps)
    # derived data computed now, once, rather than lazily by the first plan that needs it
    rule.linear_coefficient()
    rule.tolerance_scale()
    if key is not None:
        with _CACHE_LOCK:
            rule = _CACHE.setdefault(key, rule)
            _CACHE.move_to_end(key)
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return rule
