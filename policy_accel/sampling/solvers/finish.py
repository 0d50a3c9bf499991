"""What every solver does around its iteration: the starting trajectory, the convergence measure,
the per-round callback, and turning the final iterate into a :class:`SampleResult` (deadline,
sequential completion, stats)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.step_map import StepMap

Callback = Callable[[dict], None]
"""``callback(info)`` after every round (k-diffusion's pattern): ``info`` holds ``round`` (rounds
so far), ``residual`` (the round's largest scaled change, None for sequential steps),
``converged_steps`` (leading steps that are final) and ``x`` (the trajectory, not a copy: read
it, do not keep or modify it)."""


def initial_trajectory(problem: DenoisingProblem, init: Tensor | None) -> Tensor:
    """The caller's guess, or ParaDiGMS's cold start: every position equal to ``x_T``."""
    guess = problem.check_init(init)
    if guess is not None:
        return guess
    return problem.x_T.unsqueeze(0).repeat(problem.num_steps + 1, *([1] * problem.x_T.dim()))


def scaled_error(change: Tensor, scale: Tensor) -> Tensor:
    """Per-position error ``[P]``: per-dimension RMS of ``change [P, B, *event]`` over its noise
    scale ``[P]``, the worst sample of the batch."""
    rms = change.reshape(change.shape[0], change.shape[1], -1).pow(2).mean(dim=-1).sqrt()
    return (rms / scale.to(rms.dtype).unsqueeze(1)).amax(dim=1)


def report(
    callback: Callback | None, step_map: StepMap, x: Tensor, residual, converged_steps: int
) -> None:
    if callback is not None:
        callback(
            {
                "round": step_map.rounds,
                "residual": residual,
                "converged_steps": converged_steps,
                "x": x,
            }
        )


def finish_sequentially(
    step_map: StepMap, x: Tensor, begin: int, callback: Callback | None = None
) -> None:
    """Complete ``x[begin+1 ..]`` with the sequential loop from the final position ``begin``."""
    steps = torch.arange(step_map.problem.num_steps, device=x.device)  # no copy per step
    for i in range(begin, step_map.problem.num_steps):
        x[i + 1] = step_map(steps[i : i + 1], x[i : i + 1])[0]
        report(callback, step_map, x, None, i + 1)


def finish_result(
    step_map: StepMap,
    x: Tensor,
    *,
    method: str,
    started: float,
    residuals: list[float],
    converged: bool,
    converged_steps: int,
    deadline_hit: bool,
    options,
    stats: dict | None = None,
    rounds: int | None = None,
) -> SampleResult:
    """The result of a solve that stopped after ``residuals`` rounds. Stopped short by its
    ``deadline``, the iterate is returned flagged ``deadline_hit``; stopped short by
    ``max_rounds`` with ``options.finish_sequentially``, the steps after the first
    ``converged_steps`` (exact) are completed sequentially. ``rounds`` overrides the count of
    batched calls (srds' pipelined critical path)."""
    problem = step_map.problem
    n = problem.num_steps
    stats = dict(stats or {})
    if deadline_hit:
        stats["deadline_hit"] = True
    elif not converged and getattr(options, "finish_sequentially", False):
        x[0] = problem.x_T
        finish_sequentially(step_map, x, converged_steps, getattr(options, "callback", None))
        stats["finished_sequentially_from"] = converged_steps
        converged_steps = n
    return SampleResult(
        sample=problem.prepare(x[n]),
        trajectory=x,
        x0_predictions=step_map.x0_predictions,
        rounds=int(step_map.rounds if rounds is None else rounds),
        model_evals=step_map.model_evals,
        converged=converged,
        converged_steps=converged_steps,
        residuals=residuals,
        wall_time=time.perf_counter() - started,
        method=method,
        stats=stats,
    )
