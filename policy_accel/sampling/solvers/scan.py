"""The linear recurrence behind picard, taa and newton, solved by a sequential scan.

Given the map's values ``F[p]`` at the window positions and the old iterate, the new iterate is
``x_new[p+1] = F[p] + A_p (x_new[p] - x_old[p]) + K_p (x_new[p-1] - x_old[p-1])`` with
``x_new[begin] = x_old[begin]`` (final). Written in this correction form, a position whose
predecessors did not move gets exactly ``F[p]``. The scan costs no model calls.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Linear = Callable[[int, Tensor], Tensor]  # (window position p, delta [B, *event]) -> [B, *event]


def correction_scan(
    F: Tensor, old_next: Tensor, current: Linear, previous: Linear | None = None
) -> Tensor:
    """Solve the recurrence for ``x_new[begin+1 .. end]``; ``old_next`` is ``x_old[begin+1..end]``."""
    new = torch.empty_like(F)
    delta = torch.zeros_like(F[0])  # x_new - x_old at position begin (final)
    delta_before = torch.zeros_like(F[0])
    for p in range(F.shape[0]):
        value = F[p] + current(p, delta) if p else F[p].clone()
        if previous is not None and p > 1:
            value = value + previous(p, delta_before)
        new[p] = value
        delta_before, delta = delta, value - old_next[p]
    return new
