"""The sequential reference: the scheduler's own loop, one denoiser call per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.sampling.capture import capture_inputs
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
    if options.callback is None and executor.captures_loops():
        step_map, x = _captured(problem, executor)
    else:
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
        stats={"window_sizes": [1] * problem.num_steps},
    )


def _captured(problem: DenoisingProblem, executor: Executor) -> tuple[StepMap, Tensor]:
    """The whole loop replayed from one CUDA graph, captured once per network, rule and shapes
    (:mod:`~policy_accel.sampling.capture`): the same kernels as the eager loop, so the same
    bits, without a host round trip per step. Returns a step map holding the counts and the
    clean-sample predictions, and the trajectory."""
    inputs = capture_inputs(problem)

    def loop(*values: Tensor) -> tuple[Tensor, Tensor]:
        local = StepMap(inputs.rebuild(values), executor, defer_finite_check=True)
        x = initial_trajectory(local.problem, None)
        finish_sequentially(local, x, 0)
        return x, local.x0_predictions

    x, x0 = executor.graphs(("sequential", inputs.key), loop, inputs.tensors, inputs.owners)
    step_map = StepMap(problem, executor, defer_finite_check=True)
    step_map.rounds = step_map.model_evals = problem.num_steps
    step_map.model_evals *= problem.batch_size
    step_map.x0_predictions, x = x0.clone(), x.clone()
    if not bool(torch.isfinite(x).all()):  # name the step: replay it eagerly
        eager = StepMap(problem, executor)
        finish_sequentially(eager, initial_trajectory(problem, None), 0)
    return step_map, x
