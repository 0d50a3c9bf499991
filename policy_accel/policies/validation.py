"""Checking a checkpoint's config and weights before anything large is built.

A checkpoint's config decides how much memory the loader allocates (layer widths, the number of
layers, the diffusion steps), so it is validated first: integers within bounds
(:data:`LIMITS`), the horizon timeline consistent. Then the networks are built on torch's
``meta`` device, which allocates nothing, and their parameter shapes are compared with the
file's tensors: only a config that matches the weights, whose size the file itself bounds, is
built for real. Every failure is a :class:`~policy_accel.policies.errors.CheckpointError` naming
the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from policy_accel.messages import preview, shorten
from policy_accel.policies.errors import CheckpointContentError, CheckpointError

Module = TypeVar("Module", bound=nn.Module)

# Upper bounds on config integers: far above any published policy (DiffusionPolicy's largest
# UNet is [512, 1024, 2048], transformers have 8-12 layers, DDPM 1000 train steps), far below
# what would exhaust memory or loop for minutes while the networks are constructed.
LIMITS = {
    "width": 65536,  # channels, embedding sizes, observation and action sizes
    "layers": 256,  # transformer layers, heads, UNet levels
    "horizon": 4096,  # horizon, n_obs_steps, n_action_steps
    "train_timesteps": 100_000,
}
# Parameters upstream's ModuleAttrMixin adds for device bookkeeping; they hold nothing.
BOOKKEEPING_KEYS = ("_dummy_variable", "mask_generator._dummy_variable", "model._dummy_variable")


def positive_int(value: Any, name: str, source: str, limit: str = "width") -> int:
    """``value`` as an int in ``1 .. LIMITS[limit]``, or a CheckpointContentError naming it."""
    maximum = LIMITS[limit]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise CheckpointContentError(
            f"{source}: {name} must be an int between 1 and {maximum}. Got {shorten(repr(value))}."
        )
    return value


def int_list(value: Any, name: str, source: str, limit: str = "width") -> tuple[int, ...]:
    """A non-empty list of bounded positive ints (``down_dims``), at most ``LIMITS['layers']``
    long."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= LIMITS["layers"]:
        raise CheckpointContentError(
            f"{source}: {name} must be a list of 1 to {LIMITS['layers']} ints. Got "
            f"{shorten(repr(value), 60)}."
        )
    return tuple(positive_int(v, f"{name}[{i}]", source, limit) for i, v in enumerate(value))


def check_action_window(
    source: str, horizon: int, start: int, n_action_steps: int, rule: str
) -> None:
    """The executed actions ``start .. start + n_action_steps - 1`` must lie in the horizon."""
    if start + n_action_steps > horizon:
        raise CheckpointContentError(
            f"{source}: n_action_steps={n_action_steps} does not fit the horizon: actions start "
            f"at {start}, so {rule} = {horizon - start} at most (horizon={horizon}). Lower "
            "n_action_steps or train with a longer horizon."
        )


def load_weights(
    build: Callable[[], dict[str, nn.Module]],
    state: dict[str, Tensor],
    source: str,
    *,
    rename: Callable[[str, str], str] | None = None,
    file_key: Callable[[str, str], str] | None = None,
    hint: str = "Check that the file and its config belong together.",
    error_type: type[CheckpointError] = CheckpointContentError,
) -> dict[str, nn.Module]:
    """The modules ``build()`` returns (file key prefix -> module; ``""`` for a whole state
    dict) with every tensor of ``state`` loaded, strictly: the one weight loader of every policy.

    ``build`` runs first on the meta device (no memory) and the file is checked against it:
    missing, unexpected and mis-shaped keys and floats where integers belong are all named (a
    module none of whose keys is present once, as ``<prefix>*``), in one ``error_type`` naming
    ``source``. Only then are the modules built for real and loaded. ``rename(prefix, key)``
    maps a file key (without its prefix) to the module's key and ``file_key`` back, for
    checkpoints whose layout differs from ours (LeRobot's UNet).
    """
    rename = rename or (lambda prefix, key: key)
    file_key = file_key or (lambda prefix, key: prefix + key)
    state = {k: v for k, v in state.items() if k not in BOOKKEEPING_KEYS}
    with torch.device("meta"):
        probe = build()
    prefixes = sorted(probe, key=len, reverse=True)  # the longest prefix owns a key
    owned: dict[str, dict[str, str]] = {prefix: {} for prefix in probe}
    unexpected = []
    for key in state:
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unexpected.append(key)
        else:
            owned[prefix][rename(prefix, key[len(prefix) :])] = key
    missing, mismatched = [], []
    for prefix, module in probe.items():
        expected = module.state_dict()
        unexpected += [theirs for ours, theirs in owned[prefix].items() if ours not in expected]
        absent = sorted(file_key(prefix, k) for k in expected if k not in owned[prefix])
        if len(absent) == len(expected) > 1:
            missing.append(f"{prefix}* (all {len(expected)} keys)")
        else:
            missing += absent
        for ours, theirs in owned[prefix].items():
            if ours not in expected:
                continue
            tensor, target = state[theirs], expected[ours]
            if tuple(tensor.shape) != tuple(target.shape):
                mismatched.append(
                    f"{theirs}: file {tuple(tensor.shape)} vs model {tuple(target.shape)}"
                )
            elif tensor.is_floating_point() != target.is_floating_point():
                mismatched.append(f"{theirs}: file dtype {tensor.dtype} vs model {target.dtype}")
    if missing or unexpected or mismatched:
        raise error_type(
            f"{source} does not match the networks its config describes: missing keys "
            f"{preview(missing, 40, 120)}, unexpected keys {preview(sorted(unexpected), 40, 120)}"
            f", shape mismatches {preview(mismatched, 10, 160)}. {hint}"
        )
    modules = build()
    for prefix, module in modules.items():
        targets = module.state_dict()
        module.load_state_dict(
            {ours: state[theirs].to(targets[ours].dtype) for ours, theirs in owned[prefix].items()}
        )
    return modules


@contextmanager
def naming_the_file(
    source: str, error_type: type[CheckpointError] = CheckpointContentError
) -> Iterator[None]:
    """Turn a stray lookup or type error while reading a config into a CheckpointContentError
    that names the file (a missing key, a list where a dict belongs, a value a library
    refuses), and prefix the file to a CheckpointError that does not name it yet."""
    try:
        yield
    except CheckpointError as error:
        if source in str(error):
            raise
        raise type(error)(f"{source}: {error}") from error
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as error:
        what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise error_type(
            f"{source}: its config is malformed ({type(error).__name__}: {what[:200]}); compare "
            "it with a config DiffusionPolicy or LeRobot wrote."
        ) from error


MAX_CONFIG_DEPTH = 64


def config_leaves(cfg: Any, source: str, where: str = "cfg") -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of every leaf of a config of dicts and lists, named as ``where.key[i]``
    (``key[i]`` when ``where`` is empty); a config nested deeper than ``MAX_CONFIG_DEPTH`` is
    refused naming ``source``."""
    stack = [(where, cfg, 0)]
    while stack:
        name, value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise CheckpointContentError(
                f"{source}: {name[:120]} is nested deeper than {MAX_CONFIG_DEPTH} levels."
            )
        if isinstance(value, dict):
            stack.extend((f"{name}.{key}" if name else str(key), item, depth + 1)
                         for key, item in value.items())  # fmt: skip
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{i}]", item, depth + 1) for i, item in enumerate(value))
        else:
            yield name, value


def check_finite(
    cfg: Any, source: str, where: str, error_type: type[CheckpointError] = CheckpointContentError
) -> None:
    """Refuse NaN and infinite numbers anywhere in a config, naming the file and the field: no
    setting of a policy is meant to be one, and one read as a scheduler's ``clip_sample_range``
    or ``beta_start`` would break every plan far from its cause."""
    for name, value in config_leaves(cfg, source, where):
        if isinstance(value, float) and not math.isfinite(value):
            raise error_type(
                f"{source}: {name[:120]} is {value}, not a finite number. Write the value the "
                "policy was trained with (JSON has no NaN or Infinity; Python's json module "
                "writes them for such floats)."
            )


MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_json_object(path, error_type: type[CheckpointError]) -> dict:
    """A JSON object from a checkpoint's config file (at most ``MAX_CONFIG_BYTES``, UTF-8),
    with errors of ``error_type`` that name the file."""
    if path.exists() and not path.is_file():
        raise error_type(f"{path} is not a regular file (a directory, FIFO or device).")
    if not path.is_file():
        raise error_type(f"{path} does not exist; the checkpoint needs it.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise error_type(
            f"{path} is {path.stat().st_size} bytes; a config file is at most "
            f"{MAX_CONFIG_BYTES} bytes."
        )
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise error_type(
            f"{path} is not valid JSON ({type(error).__name__}: {str(error)[:200]}); "
            "re-download or re-save the checkpoint."
        ) from error
    if not isinstance(value, dict):
        raise error_type(f"{path} holds a JSON {type(value).__name__}, expected an object.")
    check_finite(value, str(path), "", error_type)
    return value
