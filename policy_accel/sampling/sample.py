"""The front door: ``sample(problem, method=..., init=None, **options)``."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from policy_accel.execution import Executor, LocalExecutor
from policy_accel.sampling.errors import SolverOptionError
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.solvers import SOLVERS


def option_names(method: str) -> list[str]:
    """The option names ``method`` takes, in its options dataclass' order."""
    if method not in SOLVERS:
        raise SolverOptionError(f"unknown method {method!r}. Valid methods: {sorted(SOLVERS)}.")
    return [field.name for field in dataclasses.fields(SOLVERS[method][1])]


def solver_options(method: str, **options):
    """The validated options dataclass of ``method``; unknown names raise listing valid ones."""
    valid = option_names(method)
    options_class = SOLVERS[method][1]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SolverOptionError(
            f"unknown option(s) {unknown} for method {method!r}. Valid options: {valid or 'none'}."
        )
    return options_class(**options)


def sample(
    problem: DenoisingProblem,
    method: str = "picard",
    init: Tensor | None = None,
    executor: Executor | None = None,
    **options,
) -> SampleResult:
    """Solve ``problem`` with a registered solver.

    Args:
        problem: the trajectory to solve (:class:`DenoisingProblem`).
        method: one of ``sequential``, ``paradigms``, ``picard``, ``taa``, ``srds``, ``newton``,
            ``chord``.
        init: optional trajectory guess ``[N+1, B, *event]`` (a warm start); ``init[0]`` is
            replaced by the problem's ``x_T``.
        executor: where the denoiser calls run (default: :class:`LocalExecutor`, the tensors'
            own device).
        **options: the method's options (e.g. ``window``, ``tolerance``, ``max_rounds``).

    Every method converges to the sequential sample with the same noise; ``tolerance`` bounds
    how far it stops from it. Non-convergence within ``max_rounds`` is reported by
    ``result.converged`` (see :class:`SampleResult`), never hidden.
    """
    solver, _ = SOLVERS.get(method, (None, None))
    parsed = solver_options(method, **options)
    return solver(problem, init, executor or LocalExecutor(), parsed)
