"""The sliding window shared by ParaDiGMS-style solvers (paradigms, picard, taa, newton).

A window covers steps ``begin .. end-1``: one round evaluates the denoiser at ``x[begin..end-1]``
and proposes new values for ``x[begin+1..end]``. ``x[begin]`` is final, so ``x[begin+1]`` is
final after the round; every following position whose change is within tolerance is final too,
and the window slides past them (Shih et al. 2023, Algorithm 1). Hence at most N rounds, and at
``tolerance=0`` the result is the sequential one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from torch import Tensor

from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.solvers.finish import (
    finish_result,
    initial_trajectory,
    report,
    scaled_error,
)
from policy_accel.sampling.solvers.options import WindowOptions, may_start_round
from policy_accel.sampling.step_map import StepMap

# iterate(x, begin, end) -> (new values for x[begin+1 .. end], change that the tolerance judges,
#                            values to keep where a position becomes final, or None: the new ones)
Iterate = Callable[[Tensor, int, int], tuple[Tensor, Tensor, "Tensor | None"]]


def solve_by_windows(
    step_map: StepMap, iterate: Iterate, *, method: str, init: Tensor | None, options: WindowOptions
) -> SampleResult:
    """Run ``iterate`` over a sliding window until every step is final or rounds run out."""
    problem = step_map.problem
    n = problem.num_steps
    window = n if options.window is None else min(options.window, n)
    max_rounds = n if options.max_rounds is None else options.max_rounds
    tolerance = options.tolerance
    started = time.perf_counter()
    x = initial_trajectory(problem, init)
    scale = problem.tolerance_scale
    residuals: list[float] = []
    sizes: list[int] = []  # positions each round evaluated (the cost model reads them)
    begin, end = 0, window
    while (
        begin < n
        and step_map.rounds < max_rounds
        and may_start_round(step_map.rounds, options.deadline)
    ):
        sizes.append(end - begin)
        new, change, settled = iterate(x, begin, end)
        errors = scaled_error(change, scale[begin:end]).tolist()  # the round's one host sync
        if not all(map(math.isfinite, errors)):
            step_map.check_finite()  # names the step whose model output was NaN/Inf
        first_late = next((p for p, e in enumerate(errors) if e > tolerance), end - begin)
        new_begin = begin + min(first_late + 1, end - begin)
        x[begin + 1 : end + 1] = new
        if settled is not None:
            x[begin + 1 : new_begin + 1] = settled[: new_begin - begin]
        residuals.append(max(errors))
        new_end = min(new_begin + window, n)
        if init is None and new_end > end:
            x[end + 1 : new_end + 1] = x[end]  # ParaDiGMS: new positions start from the last one
        begin, end = new_begin, new_end
        report(options.callback, step_map, x, residuals[-1], min(begin, n))
    converged = begin >= n
    return finish_result(
        step_map,
        x,
        method=method,
        started=started,
        residuals=residuals,
        converged=converged,
        converged_steps=min(begin, n),
        deadline_hit=not converged and step_map.rounds < max_rounds,
        options=options,
        stats={"window_sizes": sizes},
    )
