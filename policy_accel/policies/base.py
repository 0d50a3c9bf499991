"""The loaded-policy interface: observation -> DenoisingProblem -> actions.

A :class:`Policy` owns its networks, its normalizer and its default scheduler. ``problem`` turns an
observation into the :class:`~policy_accel.sampling.DenoisingProblem` of its action chunk (in
normalized units), any solver samples it, and ``decode`` maps the clean sample back to actions in
environment units. ``predict_action`` chains the three.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.messages import preview, shorten
from policy_accel.sampling import DenoisingProblem, sample


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


class ConditionedDenoiser:
    """``network(x, t, **context)`` with per-sample ``context`` tiled over the window positions
    of a flat batch (position major). ``to(device)`` gives a replica on another device, which
    multi-device executors use."""

    def __init__(self, network: Any, context: dict[str, Tensor], batch: int) -> None:
        self.network, self.context, self.batch = network, context, batch

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] % self.batch:
            raise ValueError(
                f"the denoiser got {x.shape[0]} rows, not a multiple of the batch size "
                f"{self.batch}."
            )
        copies = x.shape[0] // self.batch
        tiled = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in self.context.items()}
        return self.network(x, t.to(torch.int64), **tiled)

    def to(self, device: str | torch.device) -> ConditionedDenoiser:
        network = copy.deepcopy(self.network).to(device)
        context = {k: v.to(device) for k, v in self.context.items()}
        return ConditionedDenoiser(network, context, self.batch)


class ObservationError(ValueError):
    """An observation with a wrong key, shape, dtype, a non-finite value or a value far outside
    what the policy can take."""


# Observations more than this many normalized units from zero (the training data spans about
# [-1, 1] in DiffusionPolicy's limits normalization, a few units in mean/std) are refused: they
# are sensor faults or unit mistakes, and values such as 1e30 overflow inside the network.
MAX_NORMALIZED_MAGNITUDE = 1e4
IMAGE_RANGE_SLACK = 1e-3


class Policy(ABC):
    """Attributes every policy exposes (DiffusionPolicy's timeline)::

        n_obs_steps   |o|o|                               observations the model sees
        horizon       |a|a|a|a|a|a|a|a|a|a|a|a|a|a|a|a|    actions it predicts
        n_action_steps    |a|a|a|a|a|a|a|a|                actions executed, from n_obs_steps - 1

    ``scheduler`` and ``num_inference_steps`` are the checkpoint's sampling defaults.
    """

    n_obs_steps: int
    horizon: int
    n_action_steps: int
    action_dim: int
    scheduler: Any
    num_inference_steps: int
    device: torch.device

    @property
    @abstractmethod
    def observation_spec(self) -> dict[str, tuple[int, ...]]:
        """Observation keys and the per-step shape each must have (after the batch and
        ``n_obs_steps`` axes)."""

    @abstractmethod
    def problem(
        self,
        obs: dict,
        *,
        x_T: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        scheduler: Any = None,
        num_inference_steps: int | None = None,
    ) -> DenoisingProblem:
        """The denoising problem of this observation batch (normalized units)."""

    @abstractmethod
    def decode(self, x0: Tensor) -> dict[str, Tensor]:
        """``action`` (``[B, n_action_steps, Da]``) and ``action_pred`` (``[B, horizon, Da]``) in
        environment units from a clean sample; inpainting policies add ``obs_pred``."""

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Observation keys holding float images in ``[0, 1]`` (range-checked as such)."""
        return ()

    def normalize_input(self, key: str, value: Tensor) -> Tensor | None:
        """``value [..., *observation_spec[key]]`` in environment units -> the model's
        normalized units, for the range check of :meth:`check_observation_step`; ``None`` when
        the policy does not expose it (no range check beyond finiteness)."""
        return None

    def rename_observation(self, obs: dict) -> dict:
        """The observation with its keys as :attr:`observation_spec` names them (LeRobot's
        ``rename_map``); the caller's dict is not modified."""
        return obs

    def check_observation_step(self, obs: Any) -> dict[str, np.ndarray]:
        """One observation step (what an env returns), validated before it enters any history:
        every key of :attr:`observation_spec` with exactly its shape, a real number type, finite,
        images in ``[0, 1]`` and other values within ``MAX_NORMALIZED_MAGNITUDE`` normalized
        units. Returns float32 copies of those keys (other keys are dropped); raises
        :class:`ObservationError` naming the key, what was expected and what to do."""
        spec = self.observation_spec
        if not isinstance(obs, dict):
            if len(spec) != 1:
                raise ObservationError(
                    f"this policy takes a dict observation with keys {preview(list(spec))}; got a "
                    f"{type(obs).__name__}."
                )
            obs = {next(iter(spec)): obs}
        obs = self.rename_observation(obs)
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
                    f"observation step: the n_obs_steps={self.n_obs_steps} history is kept for "
                    "you)."
                )
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: Inf, refused below
                value = value.astype(np.float32)  # a copy, never the caller's buffer
            if not np.isfinite(value).all():
                raise ObservationError(
                    f"obs[{key!r}] contains NaN or Inf (after conversion to float32)."
                )
            self._check_range(key, value)
            checked[key] = value
        return checked

    def _check_range(self, key: str, value: np.ndarray) -> None:
        if key in self.image_keys:
            low, high = float(value.min(initial=0.0)), float(value.max(initial=0.0))
            if low < -IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
                raise ObservationError(
                    f"obs[{key!r}] is an image with values in [{low:g}, {high:g}]; expected "
                    "floats in [0, 1] (divide uint8 images by 255)."
                )
            return
        with torch.no_grad():
            normalized = self.normalize_input(key, torch.from_numpy(value).to(self.device))
        if normalized is None:
            return
        magnitude = float(normalized.abs().max()) if normalized.numel() else 0.0
        if not magnitude <= MAX_NORMALIZED_MAGNITUDE:
            raise ObservationError(
                f"obs[{key!r}] is {magnitude:.3g} normalized units from the training data's "
                f"range (at most {MAX_NORMALIZED_MAGNITUDE:g} accepted): a sensor fault or a "
                "unit mistake? Check the observation's units against the policy's."
            )

    def normalize_action(self, action: Tensor) -> Tensor:
        """Actions in environment units -> the model's normalized units (to compare samples)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not expose its action normalization."
        )

    def predict_action(
        self,
        obs: dict,
        method: str = "sequential",
        x_T: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        init: Tensor | None = None,
        executor: Executor | None = None,
        scheduler: Any = None,
        num_inference_steps: int | None = None,
        **solver_options,
    ) -> dict[str, Any]:
        """Sample an action chunk; the result also holds the solver's ``SampleResult``."""
        problem = self.problem(
            obs,
            x_T=x_T,
            noise=noise,
            generator=generator,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
        )
        result = sample(problem, method, init=init, executor=executor, **solver_options)
        return {**self.decode(result.sample), "result": result}

    # --- shared helpers -----------------------------------------------------------------------

    def _conditioned_problem(
        self,
        network: Any,
        context: dict[str, Tensor],
        shape: tuple[int, ...],
        *,
        inpaint: Tensor | None = None,
        x_T: Tensor | None,
        noise: Tensor | None,
        generator: torch.Generator | None,
        scheduler: Any,
        num_inference_steps: int | None,
    ) -> DenoisingProblem:
        """The problem of sampling ``shape = (B, T, C)`` with ``network(x, t, **context)``.

        ``context`` tensors have one row per sample; the denoiser tiles them over the window
        positions of a flat batch (position major). ``inpaint`` ``[B, To, C - Da]`` are known
        per-step observations (features) written into the trajectory's last channels for the
        first steps, as DiffusionPolicy's inpainting policies do.
        """
        batch = shape[0]
        mask = cond_data = None
        if inpaint is not None:
            steps, channels = inpaint.shape[1], inpaint.shape[2]
            cond_data = torch.zeros(shape, device=self.device)
            mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
            cond_data[:, :steps, -channels:] = inpaint
            mask[:, :steps, -channels:] = True

        return DenoisingProblem.from_scheduler(
            scheduler if scheduler is not None else self.scheduler,
            ConditionedDenoiser(network, context, batch),
            num_inference_steps or self.num_inference_steps,
            shape,
            generator=generator,
            x_T=x_T,
            noise=noise,
            mask=mask,
            cond_data=cond_data,
            device=self.device,
        )

    def _observation(self, obs: dict, key: str, shape: tuple[int, ...]) -> Tensor:
        """``obs[key]`` as a float tensor ``[B, T>=n_obs_steps, *shape]`` on the policy's device,
        validated; the caller's object is never modified."""
        if not isinstance(obs, dict):
            raise ObservationError(f"obs must be a dict of arrays. Got {type(obs).__name__}.")
        if key not in obs:
            raise ObservationError(
                f"obs is missing {key!r}; this policy expects keys {sorted(self.observation_spec)} "
                f"(got {sorted(obs)})."
            )
        value = obs[key]
        if isinstance(value, np.ndarray):
            if value.dtype == object or not np.issubdtype(value.dtype, np.number):
                raise ObservationError(
                    f"obs[{key!r}] has dtype {value.dtype}; expected a number type."
                )
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            raise ObservationError(
                f"obs[{key!r}] is a {type(value).__name__}; expected a numpy array or torch tensor."
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise ObservationError(
                f"obs[{key!r}] has dtype {value.dtype}; expected a real number type."
            )
        expected = f"(B, n_obs_steps={self.n_obs_steps}, {', '.join(str(s) for s in shape)})"
        if value.dim() != 2 + len(shape) or tuple(value.shape[2:]) != tuple(shape):
            raise ObservationError(
                f"obs[{key!r}] has shape {tuple(value.shape)}, expected {expected}: a batch of "
                f"histories of the last n_obs_steps observations."
            )
        if value.shape[1] < self.n_obs_steps:
            raise ObservationError(
                f"obs[{key!r}] holds {value.shape[1]} steps of history, expected at least "
                f"n_obs_steps={self.n_obs_steps} {expected}."
            )
        value = value.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(value).all():
            raise ObservationError(f"obs[{key!r}] contains NaN or Inf.")
        return value
