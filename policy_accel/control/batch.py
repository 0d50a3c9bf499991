"""Many robots (or simulated envs) stepping in lockstep, planned by one batched call.

:class:`BatchController` is the planning core (:class:`~policy_accel.control.planner.Planner`)
with ``B`` rows and their histories, used by rollout evaluation: every row keeps its own
observation history, its own noise stream (seeded per row, so two samplers evaluated on the same
seeds see the same noise whatever the batch composition, and a row sees the noise a
:class:`~policy_accel.control.Controller` with the same seed would) and its own warm start; a row
that starts a new episode is planned cold while the others stay warm. All rows replan together,
after the same number of executed steps. Budgets and the fallback apply as for the Controller.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policy_accel.control.config import SamplerConfig
from policy_accel.control.planner import Plan, Planner
from policy_accel.control.records import PlanRecord, batch_stats
from policy_accel.policies.base import Policy


def row_seed(noise_seed: int, seed: int) -> int:
    """The noise seed of the row that runs episode ``seed`` (with ``noise_seed`` 0: ``seed``,
    what a Controller seeded with the episode's seed draws)."""
    return noise_seed * 1_000_003 + int(seed)


class BatchController:
    """``plan(new_episode, executed)`` for a batch of ``len(seeds)`` rows.

    Args:
        policy: the loaded policy.
        seeds: one noise seed per row (combined with ``noise_seed``); ``reseed`` changes a row's.
        sampler, n_action_steps, executor, settings: as for
            :class:`~policy_accel.control.Controller`.
    """

    def __init__(
        self,
        policy: Policy,
        seeds: list[int],
        sampler: SamplerConfig | None = None,
        *,
        n_action_steps: int | None = None,
        noise_seed: int = 0,
        executor: Any = None,
        **settings: Any,
    ) -> None:
        self.policy = policy
        self.sampler = SamplerConfig.from_settings(sampler, **settings)
        self.planner = Planner(policy, self.sampler, n_action_steps, executor)
        self.n_action_steps = self.planner.n_action_steps
        self.noise_seed = noise_seed
        self.batch = len(seeds)
        self.rows = self.planner.rows([row_seed(noise_seed, seed) for seed in seeds])
        self.history: dict[str, np.ndarray] | None = None
        self.records: list[tuple[PlanRecord, ...]] = []  # every row's record, one tuple a plan

    def reseed(self, row: int, seed: int) -> None:
        """Row ``row`` starts the episode of ``seed``: its own noise stream, planned cold."""
        self.rows[row] = self.planner.rows([row_seed(self.noise_seed, seed)])[0]

    # -- history ------------------------------------------------------------------------------
    def _checked(self, obs: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``obs`` as ``{key: [B, *shape]}`` with rows ``rows`` validated (as a Controller
        validates its observations); other rows are taken as they are."""
        if not isinstance(obs, dict):
            (key,) = self.policy.observation_spec
            obs = {key: obs}
        obs = {key: np.asarray(value) for key, value in self.policy.rename_observation(obs).items()}
        checked = {
            key: np.array(obs[key], dtype=np.float32) for key in self.policy.observation_spec
        }
        for row in np.flatnonzero(rows):
            step = self.policy.check_observation_step(
                {key: value[row] for key, value in obs.items()}
            )
            for key, value in step.items():
                checked[key][row] = value
        return checked

    def start_rows(self, obs: Any, rows: np.ndarray) -> None:
        """Rows ``rows`` start an episode with ``obs`` (batched; other rows ignored): their
        history is that observation repeated, as DiffusionPolicy pads after a reset."""
        rows = np.asarray(rows, dtype=bool)
        obs = self._checked(obs, rows)
        steps = self.policy.n_obs_steps
        if self.history is None:
            self.history = {
                key: np.repeat(value[:, None], steps, axis=1).copy() for key, value in obs.items()
            }
        for key, value in obs.items():
            self.history[key][rows] = value[rows][:, None]
        for row in np.flatnonzero(rows):
            self.rows[row].forget()

    def observe(self, obs: Any, rows: np.ndarray | None = None) -> None:
        """One new observation per row (batched), after each env step; ``rows`` (default: all)
        are validated."""
        if self.history is None:
            raise RuntimeError("BatchController.observe before start_rows().")
        rows = np.ones(self.batch, dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
        for key, value in self._checked(obs, rows).items():
            hist = self.history[key]
            hist[:, :-1] = hist[:, 1:]
            hist[:, -1] = value

    # -- planning -----------------------------------------------------------------------------
    def plan(
        self,
        new_episode: np.ndarray,
        executed: int,
        committed: np.ndarray | None = None,
        overlap: np.ndarray | None = None,
    ) -> Plan:
        """Plan every row from its history; rows in ``new_episode`` cold, the others warm (if
        enabled) ``executed`` steps after their previous plan. ``committed [B, d, Da]`` (NaN
        where a row is free): actions inpainted into each row's chunk, ``overlap [B, m, Da]``
        the old chunk's actions after them, followed softly (see
        :meth:`~policy_accel.control.planner.Planner.plan`)."""
        if self.history is None:
            raise RuntimeError("BatchController.plan before start_rows().")
        for row in np.flatnonzero(np.asarray(new_episode, dtype=bool)):
            self.rows[row].forget()
        plan = self.planner.plan(
            dict(self.history), self.rows, executed, committed=committed, overlap=overlap
        )
        self.records.append(plan.records)
        return plan

    def reference(self, plan: Plan) -> np.ndarray:
        """The sequential sampler's chunks for ``plan``'s observations and noise."""
        return self.planner.reference(plan)

    def stats(self) -> dict[str, float]:
        """Statistics over every row of every plan (:func:`~policy_accel.control.records.
        batch_stats`): the warm and Jacobian fractions count each row's own replans."""
        return batch_stats(self.records)
