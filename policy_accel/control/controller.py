"""Closed-loop control with a diffusion policy: receding horizon, warm starts, deadlines.

``Controller.act(obs)`` is one environment step: it keeps the ``n_obs_steps`` history (the first
observation repeated after a reset), replans when the action queue is empty, and returns the next
action. ``plan(obs)`` replans now and returns the chunk.

Warm start. After ``k`` executed actions the new replan's noise is the previous replan's noise
shifted ``k`` entries along the horizon, with fresh noise for the new tail
(:func:`~policy_accel.sampling.warm_start.shift_noise`), and the previous converged trajectory,
shifted the same way, is the solver's first guess. The solver still converges to the exact sample
of the new observation for that noise, so each chunk is an exact sample of the policy (marginally
exact); consecutive chunks share noise on their overlap, which keeps them temporally coherent.
``warm_start=False`` draws fresh noise every replan (independent chunks, cold solves).

Deadlines. With ``budget_ms``, no solver round starts after the budget: the Controller returns the
solver's current iterate (the best available chunk) flagged ``converged=False, deadline_hit=True``,
so it overruns by at most the round in flight. With ``fallback_steps`` it then re-plans with
DDIM at that many steps (deterministic, sequential) from the same initial noise: a cheaper,
coarser sampler whose cost is known in advance.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from envs.receding_horizon import ObservationHistory
from policy_accel.policies.base import Policy
from policy_accel.sampling import SOLVERS, sample
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.warm_start import SPACES, shift_noise, warm_start_guess


@dataclass
class PlanRecord:
    """What one replan cost and how it ended."""

    latency_ms: float
    rounds: int
    model_evals: int
    converged: bool
    warm: bool
    method: str
    deadline_hit: bool = False
    fallback: bool = False
    shift: int = 0


def fresh_noise(policy: Policy, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_T [1, H, Da]`` and the per-step noise ``[N, 1, H, Da]`` of one cold replan, drawn in
    this order from ``generator`` (the Controller and each BatchController row draw alike)."""
    shape = (1, policy.horizon, policy.action_dim)
    x_T = torch.randn(shape, generator=generator)
    noise = torch.randn((policy.num_inference_steps, *shape), generator=generator)
    return x_T, noise


def check_sampler(method: str, warm_space: str) -> None:
    """The settings the Controller and BatchController share, refused with the valid choices."""
    if method not in SOLVERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(SOLVERS)}.")
    if warm_space not in SPACES:
        raise ValueError(f"warm_space must be one of {list(SPACES)}, got {warm_space!r}.")


def latency_stats(records: list[PlanRecord]) -> dict[str, float]:
    """Percentiles and means of a list of plan records (what ``stats()`` returns)."""
    if not records:
        return {"n_plans": 0}
    latency = np.array([r.latency_ms for r in records])
    rounds = np.array([r.rounds for r in records])
    return {
        "n_plans": len(records),
        "latency_ms_p50": float(np.percentile(latency, 50)),
        "latency_ms_p95": float(np.percentile(latency, 95)),
        "latency_ms_p99": float(np.percentile(latency, 99)),
        "latency_ms_mean": float(latency.mean()),
        "rounds_mean": float(rounds.mean()),
        "rounds_p50": float(np.percentile(rounds, 50)),
        "rounds_p90": float(np.percentile(rounds, 90)),
        "model_evals_mean": float(np.mean([r.model_evals for r in records])),
        "converged_fraction": float(np.mean([r.converged for r in records])),
        "warm_fraction": float(np.mean([r.warm for r in records])),
        "deadline_misses": int(sum(r.deadline_hit for r in records)),
        "fallbacks": int(sum(r.fallback for r in records)),
    }


class Controller:
    """Receding-horizon control of one robot with ``policy``, sampling by ``method``.

    Args:
        policy: a loaded policy (:func:`policy_accel.load_policy`).
        method: a solver name (``sequential``, ``picard``, ``paradigms``, ``taa``, ``srds``,
            ``newton``).
        warm_start: carry the previous replan's trajectory and noise over (see module docs).
        n_action_steps: actions executed per plan (default: the policy's; at most its chunk).
        budget_ms: per-replan time budget (see module docs); ``None``: no deadline.
        fallback_steps: DDIM steps of the fallback sampler used when the budget is missed.
        seed: seed of the noise generator (each ``reset`` continues the same stream).
        warm_space: ``"prediction"`` (recommended) or ``"trajectory"``, see
            :func:`~policy_accel.sampling.warm_start.warm_start_guess`.
        executor: where the denoiser runs (default: the policy's device).
        solver_options: passed to the solver (``tolerance``, ``window``, ``max_rounds``, ...).
    """

    def __init__(
        self,
        policy: Policy,
        method: str = "picard",
        warm_start: bool = True,
        n_action_steps: int | None = None,
        budget_ms: float | None = None,
        fallback_steps: int | None = None,
        seed: int = 0,
        warm_space: str = "prediction",
        executor: Any = None,
        **solver_options: Any,
    ) -> None:
        check_sampler(method, warm_space)
        chunk = policy.n_action_steps
        n_action_steps = chunk if n_action_steps is None else int(n_action_steps)
        if not 1 <= n_action_steps <= chunk:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be between 1 and the policy's chunk of "
                f"{chunk} actions."
            )
        if budget_ms is not None and not budget_ms > 0:
            raise ValueError(f"budget_ms must be positive or None, got {budget_ms!r}.")
        if fallback_steps is not None and budget_ms is None:
            raise ValueError("fallback_steps only applies with a budget_ms.")
        if method == "sequential" and budget_ms is not None:
            raise ValueError(
                "the sequential sampler cannot stop early: use a parallel method with budget_ms."
            )
        self.policy = policy
        self.method = method
        self.warm_start = warm_start
        self.n_action_steps = n_action_steps
        self.budget_ms = budget_ms
        self.fallback_steps = fallback_steps
        self.warm_space = warm_space
        self.executor = executor
        self.solver_options = solver_options
        self.generator = torch.Generator().manual_seed(seed)
        self.records: list[PlanRecord] = []
        self.history = ObservationHistory(policy.n_obs_steps)
        self._fallback_scheduler = None
        self.reset()

    # -- public API ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new episode: empty history, queue and warm-start state (records are kept)."""
        self.history = ObservationHistory(self.policy.n_obs_steps)
        self.queue: deque[np.ndarray] = deque()
        self.last_result: SampleResult | None = None
        self.last_noise: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_chunk: np.ndarray | None = None
        self._executed_since_plan = 0

    def act(self, obs: Any) -> np.ndarray:
        """One control step: record ``obs``, replan if the queue is empty, return an action.
        An observation that is refused, or whose replan fails, leaves the Controller as it was
        (history, queue, noise stream)."""
        with self._transaction():
            self.observe(obs)
            if not self.queue:
                self.replan()
        self._executed_since_plan += 1
        return self.queue.popleft()

    def plan(self, obs: Any) -> np.ndarray:
        """Record ``obs`` and replan now; returns (and queues) the new chunk
        ``(n_action_steps, action_dim)``. A refused observation or a failed plan changes
        nothing."""
        with self._transaction():
            self.observe(obs)
            return self.replan().copy()

    def observe(self, obs: Any) -> None:
        """Add ``obs`` to the history (the first after a reset fills it). It is validated first
        (:meth:`~policy_accel.policies.Policy.check_observation_step`): a refused observation
        raises :class:`~policy_accel.policies.ObservationError` and is not recorded."""
        step = self.policy.check_observation_step(obs)
        if len(self.history) == 0:
            self.history.reset(step)
        else:
            self.history.append(step)

    @contextmanager
    def _transaction(self):
        """Restore the history and the noise generator if the block raises."""
        history = self.history.copy()
        generator_state = self.generator.get_state()
        try:
            yield
        except BaseException:
            self.history = history
            self.generator.set_state(generator_state)
            raise

    def replan(self, history: Any = None, executed: int | None = None) -> np.ndarray:
        """Plan from ``history`` (a stacked ``(n_obs_steps, ...)`` snapshot; default: the
        Controller's own) given ``executed`` actions since the previous plan's observation
        (default: as counted by :meth:`act`); queues and returns the chunk. The asynchronous
        runtime calls this from its planning thread with its own snapshot."""
        return self._replan(history, executed)

    def reference_chunk(self, history: Any = None) -> np.ndarray:
        """The sequential sampler's chunk for the last plan's observation ``history`` (default:
        the Controller's own) and noise: the exact sample the last plan converges to, which
        benchmarks compare solvers against."""
        if self.last_noise is None:
            raise RuntimeError("reference_chunk needs a plan first.")
        x_T, noise = (t.to(self.policy.device) for t in self.last_noise)
        problem = self.policy.problem(self._policy_obs(history), x_T=x_T, noise=noise)
        x0 = sample(problem, "sequential", executor=self.executor).sample
        return self.policy.decode(x0)["action"][0, : self.n_action_steps].cpu().numpy()

    def stats(self) -> dict[str, float]:
        """Latency p50/p95/p99, rounds, model evaluations, converged and warm fractions."""
        return latency_stats(self.records)

    # -- internals ----------------------------------------------------------------------------
    def _policy_obs(self, stacked: Any = None) -> dict[str, np.ndarray]:
        stacked = self.history.stacked() if stacked is None else stacked
        if isinstance(stacked, dict):
            return {key: value[None] for key, value in stacked.items()}
        keys = list(self.policy.observation_spec)
        if len(keys) != 1:
            raise ValueError(
                f"this policy takes a dict observation with keys {keys}; got a single array."
            )
        return {keys[0]: stacked[None]}

    def _replan(self, history: Any = None, executed: int | None = None) -> np.ndarray:
        start = time.perf_counter()
        shift = self._executed_since_plan if executed is None else int(executed)
        warm = (
            self.warm_start
            and self.last_result is not None
            and self.last_result.trajectory.shape[0] == self.policy.num_inference_steps + 1
            and shift < self.policy.horizon
        )
        if warm:
            x_T, noise = self.last_noise
            if shift:
                x_T, noise = shift_noise(x_T, noise, shift, generator=self.generator)
        else:
            x_T, noise = fresh_noise(self.policy, self.generator)
        device = self.policy.device
        obs = self._policy_obs(history)
        problem = self.policy.problem(obs, x_T=x_T.to(device), noise=noise.to(device))
        init = None
        if warm:
            init = warm_start_guess(problem, self.last_result, shift, space=self.warm_space)
        options = dict(self.solver_options)
        if self.budget_ms is not None:
            options["deadline"] = start + self.budget_ms / 1e3
        result = sample(problem, self.method, init=init, executor=self.executor, **options)
        deadline_hit = bool(result.stats.get("deadline_hit", False))
        x0 = result.sample
        fallback = deadline_hit and self.fallback_steps is not None
        if fallback:
            x0 = self._fallback_sample(obs, x_T)
        chunk = self.policy.decode(x0)["action"][0, : self.n_action_steps].cpu().numpy()
        if not np.all(np.isfinite(chunk)):
            raise FloatingPointError(
                f"the policy produced a non-finite action chunk ({self.method}, "
                f"converged={result.converged}); check the observation and the checkpoint."
            )
        self.last_result, self.last_noise = result, (x_T, noise)
        self.last_chunk = chunk
        self.queue = deque(chunk)
        self._executed_since_plan = 0
        self.records.append(
            PlanRecord(
                latency_ms=(time.perf_counter() - start) * 1e3,
                rounds=int(result.rounds) + (self.fallback_steps if fallback else 0),
                model_evals=int(result.model_evals) + (self.fallback_steps if fallback else 0),
                converged=bool(result.converged),
                warm=bool(warm),
                method=self.method,
                deadline_hit=deadline_hit,
                fallback=fallback,
                shift=shift if warm else 0,
            )
        )
        return chunk

    def _fallback_sample(self, obs: dict, x_T: torch.Tensor) -> torch.Tensor:
        if self._fallback_scheduler is None:
            self._fallback_scheduler = DDIMScheduler.from_config(self.policy.scheduler.config)
        problem = self.policy.problem(
            obs,
            x_T=x_T.to(self.policy.device),
            scheduler=self._fallback_scheduler,
            num_inference_steps=self.fallback_steps,
        )
        return sample(problem, "sequential", executor=self.executor).sample
