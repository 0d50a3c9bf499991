"""Errors a caller of the samplers can hit."""

from __future__ import annotations


class NonFiniteDenoiserOutput(FloatingPointError):
    """The denoiser returned NaN or Inf; names the round, step and timestep where it happened."""

    def __init__(self, round_index: int, step: int, timestep: int, what: str = "output") -> None:
        self.round_index, self.step, self.timestep = round_index, step, timestep
        super().__init__(
            f"the denoiser returned NaN/Inf ({what}) in round {round_index} at step {step} "
            f"(t={timestep}). Check the model's inputs and weights at this timestep; a NaN in "
            "the conditioning or an fp16 overflow are the usual causes."
        )


class SolverOptionError(TypeError):
    """An unknown solver or solver option; lists the valid ones."""
