"""The denoising problem every solver solves.

The discrete trajectory of N solver steps::

    x[0] = x_T
    x[i+1] = step_i(x[i], D(x[i], t_i)) + s_i * z_i        i = 0 .. N-1

with all noise ``z`` drawn up front, so the trajectory is a deterministic function of
``(x_T, z)`` and the fixed point every parallel solver converges to is exactly the sequential
sample with that noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from policy_accel.sampling.rules import StepRule, rule_from_scheduler

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x, t)``: ``x`` is a flat batch ``[M, *event]`` of M = P*B rows (window position
major, sample minor), ``t`` is ``[M]``; returns the model output for each row, ``[M, *event]``."""


@dataclass(frozen=True)
class DenoisingProblem:
    """A sampling problem: denoiser, exact step rule, starting point and all noise.

    Attributes:
        denoiser: the model with its conditioning bound (see :data:`Denoiser`).
        rule: the scheduler's vectorised step (:class:`~policy_accel.sampling.rules.StepRule`).
        x_T: ``[B, *event]`` starting noise.
        noise: ``[N, B, *event]`` per-step noise ``z_i`` (zero at steps that draw none).
        mask, cond_data: optional inpainting: where ``mask`` is true, ``cond_data`` is written
            into ``x`` before every model call and into the final sample (DiffusionPolicy's
            ``condition_mask`` / ``condition_data``). Both broadcast to ``[B, *event]``.
        noised: where true (a part of ``mask``), the value written before the step at position
            ``i`` is ``cond_data`` forward-noised to that position's level, ``alpha_i c +
            sigma_i x_T`` (with the problem's own ``x_T``, so it is deterministic), and ``c``
            itself in the final sample: inpainting for a model not trained with clean known
            values in a noisy input (committed actions in real-time chunking). Written clean,
            such values put the model far off its training inputs and the parallel solvers
            needed 83-99 of 100 rounds on PushT.
        guide: soft inpainting: ``[N, B, *event]`` (broadcastable) weights in ``[0, 1]``, zero
            inside ``mask``. Before step ``i`` the input becomes ``x + guide[i] (k_i - x)``
            with ``k_i`` the forward-noised ``cond_data`` as for ``noised``; the stored
            trajectory and the final sample are the model's own (a guided entry follows its
            known value only as strongly and as long as the weights say: RTC's decaying prefix
            schedule over the rest of a chunk overlap). Part of the step map, so every solver
            still equals sequential sampling of the guided problem.
    """

    denoiser: Denoiser
    rule: StepRule
    x_T: Tensor
    noise: Tensor
    mask: Tensor | None = None
    cond_data: Tensor | None = None
    noised: Tensor | None = None
    guide: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.rule.num_steps
        expected = (n, *self.x_T.shape)
        if tuple(self.noise.shape) != expected:
            raise ValueError(
                f"noise has shape {tuple(self.noise.shape)}, expected {expected} "
                f"([num_steps, batch, *event] for {n} steps and x_T of shape "
                f"{tuple(self.x_T.shape)})."
            )
        if not self.x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor. Got dtype {self.x_T.dtype}.")
        if (self.mask is None) != (self.cond_data is None):
            raise ValueError("mask and cond_data go together: pass both or neither.")
        if self.mask is not None:
            try:
                torch.broadcast_shapes(self.mask.shape, self.x_T.shape)
                torch.broadcast_shapes(self.cond_data.shape, self.x_T.shape)
            except RuntimeError as error:
                raise ValueError(
                    f"mask {tuple(self.mask.shape)} and cond_data {tuple(self.cond_data.shape)} "
                    f"must broadcast to x_T's shape {tuple(self.x_T.shape)}."
                ) from error
        if self.noised is not None:
            if self.mask is None:
                raise ValueError("noised entries are inpainted entries: pass mask and cond_data.")
            if bool((self.noised & ~self.mask).any()):
                raise ValueError("noised must be a part of mask.")
        if self.guide is not None:
            if self.mask is None:
                raise ValueError("guided entries take cond_data: pass mask (may be all false).")
            try:
                torch.broadcast_shapes(self.guide.shape, (n, *self.x_T.shape))
            except RuntimeError as error:
                raise ValueError(
                    f"guide {tuple(self.guide.shape)} must broadcast to [num_steps, batch, "
                    f"*event] = {(n, *self.x_T.shape)}."
                ) from error
            if not bool(((self.guide >= 0) & (self.guide <= 1)).all()):
                raise ValueError("guide weights must lie in [0, 1].")
            if bool(((self.guide > 0) & self.mask).any()):
                raise ValueError("guide must be zero inside mask (those entries are fixed).")
        for name in ("x_T", "noise"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} contains NaN or Inf.")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        denoiser: Denoiser,
        num_inference_steps: int,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        cond_data: Tensor | None = None,
        *,
        noised: Tensor | None = None,
        guide: Tensor | None = None,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> DenoisingProblem:
        """Build the problem of sampling ``shape = (B, *event)`` with a diffusers scheduler.

        Missing ``x_T`` and ``noise`` are drawn from ``generator`` in the order the sequential
        diffusers loop draws them (``x_T`` first, then one tensor per noise-drawing step), so a
        generator seeded the same way reproduces the sequential pipeline's sample. ``eta`` and
        ``use_clipped_model_output`` are DDIM's step options. The scheduler is not modified.
        """
        rule = rule_from_scheduler(scheduler, num_inference_steps, eta, use_clipped_model_output)
        shape = tuple(int(s) for s in shape)
        if device is None:
            device = (
                x_T.device if x_T is not None else (noise.device if noise is not None else "cpu")
            )
        device = torch.device(device)

        def draw() -> Tensor:
            source = generator.device if generator is not None else device
            return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)

        if x_T is None:
            x_T = draw() * scheduler.init_noise_sigma
        elif tuple(x_T.shape) != shape:
            raise ValueError(
                f"x_T has shape {tuple(x_T.shape)}, expected {shape} (the `shape` argument)."
            )
        rule = rule.to(device)
        if noise is not None:
            _check_noise_shape(noise, (rule.num_steps, *shape))
        if noise is None:
            noise = torch.zeros((rule.num_steps, *shape), dtype=dtype, device=device)
            for i in range(rule.num_steps):
                if bool(rule.draws_noise[i]):
                    noise[i] = draw()
        return cls(
            denoiser=denoiser,
            rule=rule,
            x_T=x_T.to(device=device, dtype=dtype),
            noise=_zero_unused(noise.to(device=device, dtype=dtype), rule),
            mask=None if mask is None else mask.to(device=device, dtype=torch.bool),
            cond_data=None if cond_data is None else cond_data.to(device=device, dtype=dtype),
            noised=None if noised is None else noised.to(device=device, dtype=torch.bool),
            guide=None if guide is None else guide.to(device=device, dtype=dtype),
        )

    # --- shapes -----------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return self.rule.num_steps

    @property
    def batch_size(self) -> int:
        return int(self.x_T.shape[0])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.x_T.shape[1:])

    @property
    def trajectory_shape(self) -> tuple[int, ...]:
        return (self.num_steps + 1, *self.x_T.shape)

    @property
    def timesteps(self) -> Tensor:
        return self.rule.timesteps

    @property
    def tolerance_scale(self) -> Tensor:
        """``[N]``: the noise scale each step's convergence is measured against (ParaDiGMS)."""
        return self.rule.tolerance_scale()

    # --- the step map -------------------------------------------------------------------------

    def prepare(
        self, x: Tensor, positions: Tensor | int | None = None, guided: bool = True
    ) -> Tensor:
        """Write the inpainting condition into ``x`` (no-op without a mask): ``x [P, B,
        *event]`` at trajectory ``positions [P]``, ``x [B, *event]`` at one position (an int),
        or the final sample (``None``). ``guided``: also blend the :attr:`guide`d entries, as
        the model's input at those positions (not in a stored trajectory)."""
        if self.mask is None:
            return x
        value = self.cond_data.to(x.dtype)
        known = None
        if positions is not None and (self.noised is not None or self.guide is not None):
            known = self.known_at(positions).to(x.dtype)
        if self.noised is not None and known is not None:
            value = torch.where(self.noised, known, value)
        out = torch.where(self.mask, value, x)
        if guided and self.guide is not None and known is not None:
            out = out + self.guide_at(positions).to(x.dtype) * (known - out)
        return out

    def guide_at(self, positions: Tensor | int) -> Tensor:
        """The :attr:`guide` weights at ``positions`` (``[P, B, *event]``, or ``[B, *event]``
        for one int position)."""
        full = self.guide.expand(self.num_steps, *self.x_T.shape)
        if isinstance(positions, int):
            return full[positions]
        return full[positions.to(full.device)]

    def input_weight(self, positions: Tensor) -> Tensor:
        """``[P, B, *event]``: the derivative of the model's input at ``positions`` by the
        stored sample there (elementwise): 0 where inpainted, ``1 - guide`` where guided, 1
        elsewhere."""
        shape = (len(positions), *self.x_T.shape)
        weight = torch.ones(shape, dtype=self.x_T.dtype, device=self.x_T.device)
        if self.mask is not None:
            weight = weight * (~self.mask).to(weight.dtype)
        if self.guide is not None:
            weight = weight * (1 - self.guide_at(positions).to(weight.dtype))
        return weight

    def known_at(self, positions: Tensor | int) -> Tensor:
        """The forward-noised known values ``alpha_i c + sigma_i x_T`` at ``positions``
        (``[P, B, *event]``, or ``[B, *event]`` for one int position)."""
        single = isinstance(positions, int)
        idx = torch.as_tensor([positions] if single else positions, device=self.x_T.device)
        shape = (-1,) + (1,) * self.x_T.dim()
        alpha = self.rule.alphas[idx].to(self.x_T.dtype).reshape(shape)
        sigma = self.rule.sigmas[idx].to(self.x_T.dtype).reshape(shape)
        known = alpha * self.cond_data.to(self.x_T.dtype) + sigma * self.x_T
        return known[0] if single else known

    def noise_term(self, idx: Tensor, like: Tensor) -> Tensor:
        """``s_i * z_i`` for positions ``idx``."""
        scale = self.rule.noise_scale[idx].to(like.dtype)
        return scale.reshape(scale.shape + (1,) * (like.dim() - 1)) * self.noise[idx].to(like.dtype)

    def check_init(self, init: Tensor | None) -> Tensor | None:
        """Validate a trajectory guess; returns it as a fresh tensor of the problem's dtype."""
        if init is None:
            return None
        if tuple(init.shape) != self.trajectory_shape:
            raise ValueError(
                f"init has shape {tuple(init.shape)}, expected {self.trajectory_shape} "
                "([num_steps + 1, batch, *event]: the whole trajectory, x_T first)."
            )
        if not torch.isfinite(init).all():
            raise ValueError("init contains NaN or Inf.")
        guess = init.to(device=self.x_T.device, dtype=self.x_T.dtype).clone()
        guess[0] = self.x_T
        return guess


def _check_noise_shape(noise: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(noise.shape) != tuple(expected):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected {tuple(expected)} "
            "([num_steps, batch, *event]: one tensor per solver step)."
        )


def _zero_unused(noise: Tensor, rule: StepRule) -> Tensor:
    """Zero the noise of steps that draw none, so those entries are ignored whatever they hold."""
    keep = rule.draws_noise.to(noise.device).reshape(-1, *([1] * (noise.dim() - 1)))
    return torch.where(keep, noise, torch.zeros((), dtype=noise.dtype, device=noise.device))


def noise_from_draws(rule: StepRule, draws: Tensor) -> Tensor:
    """Place ``draws [K, B, *event]`` (the tensors a sequential loop drew, in order, one per
    noise-drawing step) at those steps of an ``[N, B, *event]`` noise tensor."""
    drawing = torch.nonzero(rule.draws_noise.cpu()).flatten()
    if draws.shape[0] != drawing.numel():
        raise ValueError(
            f"got {draws.shape[0]} noise draws, but this schedule draws noise at "
            f"{drawing.numel()} of its {rule.num_steps} steps."
        )
    noise = torch.zeros((rule.num_steps, *draws.shape[1:]), dtype=draws.dtype, device=draws.device)
    noise[drawing.to(draws.device)] = draws
    return noise
