"""SRDS: Parareal over blocks of denoising steps (Selvam et al. 2024, "Self-Refining Diffusion
Samplers").

The N steps are cut into blocks of about sqrt(N). A coarse solver ``G`` crosses a whole block with
one model call: it runs the block's steps with the clean-sample prediction frozen at the block's
start (for DDIM exactly the DDIM jump SRDS uses; for DDPM it also carries the block's noise, which a
deterministic jump would leave to the corrections and which made DDPM-100 need 9 instead of N
iterations); the fine solver ``F`` runs the block's real steps. Each iteration runs the fine
solves of all unfinished blocks in parallel (``block_size`` rounds, all blocks batched together),
then sweeps the boundaries with the Parareal correction
``U[n+1] <- G(U_new[n]) + F(U[n]) - G(U[n])`` (one round per block). After ``k`` iterations the
first ``k`` blocks are exact, so at most one iteration per block is ever needed and
``tolerance=0`` gives the sequential sample. Convergence is judged at the block boundaries:
the fine end of each block against the next block's start.

With ``pipelined=True`` the reported ``rounds`` is the critical path of SRDS' pipelined schedule,
in which a block's next fine solve starts as soon as its new start value exists instead of
waiting for the whole sweep (the arithmetic, and so the sample, is the same). A warm start
(``init``) takes the block starts from the guess and skips the initial coarse sweep; from an
exact guess it converges after one iteration (``block_size`` rounds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.solvers.finish import (
    finish_result,
    initial_trajectory,
    report,
    scaled_error,
)
from policy_accel.sampling.solvers.options import check_callback, check_stopping, may_start_round
from policy_accel.sampling.step_map import StepMap


@dataclass(frozen=True)
class SRDSOptions:
    """Attributes:
    block_size: fine steps per block (``None``: ``round(sqrt(N))``).
    tolerance: boundary mismatch allowed, relative to the step's noise scale (as ParaDiGMS). At
        the default 0.1 the sample's RMS error vs sequential is at most 5e-3 on the mixture
        benchmarks (held by the tests; measured at most 2.7e-3, DPM-Solver++-20 chunks).
    max_rounds: stop once this many rounds are spent, checked between iterations (``None``: until
        exact, at most one iteration per block; a cold start first spends one round per block
        on the initial coarse sweep).
    pipelined: report the critical path of the pipelined schedule as ``rounds``.
    finish_sequentially: if ``max_rounds`` stops the solver, finish the rest sequentially.
    deadline: no new iteration starts after this ``time.perf_counter()`` time (see
        :class:`~policy_accel.sampling.solvers.options.WindowOptions`); an iteration is
        ``block_size`` rounds, the granularity at which SRDS can stop.
    callback: called after every iteration (see
        :data:`~policy_accel.sampling.solvers.finish.Callback`).
    """

    block_size: int | None = None
    tolerance: float = 0.1
    max_rounds: int | None = None
    pipelined: bool = False
    finish_sequentially: bool = False
    deadline: float | None = None
    callback: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"block_size must be a positive int or None. Got {self.block_size!r}.")
        check_stopping(self.tolerance, self.max_rounds, self.deadline)
        check_callback(self.callback)


@dataclass(frozen=True)
class Blocks:
    """The partition of the N steps: block ``b`` runs steps ``starts[b] .. ends[b] - 1``."""

    starts: list[int]
    ends: list[int]
    size: int

    @classmethod
    def of(cls, steps: int, size: int | None) -> Blocks:
        size = size or max(1, round(math.sqrt(steps)))
        starts = list(range(0, steps, size))
        return cls(starts, starts[1:] + [steps], size)

    def __len__(self) -> int:
        return len(self.starts)


def coarse(problem: DenoisingProblem, blocks: Blocks, ids: list[int], x0: Tensor, y: Tensor):
    """``G``: each block's own steps with the clean-sample prediction frozen at its start, from
    the start values ``y [len(ids), B, *event]``: no model calls, the exact linear part and the
    block's noise included (for DDIM exactly the DDIM jump from its first timestep to its last)."""
    rule, device = problem.rule, problem.x_T.device
    for s in range(blocks.size):
        inside = [blocks.starts[b] + s < blocks.ends[b] for b in ids]
        positions = torch.tensor(
            [min(blocks.starts[b] + s, blocks.ends[b] - 1) for b in ids], device=device
        )
        output = rule.model_output_from_x0(positions, y, x0)
        converted = rule.convert(positions, y, output)
        moved = rule.step(positions, y, converted, converted if rule.history else None)
        moved = moved + problem.noise_term(positions, moved)
        keep = torch.tensor(inside, device=device).reshape((-1,) + (1,) * (y.dim() - 1))
        y = torch.where(keep, moved, y)
    return y


def coarse_from(step_map: StepMap, blocks: Blocks, b: int, value: Tensor) -> Tensor:
    """``G(U)`` for one block: one round for its start's prediction, then :func:`coarse`."""
    position = torch.tensor([blocks.starts[b]], device=value.device)
    x0 = step_map.predict_x0(position, value.unsqueeze(0))
    return coarse(step_map.problem, blocks, [b], x0, value.unsqueeze(0))[0]


def fine(
    step_map: StepMap, blocks: Blocks, x: Tensor, starts_value: list[Tensor], active: list[int]
) -> dict[int, Tensor]:
    """``F``: the real steps of every active block from its start value, all blocks batched
    together (``block_size`` rounds), written into ``x``. Returns each block's coarse jump
    ``G(U[b])`` from the first round's predictions, which the sweep needs."""
    device = x.device
    coarse_old: dict[int, Tensor] = {}
    for s in range(blocks.size):
        members = [b for b in active if blocks.starts[b] + s < blocks.ends[b]]
        if not members:
            break
        positions = torch.tensor([blocks.starts[b] + s for b in members], device=device)
        inputs = torch.stack(
            [starts_value[b] if s == 0 else x[blocks.starts[b] + s] for b in members]
        )
        x[positions + 1] = step_map(positions, inputs)
        if s == 0:
            jumps = coarse(step_map.problem, blocks, members, step_map.x0_predictions[positions],
                           inputs)  # fmt: skip
            coarse_old = {b: jumps[i] for i, b in enumerate(members)}
    return coarse_old


def sweep(
    step_map: StepMap,
    blocks: Blocks,
    x: Tensor,
    starts_value: list[Tensor],
    ready: list[int],
    fine_done: dict[int, int],
    coarse_old: dict[int, Tensor],
    first_open: int,
) -> tuple[list[Tensor], list[int]]:
    """The Parareal correction ``U[b+1] <- G(U_new[b]) + F(U[b]) - G(U[b])`` over the boundaries
    after the first open block, whose fine result is exact (one round per block). Also returns
    each start value's availability time in the pipelined schedule."""
    values, available = list(starts_value), list(ready)
    values[first_open + 1] = x[blocks.ends[first_open]].clone()
    available[first_open + 1] = fine_done[first_open]
    for b in range(first_open + 1, len(blocks) - 1):
        jump = coarse_from(step_map, blocks, b, values[b])
        values[b + 1] = jump + x[blocks.ends[b]] - coarse_old[b]
        available[b + 1] = max(available[b] + 1, fine_done[b])
    return values, available


def srds(
    problem: DenoisingProblem, init: Tensor | None, executor: Executor, options: SRDSOptions
) -> SampleResult:
    started = time.perf_counter()
    n = problem.num_steps
    blocks = Blocks.of(n, options.block_size)
    step_map = StepMap(problem, executor)
    scale = problem.tolerance_scale
    max_rounds = math.inf if options.max_rounds is None else options.max_rounds

    x = initial_trajectory(problem, init)
    starts_value = [x[s].clone() for s in blocks.starts]  # U[b]
    if init is None:  # the initial coarse sweep, one round per block
        ready = list(range(len(blocks)))  # pipelined availability time of U[b]
        for b in range(len(blocks) - 1):
            starts_value[b + 1] = coarse_from(step_map, blocks, b, starts_value[b])
        previous_final = None
    else:  # a warm start takes the block starts from the guess
        ready = [0] * len(blocks)
        previous_final = x[n].clone()

    first_open, iterations, residuals, exact_steps = 0, 0, [], 0
    converged, deadline_hit, critical_path = False, False, 0
    while step_map.rounds < max_rounds:
        if not may_start_round(step_map.rounds, options.deadline):
            deadline_hit = True
            break
        iterations += 1
        active = list(range(first_open, len(blocks)))
        coarse_old = fine(step_map, blocks, x, starts_value, active)
        exact_steps = blocks.ends[first_open]  # the first open block started from an exact value
        fine_done = {b: ready[b] + (blocks.ends[b] - blocks.starts[b]) for b in active}
        critical_path = max(fine_done.values())
        errors = []  # each block's fine end against the next block's start
        for b in active:
            target = starts_value[b + 1] if b + 1 < len(blocks) else previous_final
            if target is None:
                errors.append(math.inf)
                continue
            change = (x[blocks.ends[b]] - target).unsqueeze(0)
            errors.append(float(scaled_error(change, scale[blocks.ends[b] - 1 : blocks.ends[b]])))
        previous_final = x[n].clone()
        residuals.append(max(errors))
        converged = max(errors) <= options.tolerance or first_open == len(blocks) - 1
        report(options.callback, step_map, x, residuals[-1], n if converged else exact_steps)
        if converged:
            break
        if step_map.rounds >= max_rounds:
            break
        starts_value, ready = sweep(
            step_map, blocks, x, starts_value, ready, fine_done, coarse_old, first_open
        )
        first_open += 1

    stats = {
        "iterations": iterations,
        "blocks": len(blocks),
        "block_size": blocks.size,
        "rounds_executed": step_map.rounds,
    }
    return finish_result(
        step_map,
        x,
        method="srds",
        started=started,
        residuals=residuals,
        converged=converged,
        converged_steps=n if converged else exact_steps,
        deadline_hit=deadline_hit,
        options=options,
        stats=stats,
        rounds=critical_path if options.pipelined and converged else None,
    )
