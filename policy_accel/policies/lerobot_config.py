"""LeRobot's ``DiffusionConfig`` (``config.json``, draccus-encoded) read into typed settings.

Only the fields inference needs are kept; the optimizer presets, ``device`` and the training-time
image augmentation (``crop_is_random``: eval always center-crops) are ignored. Validation errors
follow LeRobot's style ("`x` must be one of [...]. Got y.") and name the file.

Image inputs (cameras) are the ``VISUAL`` input features in the order ``input_features`` lists
them: LeRobot's ``config.image_features``, which fixes the camera order of the global condition
and the indices of the ``nn.ModuleList`` that ``use_separate_rgb_encoder_per_camera`` builds.
Their encoder fields are read into :class:`RgbEncoderSettings`, with
``DiffusionConfig.__post_init__``'s ``crop_ratio`` rule applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from policy_accel.policies.lerobot_normalization import (
    DEFAULT_NORMALIZATION_MAPPING,
    LeRobotCheckpointError,
    read_json,
)
from policy_accel.policies.validation import LIMITS

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
BOOL_FIELDS = ("use_film_scale_modulation", "clip_sample")
# open ranges of the scheduler's floats: betas are per-step noise variances, clip_sample_range the
# bound of the clean-sample prediction in normalized units (LeRobot: 1e-4, 0.02 and 1.0)
FLOAT_RANGES = {
    "beta_start": (0.0, 1.0),
    "beta_end": (0.0, 1.0),
    "clip_sample_range": (0.0, float("inf")),
}
# which bound of validation.LIMITS each integer field has (others: "width")
INT_LIMITS = {
    "n_obs_steps": "horizon",
    "horizon": "horizon",
    "n_action_steps": "horizon",
    "num_train_timesteps": "train_timesteps",
}
# The torchvision ResNets policy_accel rebuilds (BasicBlock ones; see networks/resnet.py).
VISION_BACKBONES = ("resnet18", "resnet34")


@dataclass(frozen=True)
class RgbEncoderSettings:
    """The ``DiffusionConfig`` fields of LeRobot's ``DiffusionRgbEncoder``, validated.

    ``crop_shape`` is the effective eval center crop: with ``resize_shape`` set it is
    ``int(resize_shape * crop_ratio)`` when ``crop_ratio < 1`` and None otherwise, as
    ``DiffusionConfig.__post_init__`` recomputes it. ``pretrained_backbone_weights`` is only
    recorded: the trained backbone weights are in ``model.safetensors``, so nothing is downloaded.
    """

    vision_backbone: str
    use_group_norm: bool
    num_keypoints: int
    crop_shape: tuple[int, int] | None
    resize_shape: tuple[int, int] | None
    separate_encoder_per_camera: bool
    pretrained_backbone_weights: str | None

    @property
    def feature_dim(self) -> int:
        """Features per camera and observation step (``2 * spatial_softmax_num_keypoints``)."""
        return 2 * self.num_keypoints


@dataclass(frozen=True)
class DiffusionSettings:
    """The fields of LeRobot's ``DiffusionConfig`` that inference needs, validated.

    ``condition_sizes`` maps each vector observation key the UNet is conditioned on to its size:
    the state first, then the environment state when there is one. ``image_shapes`` maps each
    camera (``VISUAL`` feature) to its ``(C, H, W)``, in config order; ``rgb_encoder`` is None
    without cameras. Per observation step the global condition is
    ``cat([state, features of each camera, environment_state])``. ``num_inference_steps`` is
    None when the checkpoint samples with all ``num_train_timesteps``.
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
    image_shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    rgb_encoder: RgbEncoderSettings | None = None

    @property
    def cond_dim_per_step(self) -> int:
        """Global-condition width of one observation step: state + cameras + environment."""
        image_dim = 0 if self.rgb_encoder is None else self.rgb_encoder.feature_dim
        return sum(self.condition_sizes.values()) + len(self.image_shapes) * image_dim

    @property
    def input_stat_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each input's normalization stats broadcast as: ``(D,)`` for vectors and
        ``(C, 1, 1)`` for images."""
        shapes: dict[str, tuple[int, ...]] = {k: (d,) for k, d in self.condition_sizes.items()}
        shapes.update({key: (shape[0], 1, 1) for key, shape in self.image_shapes.items()})
        return shapes


def read_config(path: Path) -> DiffusionSettings:
    """Parse and validate a LeRobot DiffusionPolicy ``config.json``.

    Raises:
        LeRobotCheckpointError: the file is missing, not JSON, not a diffusion config, or has
            a field of the wrong kind.
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
    image_shapes = _image_shapes(path, raw["input_features"])
    settings = DiffusionSettings(
        **{name: raw[name] for name in PLAIN_FIELDS},
        down_dims=tuple(raw["down_dims"]),
        num_inference_steps=raw.get("num_inference_steps"),
        clip_sample_range=raw.get("clip_sample_range", 1.0),
        input_features=raw["input_features"],
        condition_sizes=_condition_sizes(path, raw["input_features"], bool(image_shapes)),
        action_dim=_action_dim(path, raw["output_features"]),
        normalization_mapping=raw.get("normalization_mapping") or DEFAULT_NORMALIZATION_MAPPING,
        image_shapes=image_shapes,
        rgb_encoder=_rgb_encoder(path, raw, image_shapes) if image_shapes else None,
    )
    _check_timeline(path, settings)
    return settings


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= LIMITS["width"]


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
        limit = LIMITS[INT_LIMITS.get(name, "width")]
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise LeRobotCheckpointError(
                f"{path}: `{name}` must be a positive int of at most {limit}. Got "
                f"{str(raw[name])[:40]!r}."
            )
    down_dims = raw["down_dims"]
    if (
        not isinstance(down_dims, list)
        or not 1 <= len(down_dims) <= LIMITS["layers"]
        or not all(_is_positive_int(d) and d <= LIMITS["width"] for d in down_dims)
    ):
        raise LeRobotCheckpointError(
            f"{path}: `down_dims` must be a non-empty list of positive ints of at most "
            f"{LIMITS['width']}. Got {str(down_dims)[:60]!r}."
        )
    _check_scheduler_numbers(path, raw)
    steps = raw.get("num_inference_steps")
    if steps is not None and (not _is_positive_int(steps) or steps > raw["num_train_timesteps"]):
        raise LeRobotCheckpointError(
            f"{path}: `num_inference_steps` must be null or a positive int of at most "
            f"num_train_timesteps={raw['num_train_timesteps']}. Got {str(steps)[:40]!r}."
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


def _check_scheduler_numbers(path: Path, raw: dict) -> None:
    """The scheduler's floats in their ranges and its flags as bools, so that a bad value is
    refused here, naming the field, rather than in every plan. NaN fails every comparison."""
    for name in BOOL_FIELDS:
        if not isinstance(raw[name], bool):
            raise LeRobotCheckpointError(
                f"{path}: `{name}` must be true or false. Got {str(raw[name])[:40]!r}."
            )
    for name, (low, high) in FLOAT_RANGES.items():
        value = raw.get(name, 1.0) if name == "clip_sample_range" else raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            raise LeRobotCheckpointError(
                f"{path}: `{name}` must be a number in ({low}, {high}). Got {str(value)[:40]!r}."
            )


def _condition_sizes(path: Path, features: dict[str, dict], has_images: bool) -> dict[str, int]:
    """The state and (optional with cameras) environment-state features, with their sizes.

    As LeRobot's ``DiffusionConfig.validate_features``: the state is required, and so is at
    least one camera or the environment state.
    """
    if features.get(STATE_KEY, {}).get("type") != "STATE":
        raise LeRobotCheckpointError(
            f"{path}: `input_features` must hold {STATE_KEY!r} of type STATE (LeRobot's "
            f"DiffusionPolicy always conditions on it). Got {sorted(features)}."
        )
    env = [key for key, feature in features.items() if feature.get("type") == "ENV"]
    if not has_images and len(env) != 1:
        raise LeRobotCheckpointError(
            f"{path}: a DiffusionPolicy without images needs exactly one ENV input feature (the "
            f"environment state). Got {env}."
        )
    if len(env) > 1:
        raise LeRobotCheckpointError(
            f"{path}: a DiffusionPolicy conditions on at most one ENV input feature (the "
            f"environment state). Got {env}."
        )
    return {key: _vector_size(path, key, features[key]) for key in (STATE_KEY, *env)}


def _image_shapes(path: Path, features: dict[str, dict]) -> dict[str, tuple[int, int, int]]:
    """``(C, H, W)`` of each ``VISUAL`` input feature, in config order (LeRobot's camera order).
    LeRobot requires 3-channel images that all share one shape."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for key, feature in features.items():
        if feature.get("type") != "VISUAL":
            continue
        shape = feature.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(map(_is_positive_int, shape))
            or shape[0] != 3
        ):
            raise LeRobotCheckpointError(
                f"{path}: image feature {key!r} must have a shape [3, H, W] (channels first; "
                f"LeRobot's ResNet backbone takes RGB). Got {shape!r}."
            )
        shapes[key] = (shape[0], shape[1], shape[2])
    if len(set(shapes.values())) > 1:
        raise LeRobotCheckpointError(
            f"{path}: all image features must have the same shape, as LeRobot requires. Got "
            f"{ {key: list(shape) for key, shape in shapes.items()} }."
        )
    return shapes


def _pair(path: Path, raw: dict, name: str) -> tuple[int, int] | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(map(_is_positive_int, value)):
        raise LeRobotCheckpointError(
            f"{path}: `{name}` must be null or a pair of positive ints [H, W]. Got {value!r}."
        )
    return value[0], value[1]


def _rgb_encoder(
    path: Path, raw: dict, image_shapes: dict[str, tuple[int, int, int]]
) -> RgbEncoderSettings:
    """The image-encoder fields (LeRobot's defaults where a field is absent)."""
    backbone = raw.get("vision_backbone", "resnet18")
    if backbone not in VISION_BACKBONES:
        raise LeRobotCheckpointError(
            f"{path}: `vision_backbone` must be one of {list(VISION_BACKBONES)} (the ResNets "
            f"policy_accel rebuilds). Got {backbone!r}."
        )
    flags = {}
    for name, default in (("use_group_norm", False), ("use_separate_rgb_encoder_per_camera", True)):
        flags[name] = raw.get(name, default)
        if not isinstance(flags[name], bool):
            raise LeRobotCheckpointError(f"{path}: `{name}` must be a bool. Got {flags[name]!r}.")
    keypoints = raw.get("spatial_softmax_num_keypoints", 32)
    if not _is_positive_int(keypoints):
        raise LeRobotCheckpointError(
            f"{path}: `spatial_softmax_num_keypoints` must be a positive int. Got {keypoints!r}."
        )
    # Only recorded: LeRobot passes it to torchvision to initialize the backbone before training,
    # but the trained backbone is in model.safetensors, so no weights are ever downloaded here.
    pretrained = raw.get("pretrained_backbone_weights")
    if flags["use_group_norm"] and pretrained:
        raise LeRobotCheckpointError(
            f"{path}: `use_group_norm` with `pretrained_backbone_weights` {pretrained!r} is a "
            "combination LeRobot's DiffusionRgbEncoder refuses to build (\"You can't replace "
            'BatchNorm in a pretrained model without ruining the weights!").'
        )
    resize_shape = _pair(path, raw, "resize_shape")
    crop_shape = _pair(path, raw, "crop_shape")
    if resize_shape is not None:  # DiffusionConfig.__post_init__ recomputes crop_shape
        ratio = raw.get("crop_ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise LeRobotCheckpointError(f"{path}: `crop_ratio` must be in (0, 1]. Got {ratio!r}.")
        crop_shape = None
        if ratio < 1.0:
            crop_shape = (int(resize_shape[0] * ratio), int(resize_shape[1] * ratio))
            if min(crop_shape) <= 0:
                raise LeRobotCheckpointError(
                    f"{path}: `crop_shape` must have positive dimensions. Got {crop_shape} "
                    f"(resize_shape {list(resize_shape)} * crop_ratio {ratio})."
                )
    size = resize_shape or next(iter(image_shapes.values()))[1:]
    if crop_shape is not None and (crop_shape[0] > size[0] or crop_shape[1] > size[1]):
        raise LeRobotCheckpointError(
            f"{path}: `crop_shape` {list(crop_shape)} does not fit inside the "
            f"{list(size)} images{' (after resize_shape)' if resize_shape else ''}."
        )
    return RgbEncoderSettings(
        vision_backbone=backbone,
        use_group_norm=flags["use_group_norm"],
        num_keypoints=keypoints,
        crop_shape=crop_shape,
        resize_shape=resize_shape,
        separate_encoder_per_camera=flags["use_separate_rgb_encoder_per_camera"],
        pretrained_backbone_weights=pretrained,
    )


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
