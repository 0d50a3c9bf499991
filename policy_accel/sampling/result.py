"""What every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SampleResult:
    """The sample, its trajectory and how it was obtained.

    Attributes:
        sample: ``[B, *event]`` the final sample (inpainting condition applied).
        trajectory: ``[N+1, B, *event]`` the solver's trajectory, ``x_T`` first.
        x0_predictions: ``[N, B, *event]`` the clean-sample prediction of each step at the
            returned trajectory (what warm starts in prediction space shift).
        rounds: sequential batched denoiser calls, i.e. effective serial evaluations: the
            latency unit (sequential sampling: N).
        model_evals: total denoiser evaluations of one sample at one timestep (total work); a
            forward-mode JVP direction counts as one evaluation.
        converged: whether the tolerance was met within ``max_rounds``. When it is False, the
            trajectory is the solver's last iterate: every position up to ``converged_steps`` is
            exact (computed from exact predecessors), the rest is the best current guess.
            Solvers with ``finish_sequentially=True`` complete the remaining steps sequentially
            instead, which makes the sample exact at the cost of more rounds.
        converged_steps: how many leading steps are final.
        residuals: per round, the largest per-dimension RMS change of a trajectory position
            relative to that step's noise scale (what the tolerance bounds).
        wall_time: seconds spent in the solver.
        method: the solver's registry name.
        stats: solver-specific extras (e.g. ``iterations`` for srds).
    """

    sample: Tensor
    trajectory: Tensor
    x0_predictions: Tensor
    rounds: int
    model_evals: int
    converged: bool
    converged_steps: int
    residuals: list[float]
    wall_time: float
    method: str
    stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The scalar statistics as plain Python values (for logs and JSON)."""
        return {
            "method": self.method,
            "rounds": self.rounds,
            "model_evals": self.model_evals,
            "converged": self.converged,
            "converged_steps": self.converged_steps,
            "final_residual": self.residuals[-1] if self.residuals else None,
            "wall_time": self.wall_time,
            **{k: v for k, v in self.stats.items() if isinstance(v, (int, float, str, bool))},
        }
