"""LeRobot checkpoint files and the normalization they define.

Two layouts exist:

* current (LeRobot >= 0.4): the stats live in the processor pipelines. ``policy_preprocessor.json``
  has a ``normalizer_processor`` step and ``policy_postprocessor.json`` an
  ``unnormalizer_processor`` step. Each step has its own ``eps``, ``features`` and ``norm_map``,
  and its ``state_file`` holds flat ``<feature key>.<stat>`` tensors.
* legacy (LeRobot <= 0.3): there are no processor files. The stats are frozen parameters inside
  ``model.safetensors``, named ``normalize_inputs.buffer_<key, "." -> "_">.<stat>``,
  ``normalize_targets.buffer_action.<stat>`` and ``unnormalize_outputs.buffer_action.<stat>``.
  Their formulas put eps elsewhere (see :class:`FeatureNormalization`).

In both layouts the mode of a feature comes from its *type* (STATE, ENV, VISUAL, ACTION) through
the norm map, and a type the map does not list is left unnormalized. Vector stats have shape
``(D,)``; image stats are per channel, ``(C, 1, 1)`` (LeRobot's layout, in the processor files and
in the legacy ``normalize_inputs.buffer_<camera>`` buffers alike), and broadcast over ``H, W``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from policy_accel.policies.errors import LeRobotCheckpointError
from policy_accel.policies.validation import read_json_object

MODE_STATS = {
    "IDENTITY": (),
    "MEAN_STD": ("mean", "std"),
    "MIN_MAX": ("min", "max"),
    "QUANTILES": ("q01", "q99"),
    "QUANTILE10": ("q10", "q90"),
}
LEGACY_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX")
# LeRobot's DiffusionConfig default: no ENV entry, so environment_state stays raw by default.
DEFAULT_NORMALIZATION_MAPPING = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}
LEGACY_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
# Pipeline steps with no effect on a policy that receives batched float tensors on its device.
PASSIVE_STEPS = {"to_batch_processor", "device_processor", "rename_observations_processor"}
LEGACY_EPS = 1e-8


# --- files --------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, with errors that name the file."""
    return read_json_object(path, LeRobotCheckpointError)


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file on the CPU, with errors that name the file."""
    if not path.is_file():
        raise LeRobotCheckpointError(f"{path} does not exist; a LeRobot checkpoint needs it.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise LeRobotCheckpointError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or corrupt. "
            "Re-download or re-save the checkpoint."
        ) from error


# --- one feature ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureNormalization:
    """The map of one feature to the model's units, as LeRobot applies it.

    Current formulas (``legacy=False``), with ``denom = max - min`` replaced by ``eps`` only where
    it is 0 (QUANTILES / QUANTILE10 use q01/q99 and q10/q90 in the same way)::

        MIN_MAX   y = 2 (x - min) / denom - 1          x = (y + 1) / 2 * denom + min
        MEAN_STD  y = (x - mean) / (std + eps)         x = y * std + mean

    Legacy formulas (LeRobot <= 0.3; eps fixed at 1e-8)::

        MIN_MAX   y = (x - min) / (max - min + eps) * 2 - 1      x = (y + 1) / 2 * (max - min) + min
        MEAN_STD  y = (x - mean) / (std + eps)                   x = y * std + mean
    """

    mode: str
    stats: dict[str, Tensor]
    eps: float
    legacy: bool = False
    observed: tuple[Tensor, Tensor] | None = None
    """The training data's ``(min, max)`` where the stats hold them (whatever the mode): the
    range observations are checked against."""

    def normalize(self, x: Tensor) -> Tensor:
        if self.mode == "IDENTITY":
            return x
        if self.mode == "MEAN_STD":
            return (x - self.stats["mean"]) / (self.stats["std"] + self.eps)
        low, high = self._range()
        if self.legacy:
            return (x - low) / (high - low + self.eps) * 2 - 1
        return 2 * (x - low) / self._denominator(low, high) - 1

    def unnormalize(self, y: Tensor) -> Tensor:
        if self.mode == "IDENTITY":
            return y
        if self.mode == "MEAN_STD":
            return y * self.stats["std"] + self.stats["mean"]
        low, high = self._range()
        if self.legacy:
            return (y + 1) / 2 * (high - low) + low
        return (y + 1) / 2 * self._denominator(low, high) + low

    def normalized_range(self) -> tuple[Tensor, Tensor] | None:
        """The training data's range in normalized units: its recorded min and max mapped, else
        ``[-1, 1]`` where the mode maps the range there (MIN_MAX, the quantile modes); None
        when neither is known."""
        if self.observed is not None:
            low, high = (self.normalize(bound) for bound in self.observed)
            return torch.minimum(low, high), torch.maximum(low, high)
        if self.mode in ("IDENTITY", "MEAN_STD"):
            return None
        low = torch.full_like(self._range()[0], -1.0)
        return low, -low

    def to(self, device: torch.device | str) -> FeatureNormalization:
        observed = None if self.observed is None else tuple(t.to(device) for t in self.observed)
        return replace(
            self, stats={name: t.to(device) for name, t in self.stats.items()}, observed=observed
        )

    def _range(self) -> tuple[Tensor, Tensor]:
        low_name, high_name = MODE_STATS[self.mode]
        return self.stats[low_name], self.stats[high_name]

    def _denominator(self, low: Tensor, high: Tensor) -> Tensor:
        denom = high - low
        eps = torch.tensor(self.eps, dtype=denom.dtype, device=denom.device)
        return torch.where(denom == 0, eps, denom)


def feature_normalization(
    key: str,
    feature_type: str,
    norm_map: dict[str, str],
    shape: tuple[int, ...],
    stats: dict[str, Tensor],
    eps: float,
    source: Path,
    legacy: bool = False,
) -> FeatureNormalization:
    """Build and check one feature's normalization; ``source`` names the file in errors.

    ``shape`` is what the stats broadcast as: ``(D,)`` for a vector feature, ``(C, 1, 1)`` for
    an image. A stat with as many elements (``(D,)`` stored as ``(1, D)``, ``(C,)`` for
    ``(C, 1, 1)``) is reshaped to it."""
    mode = norm_map.get(feature_type, "IDENTITY")
    valid = LEGACY_MODES if legacy else tuple(MODE_STATS)
    if mode not in valid:
        raise LeRobotCheckpointError(
            f"{source}: normalization mode {mode!r} for feature type {feature_type!r} must be "
            f"one of {list(valid)}."
        )
    needed = {}
    for name in MODE_STATS[mode]:
        if name not in stats:
            raise LeRobotCheckpointError(
                f"{source} has no {name!r} stat for {key!r}, which {mode} normalization needs "
                f"(it has {sorted(stats)}); re-save the checkpoint with the dataset stats."
            )
        value = stats[name].to(torch.float32)
        if value.numel() != math.prod(shape):
            raise LeRobotCheckpointError(
                f"{source}: stat {key}.{name} has shape {tuple(value.shape)}, expected "
                f"{tuple(shape)} for this feature."
            )
        if not torch.isfinite(value).all():
            raise LeRobotCheckpointError(
                f"{source}: stat {key}.{name} holds NaN or Inf (LeRobot fills unset stats with "
                "+inf); the checkpoint was saved without dataset stats."
            )
        needed[name] = value.reshape(shape)
    return FeatureNormalization(
        mode=mode, stats=needed, eps=float(eps), legacy=legacy, observed=_observed(stats, shape)
    )


def _observed(stats: dict[str, Tensor], shape: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    """The feature's recorded ``(min, max)`` where both are present, finite and of its size."""
    bounds = [stats.get(name) for name in ("min", "max")]
    if any(
        bound is None or bound.numel() != math.prod(shape) or not torch.isfinite(bound).all()
        for bound in bounds
    ):
        return None
    low, high = (bound.to(torch.float32).reshape(shape) for bound in bounds)
    return low, high


def group_stats(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"observation.state.min": t}`` -> ``{"observation.state": {"min": t}}``."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for flat_key, tensor in flat.items():
        key, _, stat = flat_key.rpartition(".")
        grouped.setdefault(key, {})[stat] = tensor
    return grouped


# --- current layout: processor pipelines ----------------------------------------------------------


@dataclass(frozen=True)
class NormalizerStep:
    """A (un)normalizer step of a processor pipeline, with its stats read from ``state_file``."""

    features: dict[str, dict]
    norm_map: dict[str, str]
    eps: float
    observation_keys: list[str] | None  # normalize_observation_keys: None means all
    stats: dict[str, dict[str, Tensor]]
    state_path: Path
    rename_map: dict[str, str]  # the pipeline's rename_observations_processor map


def read_normalizer_step(directory: Path, file_name: str, registry_name: str) -> NormalizerStep:
    """The one ``registry_name`` step of the pipeline ``directory / file_name``."""
    path = directory / file_name
    steps = read_json(path).get("steps")
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise LeRobotCheckpointError(f"{path} has no 'steps' list; it is not a LeRobot pipeline.")
    names = [step.get("registry_name") for step in steps]
    handled = PASSIVE_STEPS | {registry_name}
    unknown = [name for name in names if name not in handled]
    if unknown:
        raise LeRobotCheckpointError(
            f"{path} has pipeline steps {unknown} that this loader does not implement; it "
            f"handles {sorted(handled)}."
        )
    if names.count(registry_name) != 1:
        raise LeRobotCheckpointError(
            f"{path} must have exactly one {registry_name!r} step. Got steps {names}."
        )
    step = steps[names.index(registry_name)]
    config = step.get("config")
    if not isinstance(config, dict) or not {"features", "norm_map"} <= set(config):
        raise LeRobotCheckpointError(
            f"{path}: the {registry_name!r} step needs a 'config' with 'features' and 'norm_map'."
        )
    features, norm_map, eps = config["features"], config["norm_map"], config.get("eps", 1e-8)
    if not isinstance(features, dict) or not all(
        isinstance(f, dict) and isinstance(f.get("type"), str) for f in features.values()
    ):
        raise LeRobotCheckpointError(
            f"{path}: the {registry_name!r} step's features must map keys to "
            "{'type': ..., 'shape': [...]}."
        )
    if not isinstance(norm_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in norm_map.items()
    ):
        raise LeRobotCheckpointError(
            f"{path}: the {registry_name!r} step's norm_map must map feature types to modes."
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise LeRobotCheckpointError(
            f"{path}: the {registry_name!r} step's eps must be a non-negative number. Got "
            f"{str(eps)[:40]!r}."
        )
    if not isinstance(step.get("state_file"), str):
        raise LeRobotCheckpointError(
            f"{path}: the {registry_name!r} step names no 'state_file' holding its stats."
        )
    state_path = _inside(directory, step["state_file"], path, registry_name)
    if state_path.exists() and not state_path.is_file():
        raise LeRobotCheckpointError(
            f"{state_path} is not a regular file (a directory, FIFO or device), but "
            f"{path.name} names it as the {registry_name!r} stats file; replace it with the "
            "safetensors file from the original checkpoint."
        )
    if not state_path.is_file():
        raise LeRobotCheckpointError(
            f"{state_path} does not exist, but {path.name} names it as the {registry_name!r} "
            "stats file; copy it from the original checkpoint."
        )
    rename_map = {}
    for other in steps:
        if other.get("registry_name") == "rename_observations_processor":
            rename_map.update((other.get("config") or {}).get("rename_map") or {})
    return NormalizerStep(
        features=features,
        norm_map=norm_map,
        eps=float(eps),
        observation_keys=config.get("normalize_observation_keys"),
        stats=group_stats(read_safetensors(state_path)),
        state_path=state_path,
        rename_map=rename_map,
    )


def _inside(directory: Path, name: str, path: Path, registry_name: str) -> Path:
    """``directory / name``, refused (the same way whether or not it exists) unless it names a
    file inside the checkpoint directory: no absolute paths or ``..`` leading out, and links only
    to files of the checkpoint (:func:`checkpoint_roots`: the directory, and the blobs of the
    Hugging Face cache repo that a snapshot directory's links point to)."""
    candidate = directory / name
    lexical = os.path.normpath(name)
    resolved = candidate.resolve()
    if (
        Path(name).is_absolute()
        or lexical == os.curdir
        or lexical.split(os.sep)[0] == os.pardir
        or not any(
            resolved != root and resolved.is_relative_to(root)
            for root in checkpoint_roots(directory)
        )
    ):
        raise LeRobotCheckpointError(
            f"{path}: the {registry_name!r} step's state_file {name[:80]!r} is not a file inside "
            "the checkpoint directory; it must name one of the checkpoint's own files."
        )
    return candidate


def checkpoint_roots(directory: Path) -> tuple[Path, ...]:
    """The folders a checkpoint's files may resolve into: the directory itself and, when it is a
    snapshot of the Hugging Face cache (``models--org--name/snapshots/<revision>/``, whose files
    are links to ``../../blobs/<hash>``), that repo's ``blobs/`` folder."""
    root = directory.resolve()
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        return root, blobs.resolve()
    return (root,)


def processor_normalization(
    directory: Path, input_shapes: dict[str, tuple[int, ...]], action_size: int
) -> tuple[dict[str, FeatureNormalization], FeatureNormalization, dict[str, str]]:
    """Input normalizations (by key), the action's and the observation rename map, from the
    normalizer step of ``policy_preprocessor.json`` and the unnormalizer step of
    ``policy_postprocessor.json``. ``input_shapes`` maps each model input to the shape of its
    stats (see :func:`feature_normalization`).

    As in LeRobot, an input is normalized only if the normalizer step lists it (and
    ``normalize_observation_keys``, when set, includes it); the action always goes through the
    unnormalizer with the ACTION mode.
    """
    pre = read_normalizer_step(directory, PREPROCESSOR_FILE, "normalizer_processor")
    inputs = {}
    for key, feature in pre.features.items():
        if key not in input_shapes or (
            pre.observation_keys is not None and key not in pre.observation_keys
        ):
            continue
        inputs[key] = feature_normalization(
            key,
            feature.get("type"),
            pre.norm_map,
            input_shapes[key],
            pre.stats.get(key, {}),
            pre.eps,
            pre.state_path,
        )
    post = read_normalizer_step(directory, POSTPROCESSOR_FILE, "unnormalizer_processor")
    action = feature_normalization(
        "action",
        "ACTION",
        post.norm_map,
        (action_size,),
        post.stats.get("action", {}),
        post.eps,
        post.state_path,
    )
    return inputs, action, pre.rename_map


# --- legacy layout: buffers inside model.safetensors ----------------------------------------------


def split_legacy_buffers(
    state_dict: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(network tensors, legacy normalization buffers)`` of a model state dict."""
    network = {k: v for k, v in state_dict.items() if not k.startswith(LEGACY_PREFIXES)}
    buffers = {k: v for k, v in state_dict.items() if k.startswith(LEGACY_PREFIXES)}
    return network, buffers


def legacy_normalization(
    buffers: dict[str, Tensor],
    input_features: dict[str, dict],
    input_shapes: dict[str, tuple[int, ...]],
    action_size: int,
    norm_map: dict[str, str],
    source: Path,
) -> tuple[dict[str, FeatureNormalization], FeatureNormalization]:
    """Input and action normalizations from LeRobot <= 0.3 buffers.

    ``buffer_<name>`` is mapped back to a feature by comparing ``name`` with each config feature
    key with ``.`` replaced by ``_`` (LeRobot's own migration replaces every ``_`` by ``.``, which
    breaks keys such as ``observation.environment_state``).
    """
    by_buffer_name = {}
    for key in input_features:
        name = key.replace(".", "_")
        if name in by_buffer_name:
            raise LeRobotCheckpointError(
                f"{source}: features {by_buffer_name[name]!r} and {key!r} share the legacy buffer "
                f"name 'buffer_{name}', so their stats cannot be told apart."
            )
        by_buffer_name[name] = key
    module_stats: dict[str, dict[str, dict[str, Tensor]]] = {p[:-1]: {} for p in LEGACY_PREFIXES}
    for flat_key, tensor in buffers.items():
        module, _, rest = flat_key.partition(".")
        buffer, _, stat = rest.rpartition(".")
        if not buffer.startswith("buffer_") or not stat:
            raise LeRobotCheckpointError(
                f"{source}: unexpected legacy normalization key {flat_key!r}; expected "
                f"'{module}.buffer_<feature>.<stat>'."
            )
        module_stats[module].setdefault(buffer[len("buffer_") :], {})[stat] = tensor

    unknown = sorted(set(module_stats["normalize_inputs"]) - set(by_buffer_name))
    if unknown:
        raise LeRobotCheckpointError(
            f"{source}: normalize_inputs buffers {['buffer_' + n for n in unknown]} match no "
            f"input feature of config.json ({sorted(input_features)})."
        )
    inputs = {}
    for name, key in by_buffer_name.items():
        if key not in input_shapes:
            continue
        inputs[key] = feature_normalization(
            key,
            input_features[key]["type"],
            norm_map,
            input_shapes[key],
            module_stats["normalize_inputs"].get(name, {}),
            LEGACY_EPS,
            source,
            legacy=True,
        )
    action = feature_normalization(
        "action",
        "ACTION",
        norm_map,
        (action_size,),
        module_stats["unnormalize_outputs"].get("action", {}),
        LEGACY_EPS,
        source,
        legacy=True,
    )
    return inputs, action
