"""What a replan cost and how it ended, and the statistics of many."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PlanRecord:
    """One row's replan.

    A plan of ``batch_rows`` rows is one batched solve: its rows share ``latency_ms``,
    ``rounds``, ``converged``, ``deadline_hit`` and ``fallback`` (the solver iterates every row
    until the worst meets the tolerance, so a converged batch has every row converged, and an
    unconverged one has at least one row short of it). ``warm``, ``shift``, ``jacobians`` and
    ``committed`` are the row's own.

    Attributes:
        latency_ms: wall time of the plan call (the batch's).
        rounds: sequential batched model calls (the latency unit), fallback steps included
            (the batch's).
        model_evals: model evaluations per row (the batch's total over ``batch_rows``; JVP
            directions count; fallback included).
        converged: whether the solver met its tolerance (on every row of the batch).
        warm: whether the row started from its previous replan.
        method: the solver.
        deadline_hit: the budget stopped the solver early (the batch's).
        fallback: the chunk came from the fallback sampler (the batch's).
        shift: executed actions since the row's previous replan (0 when cold).
        jacobians: the row started from a Jacobian estimate measured off the critical path.
        committed: actions inpainted as committed (executed while the plan was in flight).
        batch_rows: rows planned by the same batched solve (1: a lone robot's plan).
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
    batch_rows: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(records: Iterable[PlanRecord]) -> dict[str, float]:
    """Percentiles and means of plan records, one per row and plan (a batched plan's latency
    and rounds count once for each of its rows, as each robot waited for them): what
    ``stats()`` returns and reports print."""
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


def batch_stats(plans: Iterable[Sequence[PlanRecord]]) -> dict[str, float]:
    """:func:`latency_stats` over every row of every batched plan (``plans``: the rows'
    records of each plan), with ``n_batched_plans`` the number of plans."""
    plans = list(plans)
    return {
        **latency_stats(record for rows in plans for record in rows),
        "n_batched_plans": len(plans),
    }
