"""Per-step Jacobian estimates that chord Newton reuses across rounds and replans.

A step ``x[i+1] = F_i(x[i])`` has the Jacobian ``a_i I + M_i``: ``a_i`` is the rule's linear
coefficient (the clean-sample prediction held fixed, what picard propagates exactly) and ``M_i``
the part that comes through the model. :class:`Jacobians` keeps ``M`` at some positions of a
solved problem; another problem of the same policy (the next replan) uses it as the linear part
of :func:`~policy_accel.sampling.solvers.chord.chord`'s rounds. Keeping only the model part lets
one estimate serve any scheduler position and lets it be moved along the horizon.

Measured on the shipped PushT policy (DDPM-100, 8-step replans, 11 recorded replans): the
previous replan's Jacobians, shifted by the 8 executed steps, with the new tail filled by
translation from the chunk's end (:meth:`Jacobians.shifted`), took chord with secant updates
from 8.1 rounds (no estimate) to 7.2 at tolerance 1e-3; every 4th position measured (nearest
position filling the rest) did as well as every position, at a quarter of the ``E x N`` JVP
directions. Any estimate, even of a different problem, costs rounds, never correctness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.execution import Executor
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.step_map import StepMap


@dataclass(frozen=True)
class Jacobians:
    """``model [K, B, E, E]``: the model part of ``dF_i / dx[i]`` at ``positions [K]`` (sorted)
    of a ``num_steps``-step problem whose events have ``event_shape`` (``E`` elements)."""

    model: Tensor
    positions: Tensor
    num_steps: int
    event_shape: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return int(self.model.shape[1])

    @property
    def evaluations(self) -> int:
        """Model evaluations it took (JVP directions times positions times rows)."""
        return int(self.model.shape[0]) * self.batch_size * math.prod(self.event_shape)

    def matches(self, problem: DenoisingProblem) -> bool:
        return (
            self.num_steps == problem.num_steps
            and tuple(self.event_shape) == tuple(problem.event_shape)
            and self.batch_size == problem.batch_size
        )

    def rows(self) -> list[Jacobians]:
        return [self.select(slice(row, row + 1)) for row in range(self.batch_size)]

    def select(self, rows) -> Jacobians:
        return Jacobians(self.model[:, rows], self.positions, self.num_steps, self.event_shape)

    @staticmethod
    def cat(parts: list[Jacobians]) -> Jacobians:
        first = parts[0]
        for part in parts[1:]:
            if not torch.equal(part.positions, first.positions) or (
                part.event_shape,
                part.num_steps,
            ) != (first.event_shape, first.num_steps):
                raise ValueError("Jacobians of different positions or events cannot be batched.")
        model = torch.cat([part.model for part in parts], dim=1)
        return Jacobians(model, first.positions, first.num_steps, first.event_shape)

    def shifted(self, shift: int, axis: int = 0) -> Jacobians:
        """The estimate for the same steps ``shift`` entries later along horizon axis ``axis``
        of the event (the actions executed since): the block coupling entries ``(h, g)`` is the
        old block ``(h + shift, g + shift)``; blocks that reach past the old end are translated
        back until they fit, which keeps the chunk end's boundary behaviour (a UNet along the
        horizon is nearly translation-equivariant away from its edges)."""
        length = self.event_shape[axis]
        if not 0 <= shift < length:
            raise ValueError(f"shift must be in [0, {length}). Got {shift}.")
        if shift == 0:
            return self
        h = torch.arange(length).reshape(-1, 1)
        g = torch.arange(length).reshape(1, -1)
        back = (torch.maximum(h, g) + shift - (length - 1)).clamp_min(0)
        rows, cols = h + shift - back, g + shift - back  # [L, L] old indices
        k, batch = self.model.shape[:2]
        dims = len(self.event_shape)
        blocks = self.model.reshape(k, batch, *self.event_shape, *self.event_shape)
        out_axis, in_axis = 2 + axis, 2 + dims + axis
        moved = blocks.movedim((out_axis, in_axis), (0, 1))  # [L, L, K, B, ...]
        gathered = moved[rows, cols].movedim((0, 1), (out_axis, in_axis))
        model = gathered.reshape(self.model.shape).contiguous()
        return Jacobians(model, self.positions, self.num_steps, self.event_shape)

    def dense(self, coefficient: Tensor) -> Tensor:
        """``[N, B, E, E]``: ``a_i I + M_i`` at every position, each position taking the nearest
        measured one's model part."""
        size = math.prod(self.event_shape)
        steps = torch.arange(self.num_steps, device=self.positions.device)
        nearest = (steps.unsqueeze(1) - self.positions.unsqueeze(0)).abs().argmin(dim=1)
        model = self.model[nearest.to(self.model.device)]
        eye = torch.eye(size, dtype=model.dtype, device=model.device)
        return model + coefficient.to(model).reshape(-1, 1, 1, 1) * eye


def estimate_jacobians(
    problem: DenoisingProblem,
    trajectory: Tensor,
    executor: Executor,
    stride: int = 1,
    chunk: int = 4096,
) -> Jacobians:
    """Measure the model part of every ``stride``-th step's Jacobian (and the last step's) at
    ``trajectory [N + 1, B, *event]`` of ``problem``: ``E`` forward-mode directions per position
    and row, batched ``chunk`` model evaluations at a time."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int. Got {stride!r}.")
    n = problem.num_steps
    positions = torch.unique(torch.cat([torch.arange(0, n, stride), torch.tensor([n - 1])]))
    device = trajectory.device
    positions = positions.to(device)
    size = math.prod(problem.event_shape)
    per_call = max(1, chunk // (size * problem.batch_size))
    step_map = StepMap(problem, executor)
    coefficient = problem.rule.linear_coefficient().to(trajectory)
    eye = torch.eye(size, dtype=trajectory.dtype, device=device)
    parts = []
    for start in range(0, len(positions), per_call):
        chosen = positions[start : start + per_call]
        _, J, _ = step_map.linearize(0, trajectory[chosen], positions=chosen)
        parts.append(J - coefficient[chosen].reshape(-1, 1, 1, 1) * eye)
    return Jacobians(torch.cat(parts), positions, n, tuple(problem.event_shape))
