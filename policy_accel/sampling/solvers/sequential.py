"""The sequential reference: the scheduler's own loop, one denoiser call per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.solvers.finish import (
    finish_result,
    finish_sequentially,
    initial_trajectory,
)
from policy_accel.sampling.solvers.options import check_callback
from policy_accel.sampling.step_map import StepMap


@dataclass(frozen=True)
class SequentialOptions:
    """The sequential loop's only option: ``callback`` after every step (see
    :data:`~policy_accel.sampling.solvers.finish.Callback`)."""

    callback: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        check_callback(self.callback)


def sequential(
    problem: DenoisingProblem,
    init: Tensor | None,
    executor: Executor,
    options: SequentialOptions,
) -> SampleResult:
    """``x[i+1] = step_i(x[i], D(x[i], t_i)) + s_i z_i`` for i = 0..N-1: N rounds, exact by
    definition. ``init`` is accepted for a uniform signature and ignored (besides validation)."""
    problem.check_init(init)
    started = time.perf_counter()
    step_map = StepMap(problem, executor)
    x = initial_trajectory(problem, None)
    finish_sequentially(step_map, x, 0, options.callback)
    return finish_result(
        step_map,
        x,
        method="sequential",
        started=started,
        residuals=[],
        converged=True,
        converged_steps=problem.num_steps,
        deadline_hit=False,
        options=options,
    )
