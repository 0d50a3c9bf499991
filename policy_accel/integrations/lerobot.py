"""LeRobot users keep their stack: :func:`accelerate` makes a live LeRobot ``DiffusionPolicy``
sample its actions with policy_accel's solvers and warm start.

Three lines::

    policy = DiffusionPolicy.from_pretrained(path)
    from policy_accel.integrations.lerobot import accelerate
    accelerate(policy)                      # chord, warm-started; method="sequential" is exact

What changes: only ``policy.diffusion.conditional_sample``, the denoising loop. What does not:
LeRobot's pre- and post-processors (normalization), its observation and action queues,
``select_action`` / ``predict_action_chunk`` / ``generate_actions``, the noise (drawn from the
same generator in the same order as LeRobot's loop: the initial sample, then one draw per noisy
step), the scheduler and its step count. With ``method="sequential"`` the actions equal
LeRobot's own bit for bit; a parallel solver converges to the same sample to its tolerance.

The warm start: each call starts from the previous call's solution shifted by the actions
executed since (``select_action`` runs the whole ``n_action_steps`` queue before it plans again,
the default shift; a caller that plans at another cadence, e.g. LeRobot's async inference, sets
:attr:`LeRobotSampler.executed` first). ``policy.reset()`` (a new episode) forgets it, as does a
change of batch size. :meth:`LeRobotSampler.restore` puts LeRobot's loop back.

Importing this module needs ``lerobot``; ``policy_accel`` itself never imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from torch import Tensor

from policy_accel.execution import Executor, LocalExecutor
from policy_accel.policies.base import ConditionedDenoiser
from policy_accel.sampling import DenoisingProblem, sample
from policy_accel.sampling.sample import solver_options
from policy_accel.sampling.warm_start import WarmStart, warm_start_guess

__all__ = ["LeRobotSampler", "SampleRecord", "accelerate"]


@dataclass(frozen=True)
class SampleRecord:
    """One ``conditional_sample`` call: sequential batched model calls (``rounds``), model
    evaluations per row, wall time, whether it converged and started warm."""

    rounds: int
    model_evals: float
    latency_ms: float
    converged: bool
    warm: bool
    shift: int


class LeRobotSampler:
    """The denoising loop of one LeRobot ``DiffusionPolicy``, solved by policy_accel (installed
    by :func:`accelerate`; called as LeRobot calls ``conditional_sample``)."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        method: str = "chord",
        tolerance: float | None = None,
        warm_start: bool = True,
        executor: Executor | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.method = method
        self.warm_start = warm_start
        self.executor = executor or LocalExecutor()
        options = dict(options or {})
        if tolerance is not None:
            options["tolerance"] = tolerance
        solver_options(method, **options)  # unknown methods and options raise here, naming them
        self.options = options
        self.executed: int | None = None  # actions executed before the next call (None: a chunk)
        self.records: list[SampleRecord] = []
        self._warm: list[WarmStart] | None = None
        self._original_sample = policy.diffusion.conditional_sample
        self._original_reset = policy.reset

    def forget(self) -> None:
        """Start the next call cold (a new episode)."""
        self._warm = None
        self.executed = None

    def restore(self) -> None:
        """Put LeRobot's own denoising loop and ``reset`` back."""
        for owner, name in ((self.policy.diffusion, "conditional_sample"), (self.policy, "reset")):
            if name in vars(owner):
                delattr(owner, name)

    def _reset(self) -> None:
        self.forget()
        self._original_reset()

    def __call__(
        self,
        batch_size: int,
        global_cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """LeRobot's ``DiffusionModel.conditional_sample``: ``[B, horizon, action_dim]``
        normalized actions, the same draws from ``generator`` (or torch's global generator)."""
        start = time.perf_counter()
        diffusion = self.policy.diffusion
        config = diffusion.config
        parameter = next(diffusion.parameters())
        shape = (batch_size, config.horizon, config.action_feature.shape[0])
        x_T = noise
        if x_T is None:  # LeRobot's own draw, so the generator advances as in its loop
            x_T = torch.randn(
                size=shape, dtype=parameter.dtype, device=parameter.device, generator=generator
            )
        context = {} if global_cond is None else {"global_cond": global_cond}
        problem = DenoisingProblem.from_scheduler(
            diffusion.noise_scheduler,
            ConditionedDenoiser(diffusion.unet, context, batch_size),
            diffusion.num_inference_steps,
            shape,
            generator=generator,
            x_T=x_T,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        shift = config.n_action_steps if self.executed is None else int(self.executed)
        warm = (
            self.warm_start
            and self._warm is not None
            and len(self._warm) == batch_size
            and all(row.num_steps == problem.num_steps for row in self._warm)
            and 0 <= shift < config.horizon
        )
        init = warm_start_guess(problem, self._warm, [shift] * batch_size) if warm else None
        result = sample(problem, self.method, init=init, executor=self.executor, **self.options)
        self._warm = WarmStart.rows(problem, result) if self.warm_start else None
        self.executed = None
        self.records.append(
            SampleRecord(
                rounds=int(result.rounds),
                model_evals=result.model_evals / batch_size,
                latency_ms=(time.perf_counter() - start) * 1e3,
                converged=bool(result.converged),
                warm=bool(warm),
                shift=shift if warm else 0,
            )
        )
        return result.sample.to(parameter.dtype)


def accelerate(
    policy: DiffusionPolicy,
    method: str = "chord",
    *,
    tolerance: float | None = None,
    warm_start: bool = True,
    executor: Executor | None = None,
    options: dict[str, Any] | None = None,
) -> LeRobotSampler:
    """Make ``policy`` (a live LeRobot ``DiffusionPolicy``) generate actions with ``method``
    (any policy_accel solver; ``options`` its options, ``tolerance`` a shortcut), warm-started
    from the previous chunk unless ``warm_start=False``, its rounds run by ``executor``.
    Returns the installed :class:`LeRobotSampler` (its ``records``, ``restore()``)."""
    if not isinstance(policy, DiffusionPolicy):
        raise TypeError(
            f"accelerate takes a LeRobot DiffusionPolicy, got {type(policy).__name__}; load one "
            "with DiffusionPolicy.from_pretrained(path)."
        )
    current = vars(policy.diffusion).get("conditional_sample")
    if isinstance(current, LeRobotSampler):
        current.restore()  # accelerating twice replaces the first sampler
    sampler = LeRobotSampler(policy, method, tolerance, warm_start, executor, options)
    policy.diffusion.conditional_sample = sampler
    policy.reset = sampler._reset
    return sampler
