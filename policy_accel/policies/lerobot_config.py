"""LeRobot's ``DiffusionConfig`` (``config.json``, draccus-encoded) read into typed settings.

Only the fields inference needs are kept; the optimizer presets, ``device`` and the image
augmentation fields are ignored. Validation errors follow LeRobot's style
("`x` must be one of [...]. Got y.") and name the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policy_accel.policies.lerobot_normalization import (
    DEFAULT_NORMALIZATION_MAPPING,
    LeRobotCheckpointError,
    read_json,
)

STATE_KEY = "observation.state"
SCHEDULER_TYPES = ("DDPM", "DDIM")
PREDICTION_TYPES = ("epsilon", "sample")
POSITIVE_INTS = (
    "n_obs_steps", "horizon", "n_action_steps", "kernel_size", "n_groups",
    "diffusion_step_embed_dim", "num_train_timesteps",
)  # fmt: skip
PLAIN_FIELDS = POSITIVE_INTS + (
    "use_film_scale_modulation", "noise_scheduler_type", "beta_schedule", "beta_start",
    "beta_end", "prediction_type", "clip_sample",
)  # fmt: skip
REQUIRED_FIELDS = PLAIN_FIELDS + ("input_features", "output_features", "down_dims")


@dataclass(frozen=True)
class DiffusionSettings:
    """The fields of LeRobot's ``DiffusionConfig`` that inference needs, validated.

    ``condition_sizes`` maps each observation key the UNet is conditioned on to its size, in
    global-condition order (state first, then the environment state); ``num_inference_steps``
    is None when the checkpoint samples with all ``num_train_timesteps``.
    """

    n_obs_steps: int
    horizon: int
    n_action_steps: int
    kernel_size: int
    n_groups: int
    diffusion_step_embed_dim: int
    num_train_timesteps: int
    use_film_scale_modulation: bool
    noise_scheduler_type: str
    beta_schedule: str
    beta_start: float
    beta_end: float
    prediction_type: str
    clip_sample: bool
    down_dims: tuple[int, ...]
    num_inference_steps: int | None
    clip_sample_range: float
    input_features: dict[str, dict]
    condition_sizes: dict[str, int]
    action_dim: int
    normalization_mapping: dict[str, str]


def read_config(path: Path) -> DiffusionSettings:
    """Parse and validate a LeRobot DiffusionPolicy ``config.json``.

    Raises:
        LeRobotCheckpointError: the file is missing, not JSON, not a diffusion config, or has
            a field of the wrong kind.
        NotImplementedError: the policy has image inputs.
    """
    raw = read_json(path)
    if raw.get("type") != "diffusion":
        raise LeRobotCheckpointError(
            f"{path}: `type` must be 'diffusion' (LeRobot's DiffusionPolicy). Got "
            f"{raw.get('type')!r}; other LeRobot policies are not supported."
        )
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise LeRobotCheckpointError(f"{path} is missing the DiffusionConfig fields {missing}.")
    _check_values(path, raw)
    settings = DiffusionSettings(
        **{name: raw[name] for name in PLAIN_FIELDS},
        down_dims=tuple(raw["down_dims"]),
        num_inference_steps=raw.get("num_inference_steps"),
        clip_sample_range=raw.get("clip_sample_range", 1.0),
        input_features=raw["input_features"],
        condition_sizes=_condition_sizes(path, raw["input_features"]),
        action_dim=_action_dim(path, raw["output_features"]),
        normalization_mapping=raw.get("normalization_mapping") or DEFAULT_NORMALIZATION_MAPPING,
    )
    _check_timeline(path, settings)
    return settings


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_values(path: Path, raw: dict) -> None:
    for name, valid in (
        ("noise_scheduler_type", SCHEDULER_TYPES),
        ("prediction_type", PREDICTION_TYPES),
    ):
        if raw[name] not in valid:
            raise LeRobotCheckpointError(
                f"{path}: `{name}` must be one of {list(valid)}. Got {raw[name]!r}."
            )
    for name in POSITIVE_INTS:
        if not _is_positive_int(raw[name]):
            raise LeRobotCheckpointError(
                f"{path}: `{name}` must be a positive int. Got {raw[name]!r}."
            )
    down_dims = raw["down_dims"]
    if (
        not isinstance(down_dims, list)
        or not down_dims
        or not all(map(_is_positive_int, down_dims))
    ):
        raise LeRobotCheckpointError(
            f"{path}: `down_dims` must be a non-empty list of positive ints. Got {down_dims!r}."
        )
    steps = raw.get("num_inference_steps")
    if steps is not None and not _is_positive_int(steps):
        raise LeRobotCheckpointError(
            f"{path}: `num_inference_steps` must be null or a positive int. Got {steps!r}."
        )
    for name in ("input_features", "output_features"):
        features = raw[name]
        if not isinstance(features, dict) or not all(
            isinstance(feature, dict) for feature in features.values()
        ):
            raise LeRobotCheckpointError(
                f"{path}: `{name}` must map keys to {{'type': ..., 'shape': [...]}}. "
                f"Got {features!r}."
            )


def _condition_sizes(path: Path, features: dict[str, dict]) -> dict[str, int]:
    """The state and environment-state features the UNet is conditioned on, with their sizes."""
    visual = [key for key, feature in features.items() if feature.get("type") == "VISUAL"]
    if visual:
        raise NotImplementedError(
            f"{path}: image input features {visual} need LeRobot's ResNet keypoint encoder, "
            "which policy_accel does not implement yet; only state and environment-state "
            "policies load."
        )
    if features.get(STATE_KEY, {}).get("type") != "STATE":
        raise LeRobotCheckpointError(
            f"{path}: `input_features` must hold {STATE_KEY!r} of type STATE (LeRobot's "
            f"DiffusionPolicy always conditions on it). Got {sorted(features)}."
        )
    env = [key for key, feature in features.items() if feature.get("type") == "ENV"]
    if len(env) != 1:
        raise LeRobotCheckpointError(
            f"{path}: a DiffusionPolicy without images needs exactly one ENV input feature (the "
            f"environment state). Got {env}."
        )
    return {key: _vector_size(path, key, features[key]) for key in (STATE_KEY, env[0])}


def _action_dim(path: Path, features: dict[str, dict]) -> int:
    if "action" not in features:
        raise LeRobotCheckpointError(
            f"{path}: `output_features` must hold 'action'. Got {sorted(features)}."
        )
    return _vector_size(path, "action", features["action"])


def _vector_size(path: Path, key: str, feature: dict) -> int:
    shape = feature.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or not _is_positive_int(shape[0]):
        raise LeRobotCheckpointError(
            f"{path}: feature {key!r} must have a shape [D] with D >= 1. Got {shape!r}."
        )
    return shape[0]


def _check_timeline(path: Path, settings: DiffusionSettings) -> None:
    last_start = settings.horizon - settings.n_obs_steps + 1
    if settings.n_action_steps > last_start:
        raise LeRobotCheckpointError(
            f"{path}: `n_action_steps` must be at most horizon - n_obs_steps + 1 = "
            f"{last_start}. Got {settings.n_action_steps}."
        )
    halvings = len(settings.down_dims) - 1
    if settings.horizon % 2**halvings:
        raise LeRobotCheckpointError(
            f"{path}: `horizon` must be a multiple of {2**halvings} (the UNet halves it "
            f"{halvings} times). Got {settings.horizon}."
        )
