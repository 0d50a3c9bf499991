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
from policy_accel.sampling import DenoisingProblem, sample


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
    """An observation with a wrong key, shape, dtype or a non-finite value."""


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
