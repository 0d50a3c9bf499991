"""Chord Newton: Newton-type rounds at picard's cost per round.

Newton (:mod:`~policy_accel.sampling.solvers.newton`) linearises every step at every round: few
rounds, but ``E`` JVP directions per position each time. Chord Newton keeps one linear part
``J_i`` per step for all rounds and solves ``x_new[i+1] = F_i(x[i]) + J_i (x_new[i] - x[i])``
exactly by a scan, so each round is one plain batched call over the window, as in picard. ``J``
starts from a :class:`~policy_accel.sampling.jacobians.Jacobians` estimate (the previous
replan's, measured off the critical path) or, without one, from picard's linear coefficient
``a_i I``; with ``secant=True`` every round then improves it by a Broyden update per position,
from the change of ``F`` between rounds that the rounds compute anyway (no extra evaluations).

Exactness does not depend on ``J``: the sliding window (:mod:`windows`) makes at least one more
step final per round, so a stale or wrong estimate costs rounds, never correctness, and at
``tolerance=0`` the result is the sequential one. A round whose change grows more than
``reset_growth`` times, or whose corrected iterate leaves 100 times the map's own range, drops
the estimate and the secant updates for picard's coefficient.

Measured on the shipped PushT policy (DDPM-100, 8-step warm replans, 11 recorded replans, the
Controller's warm guess): picard 9.9 rounds at tolerance 1e-3; chord with secant updates and no
estimate 8.1 (1e-3) and 7.1 (1e-2, max action error 0.02 px); with the previous replan's
Jacobians shifted 7.2 (1e-3) and 6.3 (1e-2, 0.004 px). With the exact Jacobians at the answer
(not available before the answer) chord still needs 4.5: a warm replan's guess, not the linear
part, limits the rounds.

Multistep rules' dependence on ``x[i-1]`` is left out of ``J`` (the window keeps them exact).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.sampling.jacobians import Jacobians
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.solvers.options import WindowOptions, check_event_size
from policy_accel.sampling.solvers.rounds import (
    StaticRound,
    can_capture_rounds,
    solve_by_captured_rounds,
)
from policy_accel.sampling.solvers.scan import matrix_scan
from policy_accel.sampling.solvers.windows import solve_by_windows
from policy_accel.sampling.step_map import StepMap


@dataclass(frozen=True)
class ChordOptions(WindowOptions):
    """Window options (default tolerance 0.002: on closed-loop PushT replans 0.01 erred by up to
    0.054 px of 512 and 0.003 by up to 0.058 px, 0.001 by at most 0.006 px; the sample's RMS
    error vs sequential is at most 2e-3 on the mixture benchmarks, held by the tests) plus:

    jacobians: the estimate to start from (``None``: picard's coefficient).
    secant: Broyden-update the linear part from every round's change of ``F``.
    reset_growth: a round's change growing this many times over the last one drops the
        estimate and the updates (``None``: never).
    max_event_size: the largest event whose ``E x E`` matrices are formed (512 holds every
        DiffusionPolicy action chunk, inpainting policies' observation channels included, e.g.
        16 x 22 on PushT; one row's matrices then take up to 105 MB over 100 steps).
    """

    tolerance: float = 0.002
    jacobians: Jacobians | None = None
    secant: bool = True
    reset_growth: float | None = 4.0
    max_event_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.jacobians is not None and not isinstance(self.jacobians, Jacobians):
            raise ValueError(
                "jacobians must be a policy_accel.sampling.Jacobians estimate (see "
                f"estimate_jacobians) or None. Got {type(self.jacobians).__name__}."
            )
        if not isinstance(self.secant, bool):
            raise ValueError(f"secant must be True or False. Got {self.secant!r}.")
        if self.reset_growth is not None and not self.reset_growth > 1:
            raise ValueError(f"reset_growth must be > 1 or None. Got {self.reset_growth!r}.")
        if not isinstance(self.max_event_size, int) or self.max_event_size < 1:
            raise ValueError(f"max_event_size must be a positive int. Got {self.max_event_size!r}.")


def chord(
    problem: DenoisingProblem, init: Tensor | None, executor: Executor, options: ChordOptions
) -> SampleResult:
    check_event_size(problem.event_shape, options.max_event_size, "chord")
    size = math.prod(problem.event_shape)
    estimate = options.jacobians
    if estimate is not None and not estimate.matches(problem):
        raise ValueError(
            f"the Jacobians estimate is for {estimate.batch_size} rows of {estimate.num_steps} "
            f"steps with events {estimate.event_shape}; this problem has {problem.batch_size} "
            f"rows of {problem.num_steps} steps with events {tuple(problem.event_shape)}."
        )
    if can_capture_rounds(executor, options, problem.num_steps):
        return solve_by_captured_rounds(
            problem, executor, _captured_round(options), method="chord", init=init,
            options=options,
        )  # fmt: skip
    step_map = StepMap(problem, executor, defer_finite_check=True)
    x_T = problem.x_T
    picard_part, linear = _linear_parts(problem, estimate)
    state = {"last": math.inf, "plain": False}
    n, batch = problem.num_steps, problem.batch_size
    seen = torch.zeros(n, dtype=torch.bool, device=x_T.device)
    last_x = torch.zeros((n, batch, size, 1), dtype=x_T.dtype, device=x_T.device)
    last_F = torch.zeros_like(last_x)

    def iterate(x: Tensor, begin: int, end: int) -> tuple[Tensor, Tensor, None]:
        positions = torch.arange(begin, end, device=x.device)
        inputs = x[begin:end]
        F = step_map(positions, inputs)
        flat_x = problem.prepare(inputs, positions, guided=False).reshape(
            end - begin, batch, size, 1
        )  # the secant acts on the stored trajectory, as the scan does
        flat_F = F.reshape(end - begin, batch, size, 1)
        J = linear[begin:end]
        if options.secant and not state["plain"]:
            broyden_update(J, flat_x - last_x[begin:end], flat_F - last_F[begin:end],
                           seen[begin:end])  # fmt: skip
        last_x[begin:end], last_F[begin:end] = flat_x, flat_F
        seen[begin:end] = True
        new = matrix_scan(F, x[begin + 1 : end + 1], J)
        if not state["plain"] and not _bounded(new, F):
            state["plain"] = True  # the linear part amplifies the corrections: picard from here on
            linear.copy_(picard_part)
            new = matrix_scan(F, x[begin + 1 : end + 1], linear[begin:end])
        return new, new - x[begin + 1 : end + 1], None

    def watch(stats: dict) -> None:
        residual = stats["residual"]  # None in a sequential finish
        growth = options.reset_growth
        if residual is not None:
            if growth is not None and not state["plain"] and residual > growth * state["last"]:
                state["plain"] = True  # the estimate made things worse: picard from here on
                linear.copy_(picard_part)
            state["last"] = residual
        if options.callback is not None:
            options.callback(stats)

    watched = dataclasses.replace(options, callback=watch)
    return solve_by_windows(step_map, iterate, method="chord", init=init, options=watched)


def _linear_parts(problem: DenoisingProblem, estimate: Jacobians | None) -> tuple[Tensor, Tensor]:
    """Picard's linear part ``a_i I`` per step and row (inpainted entries fixed, guided ones
    scaled) and the starting linear part (the estimate, or a copy of picard's)."""
    x_T, size = problem.x_T, math.prod(problem.event_shape)
    coefficient = problem.rule.linear_coefficient().to(x_T)
    eye = torch.eye(size, dtype=x_T.dtype, device=x_T.device)
    picard_part = coefficient.reshape(-1, 1, 1, 1) * eye.expand(problem.batch_size, size, size)
    free = None
    if problem.mask is not None:  # inpainted entries are fixed: no rows, no columns
        free = (~problem.mask).to(x_T.dtype).expand_as(x_T).reshape(1, problem.batch_size, size)
        # and the model sees guided entries scaled by 1 - guide (a measured estimate has it)
        steps = torch.arange(problem.num_steps, device=x_T.device)
        columns = problem.input_weight(steps).reshape(-1, problem.batch_size, 1, size)
        picard_part = picard_part * free.unsqueeze(-1) * columns
    if estimate is None:
        return picard_part, picard_part.clone()
    linear = estimate.dense(coefficient).to(x_T)
    if free is not None:
        linear = linear * free.unsqueeze(-1) * free.unsqueeze(-2)
    return picard_part, linear


def _captured_round(options: ChordOptions) -> StaticRound:
    """Chord's round over all positions for :func:`solve_by_captured_rounds`: the secant
    update, the matrix scan and the fall-back to picard's linear part decided on the device
    (a flag kept in the state) rather than by the host between rounds."""

    host = {"last": math.inf}  # the last round's residual, for reset_growth

    def make_state(problem: DenoisingProblem) -> dict[str, Tensor]:
        n, batch, size = problem.num_steps, problem.batch_size, math.prod(problem.event_shape)
        like = problem.x_T
        matrices = torch.zeros((n, batch, size, size), dtype=like.dtype, device=like.device)
        vectors = torch.zeros((n, batch, size, 1), dtype=like.dtype, device=like.device)
        return {
            "linear": matrices, "picard": matrices.clone(), "last_x": vectors,
            "last_F": vectors.clone(), "seen": torch.zeros(n, dtype=torch.bool, device=like.device),
            "plain": torch.zeros((), dtype=torch.bool, device=like.device),
        }  # fmt: skip

    def start(problem: DenoisingProblem, state: dict[str, Tensor]) -> None:
        picard_part, linear = _linear_parts(problem, options.jacobians)
        state["picard"].copy_(picard_part)
        state["linear"].copy_(linear)
        state["seen"].zero_()
        state["plain"].zero_()
        host["last"] = math.inf

    def step(problem, step_map, x, active, state) -> Tensor:
        n, batch = problem.num_steps, problem.batch_size
        positions = torch.arange(n, device=x.device)
        F = step_map(positions, x[:n])
        flat_x = problem.prepare(x[:n], positions, guided=False).reshape(n, batch, -1, 1)
        flat_F = F.reshape(n, batch, -1, 1)
        J, plain = state["linear"], state["plain"]
        if options.secant:
            known = state["seen"] & active & ~plain
            broyden_update(J, flat_x - state["last_x"], flat_F - state["last_F"], known)
        rows = active.reshape(n, 1, 1, 1)
        state["last_x"].copy_(torch.where(rows, flat_x, state["last_x"]))
        state["last_F"].copy_(torch.where(rows, flat_F, state["last_F"]))
        state["seen"].logical_or_(active)
        old = x[1:]
        F = torch.where(active.reshape((n,) + (1,) * (F.dim() - 1)), F, old)  # held: no change
        corrected = matrix_scan(F, old, J)
        fallback = matrix_scan(F, old, state["picard"])
        largest = corrected.abs().amax()
        bounded = torch.isfinite(largest) & (largest <= 100.0 * (F.abs().amax() + 1.0))
        plain.logical_or_(~bounded)
        J.copy_(torch.where(plain, state["picard"], J))
        return torch.where(plain, fallback, corrected)

    def after(state: dict[str, Tensor], residual: float, rounds: int) -> None:
        growth = options.reset_growth
        if growth is not None and residual > growth * host["last"]:
            state["plain"].fill_(True)  # the estimate made things worse: picard from here on
            state["linear"].copy_(state["picard"])
        host["last"] = residual

    key = (options.secant, options.reset_growth, options.jacobians is not None)
    return StaticRound(key, make_state, start, step, after)


def broyden_update(J: Tensor, dx: Tensor, dF: Tensor, known: Tensor) -> None:
    """In place, for every position and row with a previous round (``known [P]``) and a step
    ``dx``: ``J += (dF - J dx) dx^T / (dx^T dx)`` ("good" Broyden: the smallest change of ``J``
    that maps the last step to the change it caused)."""
    norm = (dx.transpose(-1, -2) @ dx).squeeze(-1).squeeze(-1)  # [P, B]
    scale = J.abs().amax(dim=(-1, -2)).clamp_min(1.0)
    usable = known.reshape(-1, 1) & (norm > 1e-20 * scale.square())
    weight = usable / norm.clamp_min(1e-30)  # 0 where there is no usable step
    J.addcmul_((dF - J @ dx) @ dx.transpose(-1, -2), weight[..., None, None])


def _bounded(new: Tensor, F: Tensor, factor: float = 100.0) -> bool:
    """Whether the corrected iterate stays finite and within ``factor`` times the map's own
    values (one host synchronisation): a far-off linear part makes the scan's corrections grow
    geometrically along the window."""
    largest, reference = torch.stack([new.abs().amax(), F.abs().amax()]).tolist()
    return largest <= factor * (reference + 1.0)
