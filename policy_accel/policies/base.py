"""The loaded-policy interface: observation -> DenoisingProblem -> actions.

A :class:`Policy` owns its networks, its normalizer and its default scheduler, and says what it
samples: :attr:`~Policy.event_shape` (steps x channels of one sample), the horizon axis along
which consecutive replans shift (axis 0 of the event), and :attr:`~Policy.action_start`, where
in the sample the first executed action sits. A subclass supplies only its
:meth:`~Policy.conditioning` (network, per-sample context, known inpainted values) and its action
units; :meth:`~Policy.problem` turns that into the :class:`~policy_accel.sampling.DenoisingProblem`
of the chunk (normalized units), any solver samples it, and :meth:`~Policy.decode` maps the clean
sample back to actions in environment units. ``predict_action`` chains the three.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.execution.bound import ConditionedDenoiser
from policy_accel.policies import observations
from policy_accel.policies.observations import ObservationError, describe_spec
from policy_accel.sampling import DenoisingProblem, sample

__all__ = [
    "Conditioning",
    "ConditionedDenoiser",
    "ObservationError",
    "Policy",
    "describe_spec",
    "overlap_schedule",
]


def overlap_schedule(length: int) -> np.ndarray:
    """RTC's decaying prefix weights (Black et al. 2025, eq. 5) over the ``length`` overlap
    steps after the committed ones: ``w_k = c_k (e^{c_k} - 1) / (e - 1)`` with ``c_k = (length
    - k) / (length + 1)``, from about 0.6 down toward 0 (1 would be committed, 0 free)."""
    c = (length - np.arange(length)) / (length + 1)
    return c * np.expm1(c) / math.expm1(1.0)


@dataclass(frozen=True)
class Conditioning:
    """What a batch of observations conditions the sample on.

    Attributes:
        network: ``network(x [M, *event], t [M], **context)`` predicts the model output.
        batch: samples in the batch (B).
        context: per-sample tensors (one row per sample) passed to the network.
        known: ``[B, To, K]`` values known for the first ``To`` steps of the sample's last ``K``
            channels (DiffusionPolicy's inpainting: the normalized observations or image
            features), written into the trajectory before every model call; None otherwise.
    """

    network: Any
    batch: int
    context: dict[str, Tensor] = field(default_factory=dict)
    known: Tensor | None = None


class Policy(ABC):
    """Attributes every policy exposes (DiffusionPolicy's timeline)::

        n_obs_steps   |o|o|                               observations the model sees
        horizon       |a|a|a|a|a|a|a|a|a|a|a|a|a|a|a|a|    actions it predicts
        n_action_steps    |a|a|a|a|a|a|a|a|                actions executed, from action_start

    ``scheduler`` and ``num_inference_steps`` are the checkpoint's sampling defaults.
    """

    n_obs_steps: int
    horizon: int
    n_action_steps: int
    action_dim: int
    scheduler: Any
    num_inference_steps: int
    device: torch.device
    horizon_axis: int = 0
    """The event axis along time: consecutive replans shift their noise and guesses along it."""

    # --- what the policy samples --------------------------------------------------------------

    @property
    @abstractmethod
    def observation_spec(self) -> dict[str, tuple[int, ...]]:
        """Observation keys and the per-step shape each must have (after the batch and
        ``n_obs_steps`` axes)."""

    @property
    @abstractmethod
    def event_shape(self) -> tuple[int, int]:
        """``(steps, channels)`` of one sample: ``(horizon, action_dim)`` for most policies,
        ``(n_action_steps, action_dim)`` with ``pred_action_steps_only``, observation channels
        added for inpainting policies."""

    @property
    @abstractmethod
    def action_start(self) -> int:
        """Index along the horizon axis of the first executed action in the sample."""

    @abstractmethod
    def conditioning(self, obs: dict) -> Conditioning:
        """Validate and encode an observation batch (``[B, >= n_obs_steps, ...]`` per key)."""

    @abstractmethod
    def unnormalize_action(self, action: Tensor) -> Tensor:
        """The model's normalized actions ``[..., Da]`` -> environment units."""

    def decode_extra(self, x0: Tensor) -> dict[str, Tensor]:
        """Outputs beyond the actions (inpainting policies: the predicted observations)."""
        return {}

    # --- observations -----------------------------------------------------------------------

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Observation keys holding float images in ``[0, 1]`` (range-checked as such)."""
        return ()

    def normalize_input(self, key: str, value: Tensor) -> Tensor | None:
        """``value [..., *observation_spec[key]]`` in environment units -> the model's
        normalized units, for the range check of :meth:`check_observation_step`; ``None`` when
        the policy does not expose it (no range check beyond finiteness)."""
        return None

    def observation_range(self, key: str) -> tuple[Tensor, Tensor] | None:
        """The training data's per-dimension ``(low, high)`` of ``key`` in normalized units
        (:meth:`normalize_input`'s), which bounds the observations :meth:`check_observation_step`
        accepts; ``None`` when the checkpoint does not record it."""
        return None

    def rename_observation(self, obs: dict) -> dict:
        """The observation with its keys as :attr:`observation_spec` names them (LeRobot's
        ``rename_map``); the caller's dict is not modified."""
        return obs

    def check_observation_step(
        self, obs: Any, *, out_of_range: str = "refuse"
    ) -> dict[str, np.ndarray]:
        """One observation step (what an env returns), validated before it enters any history
        (see :func:`~policy_accel.policies.observations.check_observation_step`): float32 copies
        of the policy's keys, or an :class:`ObservationError`."""
        return observations.check_observation_step(self, obs, out_of_range=out_of_range)

    def _observation(self, obs: dict, key: str, shape: tuple[int, ...]) -> Tensor:
        return observations.observation_tensor(self, obs, key, shape)

    # --- sampling ---------------------------------------------------------------------------

    def sample_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.event_shape)

    def draw_noise(
        self, generator: torch.Generator, batch: int = 1, num_steps: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x_T [B, *event]`` and per-step noise ``[N, B, *event]`` of a cold start, drawn in
        this order from ``generator`` (every controller draws alike, so the same seed gives the
        same noise to a Controller, a BatchController row and an eval episode)."""
        shape = self.sample_shape(batch)
        x_T = torch.randn(shape, generator=generator)
        noise = torch.randn((num_steps or self.num_inference_steps, *shape), generator=generator)
        return x_T, noise

    def problem(
        self,
        obs: dict,
        *,
        x_T: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        scheduler: Any = None,
        num_inference_steps: int | None = None,
        committed: Tensor | np.ndarray | None = None,
        overlap: Tensor | np.ndarray | None = None,
    ) -> DenoisingProblem:
        """The denoising problem of this observation batch (normalized units): the policy's
        scheduler (or ``scheduler``) at ``num_inference_steps``, noise from ``x_T``/``noise`` or
        drawn from ``generator`` in the sequential loop's order, and for inpainting policies
        the known values masked into the trajectory's last channels for the first steps.

        ``committed [B, d, Da]`` (environment units; NaN: not committed) are actions the robot
        executes whatever this plan says, e.g. while the replan is in flight: they are inpainted
        into the sample's action channels from :attr:`action_start` on, forward-noised to each
        step's level before it (:attr:`DenoisingProblem.noised`) and exact in the result, so the
        chunk continues them. Every solver handles the mask exactly.

        ``overlap [B, m, Da]`` (environment units; NaN: none) are the previous chunk's actions
        for the ``m`` steps after the committed ones: soft inpainting over the rest of the
        overlap (RTC's decaying prefix schedule, :func:`overlap_schedule`): before every
        step, overlap action ``k``'s input moves the fraction ``w_k`` of the way to its old
        value forward-noised to that step's level (:attr:`DenoisingProblem.guide`); the final
        sample stays the model's own. The new chunk bends toward the old plan where it takes
        over and leaves it further on: on PushT the mode switches that the committed actions
        alone let through (jumps of 40-110 px at a takeover) mostly went away."""
        conditioning = self.conditioning(obs)
        shape = self.sample_shape(conditioning.batch)
        mask = cond_data = None
        if conditioning.known is not None or committed is not None or overlap is not None:
            cond_data = torch.zeros(shape, device=self.device)
            mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        if conditioning.known is not None:
            steps, channels = conditioning.known.shape[1], conditioning.known.shape[2]
            cond_data[:, :steps, -channels:] = conditioning.known
            mask[:, :steps, -channels:] = True
        noised = None
        start = 0  # where the overlap begins, in actions from the current step
        if committed is not None:
            committed = torch.as_tensor(committed)
            noised = self._inpaint_committed(committed, cond_data, mask)
            start = committed.shape[1]
        denoiser = ConditionedDenoiser(
            conditioning.network, conditioning.context, conditioning.batch
        )
        problem = DenoisingProblem.from_scheduler(
            scheduler if scheduler is not None else self.scheduler,
            denoiser,
            num_inference_steps or self.num_inference_steps,
            shape,
            generator=generator,
            x_T=x_T,
            noise=noise,
            mask=mask,
            cond_data=cond_data,
            noised=noised,
            device=self.device,
        )
        if overlap is None:
            return problem
        overlap = torch.as_tensor(overlap)
        guide = self._guide_overlap(overlap, start, cond_data, mask)
        return replace(problem, cond_data=cond_data.to(problem.x_T), guide=guide)

    def _actions_window(
        self, actions: Tensor, start: int, cond_data: Tensor, what: str
    ) -> tuple[Tensor, Tensor, slice, slice]:
        """Validated ``actions [B, k, Da]`` written into ``cond_data`` (normalized) from
        ``start`` actions after :attr:`action_start` on: (the rows' known flags ``[B, k, 1]``,
        values, horizon window, channels)."""
        batch, steps = cond_data.shape[0], cond_data.shape[1]
        room = steps - self.action_start - start
        if actions.dim() != 3 or actions.shape[0] != batch or actions.shape[2] != self.action_dim:
            steps_name = "d" if what == "committed" else "m"
            raise ValueError(
                f"{what} actions must have shape [{batch}, {steps_name}, {self.action_dim}] "
                f"(rows, steps, action_dim). Got {tuple(actions.shape)}."
            )
        if actions.shape[1] > room:
            raise ValueError(
                f"{actions.shape[1]} {what} actions do not fit the {room} actions this policy "
                f"samples from {start} steps after the current one on."
            )
        actions = actions.to(device=self.device, dtype=torch.float32)
        known = torch.isfinite(actions).all(dim=-1, keepdim=True)
        values = self.normalize_action(torch.where(known, actions, torch.zeros_like(actions)))
        window = slice(self.action_start + start, self.action_start + start + actions.shape[1])
        channels = slice(0, self.action_dim)
        cond_data[:, window, channels] = torch.where(known, values, cond_data[:, window, channels])
        return known, values, window, channels

    def _inpaint_committed(self, committed: Tensor, cond_data: Tensor, mask: Tensor) -> Tensor:
        known, values, window, channels = self._actions_window(committed, 0, cond_data, "committed")
        mask[:, window, channels] |= known.expand_as(values)
        noised = torch.zeros_like(mask)  # forward-noised: the model was not trained on them clean
        noised[:, window, channels] = known.expand_as(values)
        return noised

    def _guide_overlap(
        self, overlap: Tensor, start: int, cond_data: Tensor, mask: Tensor
    ) -> Tensor:
        known, values, window, channels = self._actions_window(overlap, start, cond_data, "overlap")
        weights = torch.as_tensor(overlap_schedule(overlap.shape[1]), dtype=torch.float32)
        guide = torch.zeros((1, *cond_data.shape), device=self.device)  # the same at every step
        rows = known.to(torch.float32).expand_as(values)  # [B, m, Da]
        guide[0, :, window, channels] = weights.to(self.device)[None, :, None] * rows
        return guide * (~mask).to(guide.dtype)

    def decode(self, x0: Tensor) -> dict[str, Tensor]:
        """``action`` (``[B, n_action_steps, Da]``, from :attr:`action_start`) and
        ``action_pred`` (the whole predicted action sequence) in environment units from a clean
        sample; inpainting policies add their predicted observations."""
        with torch.no_grad():
            action_pred = self.unnormalize_action(x0[..., : self.action_dim])
            start = self.action_start
            return {
                "action": action_pred[:, start : start + self.n_action_steps],
                "action_pred": action_pred,
                **self.decode_extra(x0),
            }

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
