"""Closed-loop control of one robot: receding horizon, warm starts, deadlines.

``Controller.act(obs)`` is one environment step: it keeps the ``n_obs_steps`` history (the first
observation repeated after a reset), replans when the action queue is empty, and returns the next
action. ``plan(obs)`` replans now and returns the :class:`~policy_accel.control.planner.Plan`
(chunk, record, solver result). Planning is the shared core's
(:class:`~policy_accel.control.planner.Planner`) with one row: warm starts, budgets and the
fallback are described there.

Errors change nothing: an observation is validated before it enters the history
(:class:`~policy_accel.policies.ObservationError`), and a plan that fails restores the history
and the noise stream, so the next good observation plans as if the failed one never came.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from policy_accel.control.config import SamplerConfig
from policy_accel.control.history import ObservationHistory
from policy_accel.control.planner import Plan, Planner, RowState
from policy_accel.control.records import PlanRecord, latency_stats
from policy_accel.policies.base import Policy
from policy_accel.policies.observations import OUT_OF_RANGE_MODES

KEPT_RECORDS = 10_000  # a robot controller runs for days: stats cover the latest plans


@dataclass(frozen=True)
class ControlStep:
    """One control step: the action to execute and the plan made for it (None: from the queue)."""

    action: np.ndarray
    plan: Plan | None


class Controller:
    """Receding-horizon control of one robot with ``policy``.

    Args:
        policy: a loaded policy (:func:`policy_accel.load_policy`).
        sampler: how to sample (:class:`~policy_accel.control.config.SamplerConfig`; default:
            warm-started chord at its default tolerance).
        n_action_steps: actions executed per plan (default: the policy's; at most its chunk).
        seed: seed of the noise generator (each ``reset`` continues the same stream).
        executor: where the denoiser runs (default: ``sampler.executor``).
        out_of_range: ``"refuse"`` (default) an observation outside the bound around the
            policy's training range (:mod:`~policy_accel.policies.observations`), or
            ``"accept"`` it.
        **settings: shortcuts for ``sampler`` fields and solver options, e.g.
            ``Controller(policy, method="taa", budget_ms=50, tolerance=1e-4)``.
    """

    def __init__(
        self,
        policy: Policy,
        sampler: SamplerConfig | None = None,
        *,
        n_action_steps: int | None = None,
        seed: int = 0,
        executor: Any = None,
        out_of_range: str = "refuse",
        **settings: Any,
    ) -> None:
        if out_of_range not in OUT_OF_RANGE_MODES:
            raise ValueError(
                f"out_of_range must be one of {list(OUT_OF_RANGE_MODES)}. Got {out_of_range!r}."
            )
        self.policy, self.out_of_range = policy, out_of_range
        self.sampler = SamplerConfig.from_settings(sampler, **settings)
        self.planner = Planner(policy, self.sampler, n_action_steps, executor)
        self.n_action_steps = self.planner.n_action_steps
        self.row = RowState.seeded(seed)
        self.records: deque[PlanRecord] = deque(maxlen=KEPT_RECORDS)
        self.reset()

    # -- public API ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new episode: empty history and queue, the next plan cold (records are kept,
        the noise stream goes on)."""
        self.history = ObservationHistory(self.policy.n_obs_steps)
        self.queue: deque[np.ndarray] = deque()
        self.row.forget()
        self._executed_since_plan = 0
        self.last_plan: Plan | None = None  # this episode's latest plan

    def step(self, obs: Any) -> ControlStep:
        """One control step: record ``obs``, replan if the queue is empty, return the action and
        the plan (if one was made)."""
        plan = None
        with self._transaction():
            self.observe(obs)
            if not self.queue:
                plan = self.replan()
        self._executed_since_plan += 1
        return ControlStep(self.queue.popleft(), plan)

    def act(self, obs: Any) -> np.ndarray:
        """One control step: the action to execute now (see :meth:`step`)."""
        return self.step(obs).action

    def plan(
        self, obs: Any, executed: int | None = None, committed: Any = None, overlap: Any = None
    ) -> Plan:
        """Record ``obs`` and replan now; the new chunk (``plan.chunk``, ``(n_action_steps,
        action_dim)``) replaces the queue. ``executed`` and ``committed`` as in
        :meth:`replan`."""
        with self._transaction():
            self.observe(obs)
            return self.replan(executed=executed, committed=committed, overlap=overlap)

    def observe(self, obs: Any) -> None:
        """Add ``obs`` to the history (the first after a reset fills it), validated first: a
        refused observation raises :class:`~policy_accel.policies.ObservationError` and is not
        recorded."""
        step = self.policy.check_observation_step(obs, out_of_range=self.out_of_range)
        if len(self.history) == 0:
            self.history.reset(step)
        else:
            self.history.append(step)

    def replan(
        self,
        history: Any = None,
        executed: int | None = None,
        committed: Any = None,
        overlap: Any = None,
    ) -> Plan:
        """Plan from ``history`` (a stacked snapshot ``{key: (n_obs_steps, ...)}``; default:
        the Controller's own) given ``executed`` actions since the previous plan's observation
        (default: as counted by :meth:`act`); the chunk replaces the queue. ``committed [d,
        Da]``: the actions the robot executes from this observation on while the plan is in
        flight, inpainted so the chunk continues them (real-time chunking; the chunk still
        starts at this observation's step). ``overlap [m, Da]``: the previous chunk's actions
        for the steps after those, followed softly (RTC's decaying prefix schedule, see
        :meth:`~policy_accel.policies.base.Policy.problem`). The asynchronous runtime calls
        this from its planning thread with its own snapshot."""
        stacked = self.history.stacked() if history is None else history
        shift = self._executed_since_plan if executed is None else int(executed)
        if committed is not None:
            committed = np.asarray(committed, dtype=np.float32)[None]
        if overlap is not None:
            overlap = np.asarray(overlap, dtype=np.float32)[None]
        plan = self.planner.plan(
            _one_row(stacked, self.policy),
            [self.row],
            [shift],
            committed=committed,
            overlap=overlap,
        )
        self.queue = deque(plan.chunk)
        self._executed_since_plan = 0
        self.records.append(plan.record)
        self.last_plan = plan
        return plan

    def reference(self, plan: Plan) -> np.ndarray:
        """The sequential sampler's chunk for ``plan``'s observation and noise: the exact sample
        it converges to (benchmarks compare solvers against it)."""
        return self.planner.reference(plan)[0]

    def close(self) -> None:
        """Release the planner's background thread (the Controller plans on if used again)."""
        self.planner.close()

    def stats(self) -> dict[str, float]:
        """Latency p50/p95/p99, rounds, model evaluations, converged and warm fractions,
        deadline misses and fallbacks of the latest plans."""
        return latency_stats(self.records)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Restore the history, the noise stream and the warm start if the block raises."""
        history, warm = self.history.copy(), self.row.warm
        generator_state = self.row.generator.get_state()
        try:
            yield
        except BaseException:
            self.history, self.row.warm = history, warm
            self.row.generator.set_state(generator_state)
            raise


def _one_row(stacked: Any, policy: Policy) -> dict[str, np.ndarray]:
    """A one-row batch ``{key: [1, n_obs_steps, ...]}`` from a stacked history."""
    if not isinstance(stacked, dict):
        keys = list(policy.observation_spec)
        if len(keys) != 1:
            raise ValueError(f"this policy takes a dict observation with keys {keys}.")
        stacked = {keys[0]: stacked}
    return {key: np.asarray(value)[None] for key, value in stacked.items()}
