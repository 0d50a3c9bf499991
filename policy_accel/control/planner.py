"""The one planning core: B rows in, one batched solve, a :class:`Plan` out.

Every controller plans through :class:`Planner`: the :class:`~policy_accel.control.Controller`
(one row and a queue), the :class:`~policy_accel.control.BatchController` (one row per env, what
``eval`` uses), the :class:`~policy_accel.control.AsyncController` and the server. A row is one
robot's sampling state (:class:`RowState`): its noise generator and its last replan.

Warm start. A row replanned ``k`` executed actions after its previous replan starts the solver
from that replan's clean-sample predictions shifted ``k`` entries along the policy's horizon axis
(edge-padded), rebuilt into a trajectory with the new replan's own noise
(:func:`~policy_accel.sampling.warm_start.warm_start_guess`). By default the noise is fresh,
drawn exactly as a cold replan draws it (``warm_noise="fresh"``): the solver converges to the
very sample the sequential sampler draws with the same seed, so a warm controller behaves like
the sequential one, and it needs no more rounds (chord on 16 recorded PushT replans: 6.8 with
fresh noise, 7.3 with shifted). ``warm_noise="shifted"`` instead reuses the previous replan's
noise shifted ``k`` entries, with a fresh tail
(:meth:`~policy_accel.sampling.warm_start.WarmStart.shifted_noise`): each chunk is still an
exact sample (marginally), but consecutive chunks share noise on their overlap, and on PushT's 50
test seeds that cost success (74% against 92%, the solver aside: sequential sampling with shifted
noise also reached 74%). This holds for every kind of policy, because the policy says what it
samples (``event_shape``, ``horizon_axis``): the shift moves the action and inpainted observation
channels alike, and a ``pred_action_steps_only`` sample (``n_action_steps`` long) is warm only
while fewer actions than its length were executed. A row starts cold after a reset, when
``warm_start`` is off, or when nothing of its previous sample is left to shift.

Jacobians off the critical path. With ``method="chord"`` and ``jacobian_stride``, once a plan's
chunk is decided the planner measures the model Jacobians at its converged trajectory on a
background thread (:meth:`Planner.refresh` is the same work, run by the caller), while the robot
executes the chunk; the row's next replan starts chord from them, shifted by the executed actions
(:meth:`~policy_accel.sampling.jacobians.Jacobians.shifted`). A replan never waits: a refresh still
running is dropped and the last finished estimate, shifted further, is used, or none.

Deadlines. With ``budget_ms`` no solver round starts after the budget: the solver's current
iterate (the best chunk available) comes back flagged ``deadline_hit``, so a plan overruns by at
most the round in flight; with ``fallback_steps`` it is replaced by a sequential
``fallback_scheduler`` (DDIM) sample at that many steps from the same initial noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from policy_accel.control.config import SamplerConfig
from policy_accel.control.records import PlanRecord
from policy_accel.execution import LocalExecutor
from policy_accel.policies.base import Policy
from policy_accel.sampling import sample
from policy_accel.sampling.jacobians import Jacobians, estimate_jacobians
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.schedulers import scheduler_like
from policy_accel.sampling.warm_start import WarmStart, warm_start_guess

DETERMINISTIC_FALLBACKS = ("ddim", "dpm_solver")


@dataclass
class RowState:
    """One row's sampling state: its noise stream and what its next replan starts from."""

    generator: torch.Generator
    warm: WarmStart | None = None
    jacobians: Jacobians | None = None  # measured this many executed actions before `warm`
    jacobians_offset: int = 0
    pending: Future | None = None  # the refresh of `warm`'s Jacobians, off the critical path
    pending_row: int = 0

    @classmethod
    def seeded(cls, seed: int) -> RowState:
        return cls(torch.Generator().manual_seed(int(seed)))

    def forget(self) -> None:
        """The next replan starts cold (a new episode); the noise stream goes on."""
        self.warm = None
        self.jacobians, self.pending = None, None

    def take_refresh(self) -> None:
        """Adopt the refresh of the last replan if it finished, else drop it (never wait)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.done() and pending.exception() is None:
            self.jacobians = pending.result().select(slice(self.pending_row, self.pending_row + 1))
            self.jacobians_offset = 0
        else:
            pending.cancel()

    def jacobians_for(self, shift: int, length: int, axis: int) -> Jacobians | None:
        total = self.jacobians_offset + shift
        if self.jacobians is None or total >= length:
            return None
        return self.jacobians.shifted(total, axis)


@dataclass(frozen=True)
class Plan:
    """What one planning call did.

    Attributes:
        actions: ``[B, n_action_steps, Da]`` the chunk each row executes (environment units).
        future: ``[B, T, Da]`` the predicted actions from the first executed one on (the chunk
            and what follows it in the sample, e.g. to hold while the next replan runs).
        records: one :class:`PlanRecord` per row (the batch's latency, rounds and status,
            each row's warm start, Jacobian estimate and committed actions).
        result: the solver's :class:`~policy_accel.sampling.SampleResult`.
        problem: the problem that was solved (its noise is the rows' noise).
        observations: the stacked histories it was planned from (``{key: [B, n_obs_steps,
            ...]}``), to replay or re-solve the same replan.
    """

    actions: np.ndarray
    future: np.ndarray
    records: tuple[PlanRecord, ...]
    result: SampleResult
    problem: DenoisingProblem = field(repr=False)
    observations: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def chunk(self) -> np.ndarray:
        """The first row's chunk (a one-row plan's)."""
        return self.actions[0]

    @property
    def record(self) -> PlanRecord:
        """The first row's record (a one-row plan's)."""
        return self.records[0]


def _committed_counts(committed: np.ndarray | None, rows: int) -> list[int]:
    if committed is None:
        return [0] * rows
    known = np.isfinite(np.asarray(committed, dtype=np.float64)).all(axis=-1)
    return [int(k.sum()) for k in known]


class Planner:
    """Plans B rows of one policy with one sampler configuration.

    Args:
        policy: the loaded policy.
        sampler: how to sample (:class:`~policy_accel.control.config.SamplerConfig`).
        n_action_steps: actions executed per plan (default: the policy's; at most its chunk).
        executor: where the denoiser runs (default: ``sampler.executor``, else the policy's
            device).
    """

    def __init__(
        self,
        policy: Policy,
        sampler: SamplerConfig | None = None,
        n_action_steps: int | None = None,
        executor=None,
    ) -> None:
        self.policy = policy
        self.sampler = sampler if sampler is not None else SamplerConfig()
        chunk = policy.n_action_steps
        n_action_steps = chunk if n_action_steps is None else n_action_steps
        if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, int):
            raise ValueError(f"n_action_steps must be an int. Got {n_action_steps!r}.")
        if not 1 <= n_action_steps <= chunk:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be between 1 and the policy's chunk of "
                f"{chunk} actions."
            )
        self.n_action_steps = n_action_steps
        self.scheduler = scheduler_like(policy.scheduler, self.sampler.scheduler)
        self.num_steps = self.sampler.num_inference_steps or policy.num_inference_steps
        self.fallback_scheduler = None
        if self.sampler.fallback_steps is not None:
            if self.sampler.fallback_scheduler not in DETERMINISTIC_FALLBACKS:
                raise ValueError(
                    f"fallback_scheduler must be one of {list(DETERMINISTIC_FALLBACKS)} (a "
                    f"deterministic sampler). Got {self.sampler.fallback_scheduler!r}."
                )
            self.fallback_scheduler = scheduler_like(
                policy.scheduler, self.sampler.fallback_scheduler
            )
        if executor is None and not self.sampler.executor.is_default:
            executor = self.sampler.executor.build()
        self.executor = executor
        self.length = policy.event_shape[policy.horizon_axis]
        self._refresher: ThreadPoolExecutor | None = None

    def rows(self, seeds: Sequence[int]) -> list[RowState]:
        return [RowState.seeded(seed) for seed in seeds]

    def can_warm(self, row: RowState, shift: int) -> bool:
        """Whether ``row``'s next replan, ``shift`` executed actions later, starts warm."""
        return (
            self.sampler.warm_start
            and row.warm is not None
            and row.warm.num_steps == self.num_steps
            and 0 <= shift < self.length
        )

    def plan(
        self,
        obs: dict[str, np.ndarray],
        rows: Sequence[RowState],
        shifts: int | Sequence[int],
        committed: np.ndarray | None = None,
        overlap: np.ndarray | None = None,
    ) -> Plan:
        """One batched replan of ``rows`` from their stacked histories ``obs`` (``{key: [B,
        n_obs_steps, ...]}``), each ``shifts[r]`` executed actions after its previous replan.
        ``committed [B, d, Da]`` (environment units, NaN where a row is free): actions the rows
        execute while this plan is in flight, inpainted into the sample so the chunk continues
        them, and ``overlap [B, m, Da]`` the previous chunk's actions after those, guided
        with decaying weights (soft inpainting; both as in
        :meth:`~policy_accel.policies.base.Policy.problem`).
        Updates each row's state; a plan that raises leaves the rows' warm starts as they were
        (their generators may have advanced: callers that must be exact restore them)."""
        start = time.perf_counter()
        rows = list(rows)
        shifts = [int(shifts)] * len(rows) if isinstance(shifts, (int, np.integer)) else shifts
        if len(shifts) != len(rows):
            raise ValueError(f"{len(shifts)} shifts for {len(rows)} rows.")
        warm = [self.can_warm(row, shift) for row, shift in zip(rows, shifts, strict=True)]
        shifted = self.sampler.warm_noise == "shifted"
        draws = [
            row.warm.shifted_noise(shift, self.policy.horizon_axis, row.generator)
            if is_warm and shifted
            else self.policy.draw_noise(row.generator, 1, self.num_steps)
            for row, shift, is_warm in zip(rows, shifts, warm, strict=True)
        ]
        device = self.policy.device
        problem = self.policy.problem(
            obs,
            x_T=torch.cat([d[0] for d in draws]).to(device),
            noise=torch.cat([d[1] for d in draws], dim=1).to(device),
            scheduler=self.scheduler,
            num_inference_steps=self.num_steps,
            committed=committed,
            overlap=overlap,
        )
        init = None
        if any(warm):
            previous = [row.warm if w else None for row, w in zip(rows, warm, strict=True)]
            init = warm_start_guess(
                problem, previous, shifts, self.policy.horizon_axis, self.sampler.warm_space
            )
        budget = self.sampler.budget_ms
        deadline = None if budget is None else start + budget / 1e3
        options = self.sampler.solver_options(deadline)
        estimated, measured = self._estimates(rows, shifts, warm)
        if estimated is not None:
            options["jacobians"] = estimated
        result = sample(problem, self.sampler.method, init=init, executor=self.executor, **options)
        deadline_hit = bool(result.stats.get("deadline_hit", False))
        fallback = deadline_hit and self.fallback_scheduler is not None
        x0 = self._fallback(obs, problem) if fallback else result.sample
        decoded = self.policy.decode(x0)
        actions = decoded["action"][:, : self.n_action_steps].cpu().numpy()
        future = decoded["action_pred"][:, self.policy.action_start :].cpu().numpy()
        if not np.all(np.isfinite(future)):
            raise FloatingPointError(
                f"the policy produced non-finite actions ({self.sampler.method}, "
                f"converged={result.converged}); check the observation and the checkpoint."
            )
        for row, state, shift in zip(rows, WarmStart.rows(problem, result), shifts, strict=True):
            row.warm = state
            row.jacobians_offset += shift
        if self.sampler.jacobian_stride is not None and self.sampler.warm_start:
            self._start_refresh(rows, problem, result.trajectory)
        latency_ms = (time.perf_counter() - start) * 1e3
        extra = self.sampler.fallback_steps if fallback else 0
        records = tuple(
            PlanRecord(
                latency_ms=latency_ms,
                rounds=int(result.rounds) + extra,
                model_evals=result.model_evals / len(rows) + extra,
                converged=bool(result.converged),
                warm=bool(is_warm),
                method=self.sampler.method,
                deadline_hit=deadline_hit,
                fallback=fallback,
                shift=shift if is_warm else 0,
                jacobians=has_jacobians,
                committed=held,
                batch_rows=len(rows),
            )
            for shift, is_warm, has_jacobians, held in zip(
                shifts, warm, measured, _committed_counts(committed, len(rows)), strict=True
            )  # fmt: skip
        )
        return Plan(actions, future, records, result, problem, obs)

    def _estimates(self, rows, shifts, warm) -> tuple[Jacobians | None, list[bool]]:
        """The rows' Jacobian estimates for this replan, batched (a row without one gets a
        zero model part, i.e. picard's coefficient; ``None`` when no row has one), and which
        rows have one."""
        if self.sampler.jacobian_stride is None:
            return None, [False] * len(rows)
        for row in rows:
            row.take_refresh()
        axis = self.policy.horizon_axis
        found = [
            row.jacobians_for(shift, self.length, axis) if is_warm else None
            for row, shift, is_warm in zip(rows, shifts, warm, strict=True)
        ]
        measured = [j is not None for j in found]
        known = next((j for j in found if j is not None), None)
        if known is None:
            return None, measured
        zero = Jacobians(torch.zeros_like(known.model), known.positions, known.num_steps,
                         known.event_shape)  # fmt: skip
        return Jacobians.cat([j if j is not None else zero for j in found]), measured

    def refresh(self, problem: DenoisingProblem, trajectory: torch.Tensor) -> Jacobians:
        """The off-critical-path work of a chord replan: the model Jacobians of every
        ``jacobian_stride``-th step at ``problem``'s converged ``trajectory`` (one row per
        problem row). Costs ``E`` model evaluations per measured step and row
        (:attr:`~policy_accel.sampling.jacobians.Jacobians.evaluations`)."""
        executor = self.executor if self.executor is not None else LocalExecutor()
        return estimate_jacobians(problem, trajectory, executor, self.sampler.jacobian_stride)

    def _start_refresh(self, rows, problem: DenoisingProblem, trajectory: torch.Tensor) -> None:
        if self._refresher is None:
            self._refresher = ThreadPoolExecutor(1, thread_name_prefix="policy-accel-jacobians")
        future = self._refresher.submit(self.refresh, problem, trajectory.detach())
        for index, row in enumerate(rows):
            if row.pending is not None:
                row.pending.cancel()
            row.pending, row.pending_row = future, index

    def close(self) -> None:
        """Stop the background refresh thread (unfinished refreshes are dropped)."""
        if self._refresher is not None:
            self._refresher.shutdown(wait=False, cancel_futures=True)
            self._refresher = None

    def _fallback(self, obs: dict, problem: DenoisingProblem) -> torch.Tensor:
        fallback = self.policy.problem(
            obs,
            x_T=problem.x_T,
            scheduler=self.fallback_scheduler,
            num_inference_steps=self.sampler.fallback_steps,
        )
        return sample(fallback, "sequential", executor=self.executor).sample

    def reference(self, plan: Plan) -> np.ndarray:
        """The sequential sampler's chunks for ``plan``'s problem (its rows' observations and
        noise): the exact samples the plan converges to, which benchmarks compare against."""
        x0 = sample(plan.problem, "sequential", executor=self.executor).sample
        return self.policy.decode(x0)["action"][:, : self.n_action_steps].cpu().numpy()
