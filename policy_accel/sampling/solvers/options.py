"""Options shared by the sliding-window solvers, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


def check_stopping(tolerance: float, max_rounds: int | None) -> None:
    """Validate the options every iterative solver takes."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0. Got {tolerance!r}.")
    if max_rounds is not None and (not isinstance(max_rounds, int) or max_rounds < 1):
        raise ValueError(f"max_rounds must be a positive int or None. Got {max_rounds!r}.")


@dataclass(frozen=True)
class WindowOptions:
    """Attributes:
    window: steps evaluated per round (``None``: all N, the lowest round count).
    tolerance: a position is final once its per-dimension RMS change is at most ``tolerance``
        times that step's noise scale (ParaDiGMS' criterion); 0 demands exact agreement.
    max_rounds: stop after this many rounds (``None``: N, which always suffices).
    finish_sequentially: if the tolerance is not met within ``max_rounds``, finish the
        remaining steps sequentially (exact, more rounds) instead of returning the iterate.
    """

    window: int | None = None
    tolerance: float = 0.1
    max_rounds: int | None = None
    finish_sequentially: bool = False

    def __post_init__(self) -> None:
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be a positive int or None. Got {self.window!r}.")
        check_stopping(self.tolerance, self.max_rounds)
