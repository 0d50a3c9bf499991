"""What of a denoising problem a captured graph takes as input, and what it is keyed by.

A capture (a whole sequential loop, a solver round; see
:class:`~policy_accel.execution.graphs.GraphCache`) must be replayable by every later problem of
the same policy: its key names what stays (the network, the step rule, the shapes and dtypes)
and its inputs are the tensors that change (the noise, the inpainting data, the network's
per-sample context), copied into static buffers before each replay.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields

from torch import Tensor

from policy_accel.execution.bound import ConditionedDenoiser
from policy_accel.sampling.problem import DenoisingProblem

DATA_FIELDS = ("x_T", "noise", "mask", "cond_data", "noised", "guide")


@dataclass(frozen=True)
class CaptureInputs:
    """``key`` and ``owners`` for :class:`GraphCache`, the problem's changing ``tensors``, and
    ``rebuild(tensors)``: the same problem on other tensors (the capture's static buffers),
    built without the validation's host synchronisations."""

    key: Hashable
    owners: tuple[object, ...]
    tensors: tuple[Tensor, ...]
    rebuild: Callable[[tuple[Tensor, ...]], DenoisingProblem]


def capture_inputs(problem: DenoisingProblem) -> CaptureInputs:
    denoiser = problem.denoiser
    data = {name: getattr(problem, name) for name in DATA_FIELDS}
    data = {name: value for name, value in data.items() if value is not None}
    bound = isinstance(denoiser, ConditionedDenoiser)
    context = dict(denoiser.context) if bound else {}
    owner = denoiser.network if bound else denoiser  # an adapter's denoiser holds its own
    key = (
        id(owner),
        id(problem.rule),
        tuple((name, tuple(v.shape), v.dtype, v.device) for name, v in data.items()),
        tuple((name, tuple(v.shape), v.dtype) for name, v in context.items()),
    )

    def rebuild(values: tuple[Tensor, ...]) -> DenoisingProblem:
        new_data = dict(zip(data, values[: len(data)], strict=True))
        new_context = dict(zip(context, values[len(data) :], strict=True))
        rebuilt = copy.copy(problem)  # no __post_init__: its checks synchronise with the device
        for field in fields(problem):
            if field.name in new_data:
                object.__setattr__(rebuilt, field.name, new_data[field.name])
        if bound:
            object.__setattr__(rebuilt, "denoiser", denoiser.with_context(new_context))
        return rebuilt

    return CaptureInputs(key, (owner, problem.rule), (*data.values(), *context.values()), rebuild)
