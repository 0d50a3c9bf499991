"""How many control steps the next replan will take: the inference delay a real-time controller
plans around (the actions it is committed to while the replan is in flight).

A running maximum is what goes wrong in practice: the first plans of a process pay for warm-up
(allocation, kernel selection, lazy imports), so one early spike inflates the estimate for the
whole run (LeRobot #2541). :class:`DelayEstimator` instead takes a high percentile over a
window of recent latencies, leaves the first ``warmup`` measurements out, and never answers
below the delay the last replan actually took: a plan that just got slower is believed at once,
a faster one only once the window forgets the slower ones.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class DelayEstimator:
    """Estimate the next replan's delay in control steps from measured latencies.

    Args:
        period_s: the control period (``1 / hz``).
        window: how many recent latencies (warm-up excluded) the percentile is taken over.
        percentile: the high percentile of that window (95: a delay the next plan stays under
            about 19 times in 20).
        warmup: the first latencies measured are left out (never estimated from).
        initial_steps: the estimate before any latency after warm-up is known (and at least
            the last one measured, warm-up included).
    """

    def __init__(
        self,
        period_s: float,
        window: int = 20,
        percentile: float = 95.0,
        warmup: int = 2,
        initial_steps: int = 0,
    ) -> None:
        if not (isinstance(period_s, (int, float)) and period_s > 0):
            raise ValueError(f"period_s must be positive. Got {period_s!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int. Got {window!r}.")
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100]. Got {percentile!r}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int. Got {warmup!r}.")
        if (
            isinstance(initial_steps, bool)
            or not isinstance(initial_steps, int)
            or initial_steps < 0
        ):
            raise ValueError(f"initial_steps must be a non-negative int. Got {initial_steps!r}.")
        self.period_s = float(period_s)
        self.percentile = float(percentile)
        self.warmup = warmup
        self.initial_steps = initial_steps
        self.latencies: deque[float] = deque(maxlen=window)
        self.measured = 0
        self.last_s: float | None = None

    def record(self, latency_s: float) -> None:
        """One replan's measured latency, in seconds."""
        if not (
            isinstance(latency_s, (int, float)) and math.isfinite(latency_s) and latency_s >= 0
        ):
            raise ValueError(f"latency_s must be a finite non-negative number. Got {latency_s!r}.")
        self.measured += 1
        self.last_s = float(latency_s)
        if self.measured > self.warmup:
            self.latencies.append(float(latency_s))

    def steps_of(self, seconds: float) -> int:
        """Control steps that pass during ``seconds`` (a plan that ends mid-step costs the
        step: its actions are ready only for the next one)."""
        return math.ceil(seconds / self.period_s - 1e-9)

    @property
    def steps(self) -> int:
        """The estimated delay of the next replan in control steps."""
        last = 0 if self.last_s is None else self.steps_of(self.last_s)
        if not self.latencies:
            return max(self.initial_steps, last)
        high = float(np.percentile(np.asarray(self.latencies), self.percentile))
        return max(self.steps_of(high), last)
