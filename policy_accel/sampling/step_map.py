"""The fixed-point map of a denoising problem, evaluated through an executor.

``F_i(x) = step_i(x[i], D(x[i], t_i)) + s_i z_i`` for any set of positions at once. Every call
is one *round* (one batched denoiser call): the map counts rounds and model evaluations, checks
the denoiser's output is finite, and keeps each position's latest converted output (read by
multistep rules at the next position) and clean-sample prediction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.execution.autodiff import jvp
from policy_accel.sampling.errors import NonFiniteDenoiserOutput
from policy_accel.sampling.problem import DenoisingProblem


class StepMap:
    """Evaluates ``F`` at chosen positions; one call is one round."""

    def __init__(
        self, problem: DenoisingProblem, executor: Executor, defer_finite_check: bool = False
    ) -> None:
        """``defer_finite_check``: do not synchronise with the device to check every output;
        the caller (the window driver, whose convergence test reads every round's change
        anyway) calls :meth:`check_finite` when that change is not finite."""
        self.problem = problem
        self.defer_finite_check = defer_finite_check
        self._last: tuple[Tensor, Tensor] | None = None
        self.executor = executor
        self.rule = problem.rule
        self.rounds = 0
        self.model_evals = 0
        shape = (problem.num_steps, *problem.x_T.shape)
        self.converted = torch.zeros(shape, dtype=problem.x_T.dtype, device=problem.x_T.device)
        self.x0_predictions = torch.zeros_like(self.converted)
        self.evaluated = torch.zeros(problem.num_steps, dtype=torch.bool, device=problem.x_T.device)

    # --- plain evaluation ----------------------------------------------------------------------

    def __call__(self, positions: Tensor, x: Tensor) -> Tensor:
        """``F`` at ``positions [P]`` given the samples there ``x [P, B, *event]``.

        A multistep rule reads the converted output of position ``p - 1`` from this call when
        ``p - 1`` is among ``positions``, else from the latest earlier round that evaluated it.
        """
        x_in = self.problem.prepare(x, positions)
        output = self._evaluate(positions, x_in)
        self._count(positions, output, evaluations=int(positions.numel()) * int(x.shape[1]))
        return self._step(positions, x_in, output)

    def _evaluate(self, positions: Tensor, x_in: Tensor) -> Tensor:
        """The model's output at ``positions``, the window padded to the executor's size (its
        last position repeated; those outputs are dropped) so captured shapes stay few."""
        count = int(positions.numel())
        size = self.executor.window_size(count, self.problem.num_steps)
        timesteps = self.rule.timesteps[positions]
        if size > count:
            extra = size - count
            x_in = torch.cat([x_in, x_in[-1:].expand(extra, *x_in.shape[1:])])
            timesteps = torch.cat([timesteps, timesteps[-1:].expand(extra)])
        output = self.executor.evaluate(self.problem.denoiser, x_in, timesteps)
        return output[:count] if size > count else output

    def _step(self, positions: Tensor, x_in: Tensor, output: Tensor) -> Tensor:
        converted = self.rule.convert(positions, x_in, output)
        self.converted[positions] = converted
        self.evaluated[positions] = True
        previous = self._previous_converted(positions, converted) if self.rule.history else None
        deterministic, x0 = self.rule.step_and_x0(positions, x_in, output, converted, previous)
        self.x0_predictions[positions] = x0
        out = deterministic + self.problem.noise_term(positions, deterministic)
        if self.problem.mask is None:
            return out
        # Inpainted entries are overwritten before every use, so the trajectory holds the known
        # value there (the next position's): constant across rounds, they never hold a solver
        # back, and no correction flows through them (the linear parts treat them as fixed).
        return self.problem.prepare(out, positions + 1, guided=False)

    def _previous_converted(self, positions: Tensor, current: Tensor) -> Tensor:
        """Converted output of each position's predecessor. A predecessor never evaluated yet
        (a block start in srds' first iteration) borrows the position's own output, which turns
        the second-order correction off there until a real value exists."""
        before = (positions - 1).clamp_min(0)
        known = (positions > 0) & self.evaluated[before]
        return torch.where(
            known.reshape(-1, *([1] * (current.dim() - 1))), self.converted[before], current
        )

    def predict_x0(self, positions: Tensor, x: Tensor) -> Tensor:
        """One round that only asks for the clean-sample predictions at ``positions`` (srds'
        coarse steps); the per-position buffers are left alone."""
        x_in = self.problem.prepare(x, positions)
        output = self._evaluate(positions, x_in)
        self._count(positions, output, evaluations=int(positions.numel()) * int(x.shape[1]))
        return self.rule.predict_x0(positions, x_in, output)

    def _count(self, positions: Tensor, output: Tensor, evaluations: int) -> None:
        self.rounds += 1
        self.model_evals += evaluations
        if self.defer_finite_check:
            self._last = (positions, output)
            return
        self._check(positions, output)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteDenoiserOutput` naming the step if the last round's output was
        not finite (with a deferred check). A non-finite iterate from finite outputs (an
        extrapolating solver far beyond its converged steps) is left to the solver."""
        if self._last is not None:
            self._check(*self._last)

    def _check(self, positions: Tensor, output: Tensor) -> None:
        finite = torch.isfinite(output.reshape(output.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0, 0])
            step = int(positions[bad])
            raise NonFiniteDenoiserOutput(self.rounds, step, int(self.rule.timesteps[step]))

    # --- linearisation (Newton) ----------------------------------------------------------------

    def linearize(
        self, begin: int, x: Tensor, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``F`` at the contiguous positions ``begin .. begin+P-1`` (or at ``positions [P]``) and
        its Jacobians.

        Returns ``(F, J, K)``: ``J[p] = dF_p / dx[p]`` and, for multistep rules,
        ``K[p] = dF_p / dx[p-1]``, each ``[P, B, E, E]`` with ``E`` the event size. The model's
        Jacobian comes from ``E`` forward-mode directions evaluated in one batched call (one
        round, ``E * P * B`` model evaluations); the step's own derivatives are elementwise
        and come from cheap JVPs of the rule.
        """
        problem, rule = self.problem, self.rule
        positions_count, batch = x.shape[0], x.shape[1]
        event = x.shape[2:]
        size = math.prod(event)
        if positions is None:
            positions = torch.arange(begin, begin + positions_count, device=x.device)
        x_in = problem.prepare(x, positions)
        basis = torch.eye(size, dtype=x.dtype, device=x.device).reshape(size, 1, 1, *event)
        if problem.mask is None:
            tangents = basis.expand(size, positions_count, batch, *event)
        else:  # d(model input)/dx: zero where inpainted, 1 - guide where guided
            tangents = basis * problem.input_weight(positions).unsqueeze(0)  # [E, P, B, *event]
        output, d_output = self.executor.jvp(
            problem.denoiser, x_in, rule.timesteps[positions], tangents
        )
        self._count(positions, output, evaluations=size * positions_count * batch)
        F = self._step(positions, x_in, output)

        previous = (
            self._previous_converted(positions, rule.convert(positions, x_in, output))
            if rule.history
            else None
        )
        ones = torch.ones_like(x_in)

        def step_of(xx: Tensor, mm: Tensor, prev: Tensor | None) -> Tensor:
            return rule.step(positions, xx, rule.convert(positions, xx, mm), prev)

        _, slope_x = jvp(lambda xx: step_of(xx, output, previous), (x_in,), (ones,))
        _, slope_m = jvp(lambda mm: step_of(x_in, mm, previous), (output,), (ones,))
        # J columns: dF/dx . e_k = slope_x * e_k + slope_m * (dD . e_k), e_k masked by `free`.
        columns = slope_x.unsqueeze(0) * tangents + slope_m.unsqueeze(0) * d_output
        J = columns.reshape(size, positions_count, batch, size).permute(1, 2, 3, 0)
        if problem.mask is not None:  # F holds the known values there: constant rows
            J = J * (~problem.mask).to(x.dtype).expand_as(x[0]).reshape(1, batch, size, 1)
        if not rule.history:
            return F, J, None
        _, slope_prev = jvp(lambda pp: step_of(x_in, output, pp), (previous,), (ones,))
        _, conv_x = jvp(lambda xx: rule.convert(positions, xx, output), (x_in,), (ones,))
        _, conv_m = jvp(lambda mm: rule.convert(positions, x_in, mm), (output,), (ones,))
        d_converted = (
            conv_x.unsqueeze(0) * tangents + conv_m.unsqueeze(0) * d_output
        )  # [E, P, B, *ev]
        shifted = torch.cat([torch.zeros_like(d_converted[:, :1]), d_converted[:, :-1]], dim=1)
        k_columns = slope_prev.unsqueeze(0) * shifted
        K = k_columns.reshape(size, positions_count, batch, size).permute(1, 2, 3, 0)
        return F, J, K
