"""Options shared by the sliding-window solvers, validated on construction."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


def check_stopping(tolerance: float, max_rounds: int | None, deadline: float | None = None) -> None:
    """Validate the options every iterative solver takes."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0. Got {tolerance!r}.")
    if max_rounds is not None and (not isinstance(max_rounds, int) or max_rounds < 1):
        raise ValueError(f"max_rounds must be a positive int or None. Got {max_rounds!r}.")
    if deadline is not None and not isinstance(deadline, (int, float)):
        raise ValueError(
            f"deadline must be a time.perf_counter() value in seconds or None. Got {deadline!r}."
        )


def check_event_size(event_shape: tuple[int, ...], limit: int, method: str) -> None:
    """Refuse an event too large for a solver that forms an ``E x E`` matrix per step."""
    size = math.prod(event_shape)
    if size > limit:
        raise ValueError(
            f"{method} forms the {size}x{size} Jacobian of every step (event shape "
            f"{tuple(event_shape)}), above max_event_size={limit}. Use it for small events such "
            "as action chunks; for larger ones use method='picard' or 'taa', or raise "
            "max_event_size if memory allows."
        )


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None. Got {type(callback).__name__}.")


def may_start_round(rounds: int, deadline: float | None) -> bool:
    """Whether another round may start: always the first, then only before ``deadline`` (a
    ``time.perf_counter()`` value). A solver stopped by its deadline overruns it by at most the
    round in flight."""
    return rounds == 0 or deadline is None or time.perf_counter() < deadline


@dataclass(frozen=True)
class WindowOptions:
    """Attributes:
    window: steps evaluated per round (``None``: all N, the lowest round count).
    tolerance: a position is final once its per-dimension RMS change is at most ``tolerance``
        times that step's noise scale (ParaDiGMS' criterion); 0 demands exact agreement.
    max_rounds: stop after this many rounds (``None``: N, which always suffices).
    finish_sequentially: if the tolerance is not met within ``max_rounds``, finish the
        remaining steps sequentially (exact, more rounds) instead of returning the iterate.
    deadline: a ``time.perf_counter()`` time after which no new round starts; the solver then
        returns its iterate with ``converged=False`` and ``stats["deadline_hit"]`` (real-time
        control; ``finish_sequentially`` is not applied past a deadline).
    callback: called after every round with the round's stats (see
        :data:`~policy_accel.sampling.solvers.finish.Callback`).
    """

    window: int | None = None
    tolerance: float = 0.1
    max_rounds: int | None = None
    finish_sequentially: bool = False
    deadline: float | None = None
    callback: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        check_callback(self.callback)
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be a positive int or None. Got {self.window!r}.")
        check_stopping(self.tolerance, self.max_rounds, self.deadline)
