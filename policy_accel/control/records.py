"""What a replan cost and how it ended, and the statistics of many."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PlanRecord:
    """One row's replan.

    Attributes:
        latency_ms: wall time of the plan call (a batched call's, shared by its rows).
        rounds: sequential batched model calls (the latency unit), fallback steps included.
        model_evals: model evaluations of this row (JVP directions count; fallback included).
        converged: whether the solver met its tolerance.
        warm: whether the row started from its previous replan.
        method: the solver.
        deadline_hit: the budget stopped the solver early.
        fallback: the chunk came from the fallback sampler.
        shift: executed actions since the row's previous replan (0 when cold).
        jacobians: the solver started from a Jacobian estimate measured off the critical path.
        committed: actions inpainted as committed (executed while the plan was in flight).
    """

    latency_ms: float
    rounds: int
    model_evals: float
    converged: bool
    warm: bool
    method: str
    deadline_hit: bool = False
    fallback: bool = False
    shift: int = 0
    jacobians: bool = False
    committed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(records: Iterable[PlanRecord]) -> dict[str, float]:
    """Percentiles and means of plan records: what ``stats()`` returns and reports print."""
    records = list(records)
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
        "jacobians_fraction": float(np.mean([r.jacobians for r in records])),
    }
