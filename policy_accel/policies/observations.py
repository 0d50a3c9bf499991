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


# Observations more than this many normalized units from zero (the training data spans about
# [-1, 1] in DiffusionPolicy's limits normalization, a few units in mean/std) are refused: they
# are sensor faults or unit mistakes, and values such as 1e30 overflow inside the network.
MAX_NORMALIZED_MAGNITUDE = 1e4
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


def check_observation_step(policy, obs: Any) -> dict[str, np.ndarray]:
    """One observation step (what an env returns), validated before it enters any history:
    every key of :attr:`observation_spec` with exactly its shape, a real number type, finite,
    images in ``[0, 1]`` and other values within ``MAX_NORMALIZED_MAGNITUDE`` normalized
    units. Returns float32 copies of those keys (other keys are dropped); raises
    :class:`ObservationError` naming the key, what was expected and what to do."""
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
        _check_range(policy, key, value)
        checked[key] = value
    return checked


def _check_range(policy, key: str, value: np.ndarray) -> None:
    if key in policy.image_keys:
        low, high = float(value.min(initial=0.0)), float(value.max(initial=0.0))
        if low < -IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
            raise ObservationError(
                f"obs[{key!r}] is an image with values in [{low:g}, {high:g}]; expected "
                "floats in [0, 1] (divide uint8 images by 255)."
            )
        return
    with torch.no_grad():
        normalized = policy.normalize_input(key, torch.from_numpy(value).to(policy.device))
    if normalized is None:
        return
    magnitude = float(normalized.abs().max()) if normalized.numel() else 0.0
    if not magnitude <= MAX_NORMALIZED_MAGNITUDE:
        raise ObservationError(
            f"obs[{key!r}] is {magnitude:.3g} normalized units from the training data's "
            f"range (at most {MAX_NORMALIZED_MAGNITUDE:g} accepted): a sensor fault or a "
            "unit mistake? Check the observation's units against the policy's."
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
