"""The linear recurrence behind picard, taa and newton, solved by a sequential scan.

Given the map's values ``F[p]`` at the window positions and the old iterate, the new iterate is
``x_new[p+1] = F[p] + A_p (x_new[p] - x_old[p]) + K_p (x_new[p-1] - x_old[p-1])`` with
``x_new[begin] = x_old[begin]`` (final). Written in this correction form, a position whose
predecessors did not move gets exactly ``F[p]``. The scan costs no model calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Linear = Callable[[int, Tensor], Tensor]  # (window position p, delta [B, *event]) -> [B, *event]


def correction_scan(
    F: Tensor, old_next: Tensor, current: Linear, previous: Linear | None = None
) -> Tensor:
    """Solve the recurrence for ``x_new[begin+1 .. end]``; ``old_next`` is
    ``x_old[begin+1 .. end]``."""
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


def diagonal_scan(
    F: Tensor, old_next: Tensor, coefficient: Tensor, safe: bool | None = None
) -> Tensor:
    """:func:`correction_scan` for a scalar linear part per position (``coefficient [P]``),
    vectorised: ``delta_{p+1} = a_p delta_p + r_p`` is ``C_p sum_{q<=p} r_q / C_q`` with
    ``C = cumprod(a)``, evaluated in float64. Falls back to the loop if the products underflow;
    ``safe`` (a rule's :meth:`~policy_accel.sampling.rules.StepRule.products_are_safe`) skips
    that check, a host synchronisation, on every round."""
    residual = (F - old_next).to(torch.float64)
    a = coefficient.to(torch.float64)
    # delta entering position p is sum_{q<p} (a_{q+1} ... a_{p-1}) r_q; new[p] = F[p] + a_p delta_p
    shifted = torch.cat([torch.ones_like(a[:1]), a[1:]])
    products = torch.cumprod(shifted, dim=0)
    if safe is None:
        safe = bool((products.abs() > 1e-250).all())
    if not safe:
        return correction_scan(F, old_next, lambda p, delta: coefficient[p] * delta)
    shape = (-1,) + (1,) * (F.dim() - 1)
    weighted = torch.cumsum(residual / products.reshape(shape), dim=0) * products.reshape(shape)
    delta = torch.cat([torch.zeros_like(weighted[:1]), weighted[:-1]])  # delta at position p
    new = F + (a.reshape(shape) * delta).to(F.dtype)
    new[0] = F[0]
    return new


def linear_recurrence(start: Tensor, coefficient: Tensor, offset: Tensor) -> Tensor:
    """``x[0] = start``, ``x[i+1] = a_i x[i] + c_i`` for ``a = coefficient`` (``[N]``, or
    elementwise ``[N, *shape]``) and ``c = offset [N, *shape]``, all ``N + 1`` values at once:
    ``x[i+1] = A_i (start + sum_{j<=i} c_j / A_j)`` with ``A = cumprod(a)`` in float64 (a loop
    when the products underflow)."""
    a = coefficient.to(torch.float64)
    if a.dim() == 1:
        a = a.reshape((-1,) + (1,) * (offset.dim() - 1))
    products = torch.cumprod(a, dim=0)
    out = torch.empty((offset.shape[0] + 1, *offset.shape[1:]), dtype=offset.dtype,
                      device=offset.device)  # fmt: skip
    out[0] = start
    if not bool((products.abs() > 1e-250).all()):
        for i in range(offset.shape[0]):
            out[i + 1] = coefficient[i] * out[i] + offset[i]
        return out
    scaled = torch.cumsum(offset.to(torch.float64) / products, dim=0)
    out[1:] = ((start.to(torch.float64).unsqueeze(0) + scaled) * products).to(out)
    return out


def matrix_scan(F: Tensor, old_next: Tensor, J: Tensor) -> Tensor:
    """:func:`correction_scan` with a matrix linear part ``J [P, B, E, E]`` acting on the
    flattened event: ``d_p = J_p d_{p-1} + r_p`` for the change ``d = x_new - x_old``, ``r = F -
    x_old``. On a CPU one fused multiply-add per position is cheapest; elsewhere the recurrence
    is an associative scan of affine maps (Hillis-Steele doubling, DEER): ``log2 P`` batched
    matrix products instead of ``P`` dependent launches."""
    count, batch = F.shape[0], F.shape[1]
    r = (F - old_next).reshape(count, batch, -1, 1)
    if F.device.type == "cpu":
        d = torch.empty_like(r)
        d[0] = r[0]
        for p in range(1, count):
            torch.baddbmm(r[p], J[p], d[p - 1], out=d[p])
    else:
        d = affine_scan(J, r)
    return (d.reshape(old_next.shape) + old_next).to(F.dtype)


def affine_scan(A: Tensor, b: Tensor) -> Tensor:
    """All prefixes of ``y_0 = b_0``, ``y_p = A_p y_{p-1} + b_p`` (``A [P, ..., E, E]``, ``b [P,
    ..., E, 1]``; ``A_0`` unused) by doubling: the composition of affine maps is associative."""
    A, y = A.clone(), b.clone()
    offset = 1
    while offset < A.shape[0]:
        y_next = y.clone()
        y_next[offset:] = y[offset:] + A[offset:] @ y[:-offset]
        A_next = A.clone()
        A_next[offset:] = A[offset:] @ A[:-offset]
        A_next[:offset] = 0
        A, y = A_next, y_next
        offset *= 2
    return y
