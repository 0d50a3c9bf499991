"""Many robots (or simulated envs) stepping in lockstep, planned by one batched policy call.

:class:`BatchController` is the :class:`~policy_accel.control.Controller` for ``B`` rows at once,
used by rollout evaluation: every row keeps its own observation history, its own noise stream
(seeded per row, so two samplers evaluated on the same seeds see the same noise whatever the
batch composition) and its own warm-start state; a row that starts a new episode is planned cold
while the others stay warm. All rows replan together, after the same number of executed steps.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from policy_accel.control.controller import (
    PlanRecord,
    check_sampler,
    fresh_noise,
    latency_stats,
)
from policy_accel.policies.base import Policy
from policy_accel.sampling import sample
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.warm_start import shift_noise, warm_start_guess


def chunk_start(policy: Policy) -> int:
    """Index of the first executed action inside the policy's predicted horizon."""
    x0 = torch.linspace(-1, 1, policy.horizon * policy.action_dim).reshape(
        1, policy.horizon, policy.action_dim
    )
    with torch.no_grad():
        out = policy.decode(x0.to(policy.device))
    action, pred = out["action"][0].cpu(), out["action_pred"][0].cpu()
    n = action.shape[0]
    for start in range(pred.shape[0] - n + 1):
        if torch.allclose(pred[start : start + n], action):
            return start
    raise ValueError(f"{type(policy).__name__}: executed actions are not a slice of action_pred")


class BatchController:
    """``plan(obs, new_episode)`` for a batch of ``len(seeds)`` rows.

    Args:
        policy: the loaded policy.
        seeds: one noise seed per row (combined with ``noise_seed``); ``reseed`` changes a row's.
        method, warm_start, solver_options: as for :class:`~policy_accel.control.Controller`.
    """

    def __init__(
        self,
        policy: Policy,
        seeds: list[int],
        method: str = "picard",
        warm_start: bool = True,
        noise_seed: int = 0,
        warm_space: str = "prediction",
        executor: Any = None,
        **solver_options: Any,
    ) -> None:
        check_sampler(method, warm_space)
        self.policy = policy
        self.method = method
        self.warm_start = warm_start
        self.noise_seed = noise_seed
        self.warm_space = warm_space
        self.executor = executor
        self.solver_options = solver_options
        self.start = chunk_start(policy)
        self.batch = len(seeds)
        self.generators = [self._generator(seed) for seed in seeds]
        self.history: dict[str, np.ndarray] | None = None
        self.last_result: SampleResult | None = None
        self.last_noise: tuple[torch.Tensor, torch.Tensor] | None = None
        self.records: list[PlanRecord] = []
        self.row_records: list[list[int]] = [[] for _ in seeds]

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.noise_seed * 1_000_003 + int(seed))

    def reseed(self, row: int, seed: int) -> None:
        """Row ``row`` starts the episode of ``seed``: its own noise stream, planned cold."""
        self.generators[row] = self._generator(seed)
        self.row_records[row] = []

    # -- history ------------------------------------------------------------------------------
    def _as_dict(self, obs: Any) -> dict[str, np.ndarray]:
        if isinstance(obs, dict):
            return {key: np.asarray(value) for key, value in obs.items()}
        (key,) = self.policy.observation_spec
        return {key: np.asarray(obs)}

    def start_rows(self, obs: Any, rows: np.ndarray) -> None:
        """Rows ``rows`` start an episode with ``obs`` (batched; other rows ignored): their
        history is that observation repeated, as DiffusionPolicy pads after a reset."""
        obs = self._as_dict(obs)
        steps = self.policy.n_obs_steps
        if self.history is None:
            self.history = {
                key: np.repeat(value[:, None], steps, axis=1).copy() for key, value in obs.items()
            }
        for key, value in obs.items():
            self.history[key][rows] = value[rows][:, None]

    def observe(self, obs: Any) -> None:
        """One new observation per row (batched), after each env step."""
        if self.history is None:
            raise RuntimeError("BatchController.observe before start_rows().")
        for key, value in self._as_dict(obs).items():
            hist = self.history[key]
            hist[:, :-1] = hist[:, 1:]
            hist[:, -1] = value

    # -- planning -----------------------------------------------------------------------------
    def plan(self, new_episode: np.ndarray, executed: int) -> np.ndarray:
        """Plan every row from its history; rows in ``new_episode`` cold, the others warm (if
        enabled) after ``executed`` steps. Returns the predicted future ``(B, H - start, Da)``
        (its first ``n_action_steps`` are the chunk to execute)."""
        if self.history is None:
            raise RuntimeError("BatchController.plan before start_rows().")
        begin = time.perf_counter()
        new_episode = np.asarray(new_episode, dtype=bool)
        can_warm = (
            self.warm_start and self.last_result is not None and 0 < executed < self.policy.horizon
        )
        warm_rows = ~new_episode if can_warm else np.zeros(self.batch, dtype=bool)
        draws = []
        for row in range(self.batch):
            if warm_rows[row]:
                x_T, noise = self.last_noise
                draws.append(
                    shift_noise(
                        x_T[row : row + 1],
                        noise[:, row : row + 1],
                        executed,
                        generator=self.generators[row],
                    )
                )
            else:
                draws.append(fresh_noise(self.policy, self.generators[row]))
        x_T = torch.cat([d[0] for d in draws])
        noise = torch.cat([d[1] for d in draws], dim=1)
        device = self.policy.device
        problem = self.policy.problem(
            dict(self.history), x_T=x_T.to(device), noise=noise.to(device)
        )
        init = None
        if warm_rows.any():
            init = warm_start_guess(problem, self.last_result, executed, space=self.warm_space)
            cold = torch.as_tensor(~warm_rows, device=init.device)
            init[:, cold] = problem.x_T[cold].unsqueeze(0)  # ParaDiGMS' cold start for new rows
        result = sample(
            problem, self.method, init=init, executor=self.executor, **self.solver_options
        )
        decoded = self.policy.decode(result.sample)
        future = decoded["action_pred"][:, self.start :].cpu().numpy()
        if not np.all(np.isfinite(future)):
            raise FloatingPointError(f"non-finite actions from the policy ({self.method}).")
        self.last_result, self.last_noise = result, (x_T, noise)
        record = PlanRecord(
            latency_ms=(time.perf_counter() - begin) * 1e3,
            rounds=int(result.rounds),
            model_evals=int(result.model_evals) // self.batch,
            converged=bool(result.converged),
            warm=bool(warm_rows.all()),
            method=self.method,
            shift=executed if can_warm else 0,
        )
        self.records.append(record)
        for row in range(self.batch):
            self.row_records[row].append(len(self.records) - 1)
        return future

    def stats(self) -> dict[str, float]:
        return latency_stats(self.records)
