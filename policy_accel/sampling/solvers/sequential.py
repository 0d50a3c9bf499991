"""The sequential reference: the scheduler's own loop, one denoiser call per step."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.solvers.windows import finish_sequentially, initial_trajectory
from policy_accel.sampling.step_map import StepMap


@dataclass(frozen=True)
class SequentialOptions:
    """The sequential loop takes no options."""


def sequential(
    problem: DenoisingProblem,
    init: Tensor | None,
    executor: Executor,
    options: SequentialOptions,
) -> SampleResult:
    """``x[i+1] = step_i(x[i], D(x[i], t_i)) + s_i z_i`` for i = 0..N-1: N rounds, exact by
    definition. ``init`` is accepted for a uniform signature and ignored (besides validation)."""
    problem.check_init(init)
    start = time.perf_counter()
    step_map = StepMap(problem, executor)
    x = initial_trajectory(problem, None)
    finish_sequentially(step_map, x, 0)
    return SampleResult(
        sample=problem.prepare(x[-1]),
        trajectory=x,
        x0_predictions=step_map.x0_predictions,
        rounds=step_map.rounds,
        model_evals=step_map.model_evals,
        converged=True,
        converged_steps=problem.num_steps,
        residuals=[],
        wall_time=time.perf_counter() - start,
        method="sequential",
    )
