"""Validating observations: one step before it enters a history, a batch of histories before it
conditions a sample. Every refusal is an :class:`ObservationError` naming the key, what was
expected and what to do."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from policy_accel.messages import preview, shorten


class ObservationError(ValueError):
    """An observation with a wrong key, shape, dtype, a non-finite value or a value far outside
    what the policy can take."""


# The bound on observations. A value is refused when it lies more than OBSERVATION_RANGE_MARGIN
# training ranges outside the range the policy was trained on (per dimension, in normalized
# units; a range narrower than MIN_RANGE_WIDTH normalized units counts as that wide): with
# DiffusionPolicy's limits normalization ([-1, 1] over the training data) that is [-21, 21].
# Such values are sensor faults or unit mistakes (metres for millimetres), and the policy answers
# them with actions at its workspace's edge (PushT keypoints of 404,032 px, 1,100 ranges out, were
# served before this bound). The margin is wide because a policy trained on few demonstrations
# meets states well outside them in a failing episode (a one-demonstration PushT policy saw
# keypoints 6 of its ranges out inside the 512 px workspace), and those must still be served.
# Where a checkpoint does not record its range (mean/std normalization), normalized magnitudes
# above MAX_NORMALIZED_MAGNITUDE are refused.
OBSERVATION_RANGE_MARGIN = 10.0
MIN_RANGE_WIDTH = 2.0
MAX_NORMALIZED_MAGNITUDE = 100.0
OUT_OF_RANGE_MODES = ("refuse", "accept")
IMAGE_RANGE_SLACK = 1e-3


def describe_spec(spec: dict[str, tuple[int, ...]]) -> str:
    """``{'obs': shape (20,)}``: a spec for an error message (a few keys, then the count)."""
    parts = [f"{shorten(repr(key))}: shape {tuple(shape)}" for key, shape in list(spec.items())[:5]]
    more = f", ... ({len(spec)} keys)" if len(spec) > 5 else ""
    return "{" + ", ".join(parts) + more + "}"


def _as_real_array(value: Any, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as a numpy array of a real number type (not bool, complex, object or text)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    elif not isinstance(value, (np.ndarray, np.generic)):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise ObservationError(
                f"obs[{key!r}] is a {type(value).__name__} that is not an array ({error}); "
                f"expected a float array of shape {tuple(shape)}."
            ) from error
    value = np.asarray(value)
    if value.dtype.kind not in "fiu":
        raise ObservationError(
            f"obs[{key!r}] has dtype {value.dtype}; expected a real number array of shape "
            f"{tuple(shape)} (float32 preferred)."
        )
    return value


def check_observation_step(policy, obs: Any, out_of_range: str = "refuse") -> dict[str, np.ndarray]:
    """One observation step (what an env returns), validated before it enters any history:
    every key of :attr:`observation_spec` with exactly its shape, a real number type, finite,
    images in ``[0, 1]`` and other values within the bound around the training range (module
    constants; ``out_of_range="accept"`` skips that bound, :func:`out_of_range_keys` then says
    what lies outside). Returns float32 copies of those keys (other keys are dropped); raises
    :class:`ObservationError` naming the key, what was expected and what to do."""
    if out_of_range not in OUT_OF_RANGE_MODES:
        raise ValueError(
            f"out_of_range must be one of {list(OUT_OF_RANGE_MODES)}. Got {out_of_range!r}."
        )
    spec = policy.observation_spec
    if not isinstance(obs, dict):
        if len(spec) != 1:
            raise ObservationError(
                f"this policy takes a dict observation with keys {preview(list(spec))}; got a "
                f"{type(obs).__name__}."
            )
        obs = {next(iter(spec)): obs}
    obs = policy.rename_observation(obs)
    missing = [key for key in spec if key not in obs]
    if missing:
        raise ObservationError(
            f"obs is missing key(s) {preview(missing)}; this policy takes one step of "
            f"{describe_spec(spec)}."
        )
    checked = {}
    for key, shape in spec.items():
        value = _as_real_array(obs[key], key, shape)
        if value.shape != tuple(shape):
            raise ObservationError(
                f"obs[{key!r}] has shape {value.shape}, expected {tuple(shape)} (one "
                f"observation step: the n_obs_steps={policy.n_obs_steps} history is kept for "
                "you)."
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow: Inf, refused below
            value = value.astype(np.float32)  # a copy, never the caller's buffer
        if not np.isfinite(value).all():
            raise ObservationError(
                f"obs[{key!r}] contains NaN or Inf (after conversion to float32)."
            )
        if key in policy.image_keys:
            _check_image(key, value)
        elif out_of_range == "refuse":
            problem = _outside(policy, key, value)
            if problem is not None:
                raise ObservationError(
                    f"{problem}: a sensor fault or a unit mistake? Check the observation's "
                    "units against the policy's (a server started with out_of_range='flag' "
                    "serves it and says so in the reply)."
                )
        checked[key] = value
    return checked


def out_of_range_keys(policy, step: dict[str, np.ndarray]) -> dict[str, str]:
    """The keys of a checked observation step outside the bound around the training range,
    each with what lies where (empty when all are within)."""
    found = {}
    for key, value in step.items():
        if key not in policy.image_keys:
            problem = _outside(policy, key, value)
            if problem is not None:
                found[key] = problem
    return found


def _check_image(key: str, value: np.ndarray) -> None:
    low, high = float(value.min(initial=0.0)), float(value.max(initial=0.0))
    if low < -IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
        raise ObservationError(
            f"obs[{key!r}] is an image with values in [{low:g}, {high:g}]; expected "
            "floats in [0, 1] (divide uint8 images by 255)."
        )


def _outside(policy, key: str, value: np.ndarray) -> str | None:
    """What of ``value`` lies outside the bound around ``key``'s training range, or None."""
    with torch.no_grad():
        normalized = policy.normalize_input(key, torch.from_numpy(value).to(policy.device))
        if normalized is None or not normalized.numel():
            return None
        known = _training_range(policy, key)
        if known is None:
            magnitude = float(normalized.abs().max())
            if magnitude <= MAX_NORMALIZED_MAGNITUDE:
                return None
            return (
                f"obs[{key!r}] reaches {magnitude:.3g} normalized units (at most "
                f"{MAX_NORMALIZED_MAGNITUDE:g} accepted; this checkpoint records no training range)"
            )
        low, high = (bound.to(normalized.device).expand_as(normalized) for bound in known)
        margin = OBSERVATION_RANGE_MARGIN * (high - low).clamp(min=MIN_RANGE_WIDTH)
        excess = torch.maximum(low - margin - normalized, normalized - high - margin)
        if not bool((excess > 0).any()):
            return None
        flat = int(excess.argmax())
        index = np.unravel_index(flat, tuple(normalized.shape))
        scale = (normalized.reshape(-1)[flat] - low.reshape(-1)[flat]) / (
            high.reshape(-1)[flat] - low.reshape(-1)[flat]
        ).clamp(min=1e-12)
    where = f"[{', '.join(map(str, index))}]" if normalized.dim() else ""
    return (
        f"obs[{key!r}]{where} = {float(value[index]):.6g} lies at {float(scale):.3g} of the "
        f"range this policy was trained on (0 and 1 are the range's ends; "
        f"{-OBSERVATION_RANGE_MARGIN:g} to {1 + OBSERVATION_RANGE_MARGIN:g} accepted)"
    )


def observation_tensor(policy, obs: dict, key: str, shape: tuple[int, ...]) -> Tensor:
    """``obs[key]`` as a float tensor ``[B, T>=n_obs_steps, *shape]`` on the policy's device,
    validated; the caller's object is never modified."""
    if not isinstance(obs, dict):
        raise ObservationError(f"obs must be a dict of arrays. Got {type(obs).__name__}.")
    if key not in obs:
        raise ObservationError(
            f"obs is missing {key!r}; this policy expects keys {sorted(policy.observation_spec)} "
            f"(got {sorted(obs)})."
        )
    value = obs[key]
    if isinstance(value, np.ndarray):
        if value.dtype == object or not np.issubdtype(value.dtype, np.number):
            raise ObservationError(f"obs[{key!r}] has dtype {value.dtype}; expected a number type.")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise ObservationError(
            f"obs[{key!r}] is a {type(value).__name__}; expected a numpy array or torch tensor."
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise ObservationError(
            f"obs[{key!r}] has dtype {value.dtype}; expected a real number type."
        )
    expected = f"(B, n_obs_steps={policy.n_obs_steps}, {', '.join(str(s) for s in shape)})"
    if value.dim() != 2 + len(shape) or tuple(value.shape[2:]) != tuple(shape):
        raise ObservationError(
            f"obs[{key!r}] has shape {tuple(value.shape)}, expected {expected}: a batch of "
            f"histories of the last n_obs_steps observations."
        )
    if value.shape[1] < policy.n_obs_steps:
        raise ObservationError(
            f"obs[{key!r}] holds {value.shape[1]} steps of history, expected at least "
            f"n_obs_steps={policy.n_obs_steps} {expected}."
        )
    value = value.to(device=policy.device, dtype=torch.float32)
    if not torch.isfinite(value).all():
        raise ObservationError(f"obs[{key!r}] contains NaN or Inf.")
    return value


def _training_range(policy, key: str):
    """``policy.observation_range(key)``, computed once per policy and key (it normalizes the
    recorded bounds; every observation step reads it)."""
    cache = policy.__dict__.setdefault("_training_ranges", {})
    if key not in cache:
        cache[key] = policy.observation_range(key)
    return cache[key]
