"""Forward-mode derivatives that are safe to take from several threads.

Torch's forward-mode AD keeps its dual level in process-global state (one level at a time for
the whole process, and ``torch.func.jvp`` tracks its nesting in a module global), so two threads
taking JVPs at once corrupt each other: one raises, or, worse, loses its tangents and returns a
wrong derivative without an error. Measured before this lock: 4 threads taking a step rule's
linear coefficient, 699 of 800 calls raised and 9 returned wrong values; over the server, first
chunks converged to the wrong place. Every JVP policy_accel takes goes through :func:`jvp`, which
holds one process-wide lock for the duration, so concurrent plans (server workers,
``AsyncController``, user threads) are exact; their JVPs run one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

FORWARD_AD_LOCK = threading.RLock()


def jvp(
    function: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """``torch.func.jvp(function, primals, tangents)`` under :data:`FORWARD_AD_LOCK`."""
    with FORWARD_AD_LOCK:
        return torch.func.jvp(function, primals, tangents)
