"""Asynchronous real-time control: plan in the background while the robot executes.

A synchronous loop stops the robot for every replan. :class:`AsyncController` instead starts the
next plan while the current chunk is still executing. Time is counted in control steps (slots) of
period ``1 / hz``: a chunk planned from the observation taken at slot ``s`` holds the actions for
slots ``s, s+1, ...`` (DiffusionPolicy's convention: the first action is for the observation's
own step). When the plan arrives, actions for slots already past are stale and dropped; the rest
merge into the action timeline:

* ``merge="latest"``: the newest plan replaces overlapping actions (lowest latency to react);
* ``merge="average"``: overlapping actions become ``(1 - w) * old + w * new`` with
  ``w = merge_weight``, an exponential moving merge that smooths chunk boundaries (temporal
  ensembling).

If the timeline runs dry (a plan slower than the queued actions), the last action is held and the
step is counted as ``starved``. :meth:`AsyncController.run` keeps a
:class:`~policy_accel.control.delay.DelayEstimator` of the plans' delay in control steps
(``delay``; its last estimate in ``RunStats.delay_steps``). Warm starts work across asynchronous
plans: the shift is the number of slots between the two plans' observations.

:meth:`AsyncController.run` drives an env (or a robot with the gymnasium ``reset`` / ``step``
interface) at a fixed rate, sleeping until each slot's deadline and spinning the last
millisecond, so the period jitter stays well under a millisecond on an idle machine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policy_accel.control.controller import Controller
from policy_accel.control.delay import DelayEstimator
from policy_accel.control.history import ObservationHistory
from policy_accel.control.records import PlanRecord

MERGES = ("latest", "average")
TRANSITIONS = ("naive", "inpaint", "soft_inpaint")


def wait_until(deadline: float, spin_s: float = 1e-3) -> None:
    """Sleep until ``deadline`` (``time.perf_counter()``): coarse sleep, then spin."""
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        if remaining > spin_s:
            time.sleep(remaining - spin_s)


@dataclass
class RunStats:
    steps: int = 0
    plans: int = 0
    stale_dropped: int = 0
    starved: int = 0
    late_steps: int = 0
    max_period_error_ms: float = 0.0
    total_reward: float = 0.0
    delay_steps: int = 0  # the estimated inference delay at the end (DelayEstimator)
    actions: list = field(default_factory=list)  # executed, in order (simulate)
    boundaries: list = field(default_factory=list)  # steps where a plan's chunk took over
    success: bool = False
    info: dict = field(default_factory=dict)
    records: list[PlanRecord] = field(default_factory=list)  # one per plan, in arrival order


class AsyncController:
    """Background planning around a :class:`Controller` (whose solver, warm start and budget it
    uses).

    Args:
        controller: the synchronous Controller doing the sampling.
        merge: ``"latest"`` or ``"average"`` (see the module docs).
        merge_weight: weight of the new chunk in ``"average"`` merges.
        trigger_steps: start the next plan when at most this many future actions are queued
            (default: half the chunk).
        transition: ``"naive"`` or ``"inpaint"``: each plan inpaints the queued actions the
            robot will execute while it is in flight (as many as :attr:`delay` expects), so the
            new chunk continues them (real-time chunking without retraining);
            ``"soft_inpaint"`` also follows the rest of the queue softly (RTC's decaying
            prefix schedule, see :meth:`~policy_accel.policies.base.Policy.problem`).
    """

    def __init__(
        self,
        controller: Controller,
        merge: str = "latest",
        merge_weight: float = 0.5,
        trigger_steps: int | None = None,
        transition: str = "naive",
    ) -> None:
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {list(MERGES)}, got {merge!r}.")
        if transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {list(TRANSITIONS)}, got {transition!r}.")
        self.transition = transition
        if not 0.0 < merge_weight <= 1.0:
            raise ValueError(f"merge_weight must be in (0, 1], got {merge_weight!r}.")
        self.controller = controller
        self.merge = merge
        self.merge_weight = merge_weight
        chunk = controller.n_action_steps
        self.trigger_steps = chunk // 2 if trigger_steps is None else int(trigger_steps)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.controller.reset()
        self.history = ObservationHistory(self.controller.policy.n_obs_steps)
        self.timeline: dict[int, np.ndarray] = {}
        self.slot = 0
        self.stats = RunStats()
        self._thread: threading.Thread | None = None
        self._last_plan_slot: int | None = None
        self._error: BaseException | None = None
        self._last_action: np.ndarray | None = None
        self.delay: DelayEstimator | None = None  # set by run() from its rate

    # -- planning -----------------------------------------------------------------------------
    @property
    def planning(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def observe(self, obs: Any) -> None:
        """The observation of the current slot (validated first, as by
        :meth:`Controller.observe`: a refused one is not recorded)."""
        obs = self.controller.policy.check_observation_step(obs)
        if len(self.history) == 0:
            self.history.reset(obs)
        else:
            self.history.append(obs)

    def submit(self) -> bool:
        """Start planning from the current slot's history in the background (no-op while a plan
        is in flight); returns whether a plan started."""
        self._raise_planner_error()
        if self.planning:
            return False
        snapshot = self.history.stacked()
        slot = self.slot
        executed = 0 if self._last_plan_slot is None else slot - self._last_plan_slot
        self._last_plan_slot = slot
        held = self._held(slot)
        self._thread = threading.Thread(
            target=self._plan,
            args=(snapshot, slot, executed, held),
            name="policy-planner",
            daemon=True,
        )
        self._thread.start()
        return True

    def _held(self, slot: int, expected: int | None = None) -> dict[str, np.ndarray | None]:
        """``committed``: the queued actions for ``slot`` on that the robot executes while a
        plan started now is in flight (``expected`` steps, default the delay estimate; at most
        what is queued and what the chunk holds); with ``soft_inpaint``, ``overlap``: the
        queued actions after those. Nothing with the ``naive`` transition."""
        if self.transition == "naive":
            return {"committed": None, "overlap": None}
        if expected is None:
            expected = 0 if self.delay is None else self.delay.steps
        policy = self.controller.policy
        room = policy.event_shape[policy.horizon_axis] - policy.action_start
        soft = self.transition == "soft_inpaint"
        with self._lock:
            actions = []
            for target in range(slot, slot + (room if soft else min(expected, room))):
                if target not in self.timeline:
                    break
                actions.append(self.timeline[target])
        committed, overlap = actions[:expected], actions[expected:]
        return {
            "committed": np.stack(committed) if committed else None,
            "overlap": np.stack(overlap) if overlap and len(committed) == expected else None,
        }

    def _plan(self, snapshot: Any, slot: int, executed: int, held: dict) -> None:
        try:
            plan = self.controller.replan(history=snapshot, executed=executed, **held)
            if self.delay is not None:
                self.delay.record(plan.record.latency_ms / 1e3)
            self._merge(plan.chunk, slot, plan.record)
        except BaseException as error:  # surfaced on the control thread
            self._error = error

    def _merge(self, chunk: np.ndarray, slot: int, record: PlanRecord | None = None) -> None:
        with self._lock:
            now = self.slot
            self.stats.plans += 1
            if record is not None:
                self.stats.records.append(record)
            for offset, action in enumerate(chunk):
                target = slot + offset
                if target < now:
                    self.stats.stale_dropped += 1
                    continue
                old = self.timeline.get(target)
                if old is None or self.merge == "latest":
                    self.timeline[target] = action
                else:
                    w = self.merge_weight
                    self.timeline[target] = (1 - w) * old + w * action

    def wait_for_plan(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        self._raise_planner_error()

    def _raise_planner_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the background planner failed: {error!r}") from error

    # -- acting -------------------------------------------------------------------------------
    def queued(self) -> int:
        with self._lock:
            return sum(1 for s in self.timeline if s >= self.slot)

    def next_action(self) -> np.ndarray:
        """The action for the current slot (the last one held if none is queued), and advance."""
        self._raise_planner_error()
        with self._lock:
            for stale in [s for s in self.timeline if s < self.slot]:
                del self.timeline[stale]
            action = self.timeline.pop(self.slot, None)
            if action is None and self._last_action is None:
                raise RuntimeError("no action available: wait for the first plan before acting.")
            self.slot += 1
        if action is None:
            self.stats.starved += 1
            action = self._last_action
        self._last_action = action
        return action

    def simulate(
        self,
        env: Any,
        hz: float,
        max_steps: int | None = None,
        seed: int | None = None,
        delay_steps: int | None = None,
    ) -> RunStats:
        """One episode in simulated real time: the env keeps moving while a replan is in
        flight. Each replan is computed when the queue runs low and its chunk arrives
        ``delay_steps`` control steps later (default: its measured latency at ``hz``, rounded
        up), so the robot executes the old chunk meanwhile (starving, holding its last action,
        if that runs out). Deterministic for a fixed ``delay_steps`` (no threads, no sleeps).
        ``RunStats.actions`` and ``boundaries`` (the steps where a chunk took over) feed
        :func:`~policy_accel.eval.smoothness.action_smoothness`."""
        if not hz > 0:
            raise ValueError(f"hz must be positive, got {hz!r}.")
        if delay_steps is not None and (
            isinstance(delay_steps, bool) or not isinstance(delay_steps, int) or delay_steps < 0
        ):
            raise ValueError(
                f"delay_steps must be a non-negative int or None, got {delay_steps!r}."
            )
        period = 1.0 / hz
        self.reset()
        self.delay = DelayEstimator(period)
        obs, _ = env.reset(seed=seed)
        self.observe(obs)
        in_flight = self._simulated_plan(0, delay_steps, period)
        self._arrive(in_flight)  # the robot cannot move before its first chunk
        in_flight = None
        limit = max_steps if max_steps is not None else getattr(env, "max_episode_steps", 10**9)
        info: dict = {}
        for _ in range(limit):
            if in_flight is not None and in_flight[0] <= self.slot:
                self._arrive(in_flight)
                in_flight = None
            action = self.next_action()
            self.stats.actions.append(np.asarray(action))
            obs, done, info = self._act(env, action)
            if done:
                break
            self.observe(obs)
            if in_flight is None and self.queued() <= self.trigger_steps:
                in_flight = self._simulated_plan(self.slot, delay_steps, period)
        return self._finish(info)

    def _act(self, env: Any, action: np.ndarray) -> tuple[Any, bool, dict]:
        obs, reward, terminated, truncated, info = env.step(action)
        self.stats.steps += 1
        self.stats.total_reward += float(reward)
        return obs, bool(terminated or truncated), info

    def _finish(self, info: dict) -> RunStats:
        self.stats.delay_steps = self.delay.steps
        self.stats.success = bool(info.get("is_success", False))
        self.stats.info = {k: v for k, v in info.items() if np.isscalar(v)}
        return self.stats

    def _simulated_plan(self, slot: int, delay_steps: int | None, period: float) -> tuple:
        executed = 0 if self._last_plan_slot is None else slot - self._last_plan_slot
        self._last_plan_slot = slot
        held = self._held(slot, delay_steps)
        plan = self.controller.replan(history=self.history.stacked(), executed=executed, **held)
        latency_s = plan.record.latency_ms / 1e3
        self.delay.record(latency_s)
        delay = self.delay.steps_of(latency_s) if delay_steps is None else delay_steps
        return slot + delay, plan, slot

    def _arrive(self, in_flight: tuple) -> None:
        _, plan, slot = in_flight
        if self.stats.actions:
            self.stats.boundaries.append(len(self.stats.actions))
        self._merge(plan.chunk, slot, plan.record)

    def run(
        self,
        env: Any,
        hz: float,
        max_steps: int | None = None,
        seed: int | None = None,
        realtime: bool = True,
    ) -> RunStats:
        """One episode at ``hz``: reset, then each slot act, step, observe, and replan in the
        background when the queue runs low. ``realtime=False`` skips the waits (simulation as
        fast as the plans allow, with the same slot bookkeeping)."""
        if not hz > 0:
            raise ValueError(f"hz must be positive, got {hz!r}.")
        period = 1.0 / hz
        self.reset()
        self.delay = DelayEstimator(period)
        obs, _ = env.reset(seed=seed)
        self.observe(obs)
        self.submit()
        self.wait_for_plan()  # the robot cannot move before its first chunk
        start = time.perf_counter()
        limit = max_steps if max_steps is not None else getattr(env, "max_episode_steps", 10**9)
        info: dict = {}
        for step in range(limit):
            deadline = start + step * period
            if realtime:
                wait_until(deadline)
                error_ms = (time.perf_counter() - deadline) * 1e3
                self.stats.max_period_error_ms = max(self.stats.max_period_error_ms, error_ms)
                self.stats.late_steps += error_ms > 0.5 * period * 1e3
            elif self.queued() == 0 and self.planning:
                self.wait_for_plan()  # simulated time: the robot waits instead of starving
            obs, done, info = self._act(env, self.next_action())
            if done:
                break
            self.observe(obs)
            if self.queued() <= self.trigger_steps:
                self.submit()
        if self._thread is not None:
            self._thread.join()
        return self._finish(info)
