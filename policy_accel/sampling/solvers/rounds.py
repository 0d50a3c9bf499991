"""Captured rounds: the sliding-window solve with every round one CUDA graph replay.

Where the executor captures graphs (``cuda_graphs``), picard and chord run each round over all
``N`` positions at one fixed shape, the positions before the window's ``begin`` held by masks
instead of sliced off: the round (the model call, the step map, the linear correction's scan,
the convergence test and the window's advance) is then the same computation every round and
every replan, captured once per network, rule and shapes (:mod:`~policy_accel.sampling.capture`)
and replayed with one host synchronisation per round (a 3-number report: the residual, the new
``begin``, whether the errors were finite). The iteration is :mod:`windows`' with ``window=N``:
a held position's change is zero, so the same positions become final in the same rounds and
the sample is the same to the solver's tolerance. What differs: every round evaluates all ``N``
positions (counted in ``model_evals``; on a GPU a round's time barely depends on it), and a
final position's clean-sample prediction is re-evaluated at its final value.
"""

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
    initial_trajectory,
    report,
    scaled_error,
)
from policy_accel.sampling.solvers.options import WindowOptions, may_start_round
from policy_accel.sampling.step_map import StepMap


@dataclass(frozen=True)
class StaticRound:
    """A solver's round over all positions, in tensors only (it is captured).

    Attributes:
        key: what the capture depends on beyond the problem's shapes (the solver's options).
        make_state: ``problem -> {name: buffer}`` the round keeps between rounds (allocated
            once per capture).
        start: ``(problem, state)``: set the buffers for a new solve (eager, before round 1).
        step: ``(problem, step_map, x, active, state) -> new`` values for ``x[1..N]``
            (``active [N]``: the positions at or after ``begin``; the driver holds the rest).
        after: ``(state, residual, rounds)`` on the host after each round (may update the
            buffers with eager ops), or None.
    """

    key: tuple
    make_state: Callable[[DenoisingProblem], dict[str, Tensor]]
    start: Callable[[DenoisingProblem, dict[str, Tensor]], None]
    step: Callable[..., Tensor]
    after: Callable[[dict[str, Tensor], float, int], None] | None = None


def can_capture_rounds(executor: Executor, options: WindowOptions, num_steps: int) -> bool:
    """Rounds are captured where the executor captures graphs and the window is all steps."""
    return executor.captures_loops() and (options.window is None or options.window >= num_steps)


def solve_by_captured_rounds(
    problem: DenoisingProblem,
    executor: Executor,
    round_: StaticRound,
    *,
    method: str,
    init: Tensor | None,
    options: WindowOptions,
) -> SampleResult:
    n = problem.num_steps
    tolerance = float(options.tolerance)
    max_rounds = n if options.max_rounds is None else options.max_rounds
    started = time.perf_counter()
    inputs = capture_inputs(problem)
    x_T = problem.x_T

    def make_state() -> dict[str, Tensor]:
        state = round_.make_state(problem)
        state["x"] = torch.zeros(problem.trajectory_shape, dtype=x_T.dtype, device=x_T.device)
        state["x0"] = torch.zeros((n, *x_T.shape), dtype=x_T.dtype, device=x_T.device)
        state["begin"] = torch.zeros((), dtype=torch.int64, device=x_T.device)
        return state

    def one_round(*values: Tensor, state: dict[str, Tensor]) -> Tensor:
        local = inputs.rebuild(values)
        step_map = StepMap(local, executor, defer_finite_check=True)
        x, begin = state["x"], state["begin"]
        positions = torch.arange(n, device=x.device)
        active = positions >= begin
        old = x[1:]
        held = active.reshape((n,) + (1,) * (old.dim() - 1))
        new = torch.where(held, round_.step(local, step_map, x, active, state), old)
        errors = torch.where(active, scaled_error(new - old, local.tolerance_scale), 0.0)
        late = errors > tolerance
        first_late = torch.where(late.any(), late.to(torch.int64).argmax(), n)
        new_begin = torch.clamp(first_late + 1, max=n)
        old.copy_(new)
        state["x0"].copy_(step_map.x0_predictions)
        begin.copy_(torch.maximum(new_begin, begin))
        finite = torch.isfinite(errors).all()
        return torch.stack([errors.amax(), begin.to(errors.dtype), finite.to(errors.dtype)])

    key = ("rounds", method, tolerance, round_.key, inputs.key)
    capture = executor.graphs.prepare(
        key, one_round, inputs.tensors, inputs.owners, make_state=make_state
    )
    state = capture.state
    state["x"].copy_(initial_trajectory(problem, init))
    state["begin"].zero_()
    round_.start(problem, state)
    rounds, begin, residuals = 0, 0, []
    step_map = StepMap(problem, executor, defer_finite_check=True)
    while begin < n and rounds < max_rounds and may_start_round(rounds, options.deadline):
        (summary,) = capture.replay(inputs.tensors if rounds == 0 else None)
        residual, reached, finite = summary.tolist()  # the round's one host synchronisation
        rounds += 1
        if not finite:
            _name_the_step(problem, executor, state["x"])
        begin = int(reached)
        residuals.append(residual)
        if round_.after is not None:
            round_.after(state, residual, rounds)
        step_map.rounds = rounds
        report(options.callback, step_map, state["x"], residual, min(begin, n))
    step_map.model_evals = rounds * n * problem.batch_size
    step_map.x0_predictions = state["x0"].clone()
    converged = begin >= n
    return finish_result(
        step_map,
        state["x"].clone(),
        method=method,
        started=started,
        residuals=residuals,
        converged=converged,
        converged_steps=min(begin, n),
        deadline_hit=not converged and rounds < max_rounds,
        options=options,
        stats={"captured_rounds": True, "window_sizes": [n] * rounds},
    )


def _name_the_step(problem: DenoisingProblem, executor: Executor, x: Tensor) -> None:
    """A round's errors were not finite: evaluate the map eagerly to name the step whose model
    output was NaN/Inf (raises); an iterate gone non-finite from finite outputs is the
    solver's to report, as in the eager driver."""
    step_map = StepMap(problem, executor)
    step_map(torch.arange(problem.num_steps, device=x.device), x[:-1])
