"""How smoothly a robot moved: the action jump where a new chunk takes over, and jerk.

Chunked policies move smoothly within a chunk and can jump where the next chunk's first action
replaces the old chunk's last one (openpi #393). Both measures are in the env's action units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def action_smoothness(actions: np.ndarray, boundaries: Sequence[int]) -> dict[str, float | None]:
    """``actions [T, Da]`` as executed and the steps where a new chunk's first action ran.

    Returns ``boundary_jump_mean`` / ``boundary_jump_max``: the Euclidean norm of ``a[b] -
    a[b-1]`` over the boundaries ``b >= 1`` (``None`` without any); ``step_mean``: the same norm
    between consecutive actions of one chunk (the motion itself, the floor a jump is read
    against); and ``jerk``: the mean squared norm of the third difference ``a[t+3] - 3 a[t+2] +
    3 a[t+1] - a[t]`` (``None`` under four actions)."""
    actions = np.asarray(actions, dtype=np.float64).reshape(len(actions), -1)
    cuts = [b for b in boundaries if 1 <= b < len(actions)]
    steps = np.linalg.norm(np.diff(actions, axis=0), axis=1)  # steps[t - 1]: a[t] - a[t - 1]
    jumps = steps[np.asarray(cuts, dtype=int) - 1] if cuts else np.zeros(0)
    inside = np.delete(steps, np.asarray(cuts, dtype=int) - 1) if cuts else steps
    third = np.diff(actions, n=3, axis=0)
    return {
        "boundary_jump_mean": float(jumps.mean()) if len(jumps) else None,
        "boundary_jump_max": float(jumps.max()) if len(jumps) else None,
        "step_mean": float(inside.mean()) if len(inside) else None,
        "jerk": float(np.mean(np.sum(third**2, axis=1))) if len(third) else None,
    }
