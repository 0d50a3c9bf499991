"""The executor interface: how a solver asks for a batch of denoiser calls.

Solvers never see devices, streams or process groups. They hand an executor a window
``x [P, B, *event]`` with timesteps ``t [P]`` and get the model output for every row back on the
same device, in the same layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]


class DenoiserOutputError(RuntimeError):
    """The denoiser returned something a solver cannot use (wrong shape or type)."""


class Executor(ABC):
    """Runs batched denoiser calls for a solver: one call is one round of latency."""

    @abstractmethod
    def evaluate(self, denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
        """Model output for a window: ``x [P, B, *event]``, ``t [P]`` -> ``[P, B, *event]``."""

    def window_size(self, positions: int, total: int) -> int:
        """The window size a call of ``positions`` of ``total`` positions runs at: the solver's
        step map pads the window to it (repeating its last position) and drops the padding's
        outputs. Executors that capture or compile round sizes up to a few buckets."""
        return positions

    def captures_loops(self) -> bool:
        """Whether solvers may capture whole loops or rounds as graphs through this executor's
        ``graphs`` (:class:`~policy_accel.execution.graphs.GraphCache`)."""
        return False

    @abstractmethod
    def jvp(
        self, denoiser: Denoiser, x: Tensor, t: Tensor, tangents: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Model output and its directional derivatives in one batched call.

        ``tangents [K, P, B, *event]`` -> ``(output [P, B, *event], d_output [K, P, B, *event])``
        with ``d_output[k] = dD/dx (x) . tangents[k]`` row by row.
        """


def flatten_window(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``[P, B, *event], [P]`` -> the denoiser's flat layout ``[P*B, *event], [P*B]``."""
    positions, batch = x.shape[0], x.shape[1]
    return x.reshape(positions * batch, *x.shape[2:]), t.repeat_interleave(batch)


def unflatten_output(output: Tensor, like: Tensor) -> Tensor:
    """Check the denoiser's flat output against the window ``like`` and restore its layout."""
    expected = (like.shape[0] * like.shape[1], *like.shape[2:])
    if not isinstance(output, Tensor):
        raise DenoiserOutputError(
            f"the denoiser returned {type(output).__name__}, expected a Tensor of shape {expected}."
        )
    if tuple(output.shape) != expected:
        raise DenoiserOutputError(
            f"the denoiser returned shape {tuple(output.shape)}, expected {expected} "
            "(one output row per input row: [P*B, *event])."
        )
    return output.reshape(like.shape)
