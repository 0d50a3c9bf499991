"""DiffusionPolicy (real-stanford) image policies, rebuilt from ``cfg.policy``.

Supports ``DiffusionUnetHybridImagePolicy`` (robomimic ResNet18 + spatial-softmax encoder, see
:mod:`~policy_accel.policies.networks.robomimic_encoder`) and ``DiffusionUnetImagePolicy``
(``MultiImageObsEncoder`` with a torchvision ResNet, see
:mod:`~policy_accel.policies.networks.multi_image_encoder`), both on ``ConditionalUnet1D``, with
global conditioning (``obs_as_global_cond``) or inpainting. Observations follow upstream's
``predict_action``: one entry per ``shape_meta['obs']`` key, ``[B, >=n_obs_steps, *shape]``;
``rgb`` keys are float images in ``[0, 1]`` ``(C, H, W)``, ``low_dim`` keys are in environment
units. Every key is normalized by its ``LinearNormalizer`` field (images with DiffusionPolicy's
``[0, 1] -> [-1, 1]`` range normalizer), the first ``n_obs_steps`` steps are encoded as one batch
of ``B * n_obs_steps`` and::

    global:     global_cond = features.reshape(B, n_obs_steps * Do); trajectory [B, horizon, Da]
    inpainting: trajectory [B, horizon, Da + Do] with features written into [:, :To, Da:]

Actions start at ``n_obs_steps - 1``, as upstream's image policies slice them.

There are no golden fixtures for image policies: the networks are checked against key sets and
semantics derived from the upstream source, not against outputs of the original code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from policy_accel.policies.base import Conditioning, ObservationError, Policy
from policy_accel.policies.diffusion_policy import (
    build_scheduler,
    check_model_sizes,
    class_name,
    inference_steps,
)
from policy_accel.policies.errors import CheckpointContentError
from policy_accel.policies.networks.multi_image_encoder import MultiImageObsEncoder
from policy_accel.policies.networks.resnet import RESNET_LAYERS
from policy_accel.policies.networks.robomimic_encoder import RobomimicObsEncoder
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.policies.normalizer import LinearNormalizer
from policy_accel.policies.validation import (
    LIMITS,
    check_action_window,
    load_weights,
    naming_the_file,
    positive_int,
)

HYBRID_POLICY = "DiffusionUnetHybridImagePolicy"
IMAGE_POLICY = "DiffusionUnetImagePolicy"
UNET_DEFAULTS = dict(
    diffusion_step_embed_dim=256, down_dims=(256, 512, 1024), kernel_size=5, n_groups=8,
    cond_predict_scale=True,
)  # fmt: skip
COMMON_KEYS = {
    "_target_", "shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps",
    "num_inference_steps", "obs_as_global_cond", *UNET_DEFAULTS,
}  # fmt: skip
CONFIG_KEYS = {
    HYBRID_POLICY: COMMON_KEYS | {"crop_shape", "obs_encoder_group_norm", "eval_fixed_crop"},
    IMAGE_POLICY: COMMON_KEYS | {"obs_encoder"},
}
ENCODER_KEYS = {
    "_target_", "shape_meta", "rgb_model", "resize_shape", "crop_shape", "random_crop",
    "use_group_norm", "share_rgb_model", "imagenet_norm",
}  # fmt: skip


def parse_shape_meta(shape_meta: Any, where: str) -> tuple[dict, int | None]:
    """``({key: (shape, type)}, action_dim)`` from a ``shape_meta`` dict (``type`` defaults to
    ``low_dim`` as upstream; only ``rgb`` and ``low_dim`` exist)."""
    if not isinstance(shape_meta, dict) or not isinstance(shape_meta.get("obs"), dict):
        raise CheckpointContentError(
            f"{where} must be a dict with an 'obs' dict (resolved, not an interpolation). "
            f"Got {shape_meta!r:.200}."
        )
    obs_meta = {}
    for key, attr in shape_meta["obs"].items():
        kind = attr.get("type", "low_dim")
        if kind not in ("rgb", "low_dim"):
            raise CheckpointContentError(
                f"{where}.obs.{key} has type {kind!r}; DiffusionPolicy's image policies support "
                "'rgb' and 'low_dim'."
            )
        shape = attr["shape"]
        if (
            not isinstance(shape, (list, tuple))
            or not 1 <= len(shape) <= 4
            or not all(type(size) is int and 1 <= size <= LIMITS["width"] for size in shape)
        ):
            raise CheckpointContentError(
                f"{where}.obs.{key}.shape must be 1 to 4 ints between 1 and {LIMITS['width']}. "
                f"Got {str(shape)[:60]}."
            )
        obs_meta[key] = (tuple(shape), kind)
    action = shape_meta.get("action")
    action_dim = None
    if action is not None:
        if len(action["shape"]) != 1:
            raise CheckpointContentError(
                f"{where}.action.shape is {list(action['shape'])}; expected one dimension."
            )
        action_dim = int(action["shape"][0])
    return obs_meta, action_dim


def build_obs_encoder(kind: str, policy_cfg: dict, source: str) -> tuple[nn.Module, dict]:
    """The policy's observation encoder and the ``{key: (shape, type)}`` it reads."""
    if kind == HYBRID_POLICY:
        obs_meta, _ = parse_shape_meta(policy_cfg["shape_meta"], "cfg.policy.shape_meta")
        crop_shape = policy_cfg.get("crop_shape", (76, 76))
        group_norm = bool(policy_cfg.get("obs_encoder_group_norm", False))
        return RobomimicObsEncoder(obs_meta, crop_shape, group_norm), obs_meta
    spec = policy_cfg.get("obs_encoder")
    if class_name(spec, "cfg.policy.obs_encoder") != "MultiImageObsEncoder":
        raise CheckpointContentError(
            f"{source}: cfg.policy.obs_encoder is {spec.get('_target_')}; only "
            "MultiImageObsEncoder is supported."
        )
    unknown = sorted(set(spec) - ENCODER_KEYS)
    if unknown:
        raise CheckpointContentError(
            f"{source}: cfg.policy.obs_encoder has options {unknown} that are not supported; "
            f"known options: {sorted(ENCODER_KEYS)}."
        )
    model = spec.get("rgb_model")
    if class_name(model, "cfg.policy.obs_encoder.rgb_model") != "get_resnet":
        raise CheckpointContentError(
            f"{source}: cfg.policy.obs_encoder.rgb_model is {model.get('_target_')}; only "
            "diffusion_policy.model.vision.model_getter.get_resnet is supported."
        )
    backbone = model.get("name", "resnet18")
    if backbone not in RESNET_LAYERS:
        raise CheckpointContentError(
            f"{source}: rgb_model name {backbone!r} is not supported; expected one of "
            f"{sorted(RESNET_LAYERS)}."
        )
    meta = spec.get("shape_meta", policy_cfg.get("shape_meta"))
    obs_meta, _ = parse_shape_meta(meta, "cfg.policy.obs_encoder.shape_meta")
    encoder = MultiImageObsEncoder(
        obs_meta,
        backbone=backbone,
        resize_shape=spec.get("resize_shape"),
        crop_shape=spec.get("crop_shape"),
        random_crop=bool(spec.get("random_crop", True)),
        use_group_norm=bool(spec.get("use_group_norm", False)),
        share_rgb_model=bool(spec.get("share_rgb_model", False)),
        imagenet_norm=bool(spec.get("imagenet_norm", False)),
    )
    return encoder, obs_meta


class _ImageModules(nn.Module):
    """The parameter-holding part of an upstream image policy: ``obs_encoder.*``, ``model.*``,
    ``normalizer.*``."""

    def __init__(self, obs_encoder: nn.Module, model: nn.Module, normalizer: LinearNormalizer):
        super().__init__()
        self.obs_encoder = obs_encoder
        self.model = model
        self.normalizer = normalizer


class DiffusionPolicyImage(Policy):
    """A DiffusionPolicy image policy (hybrid robomimic encoder or MultiImageObsEncoder)."""

    def __init__(self, policy_cfg: dict, state_dict: dict[str, Tensor], source: str, device="cpu"):
        self.kind = class_name(policy_cfg, "cfg.policy")
        if self.kind not in CONFIG_KEYS:
            raise CheckpointContentError(
                f"{source}: policy class {self.kind} is not an image policy supported here; "
                f"expected one of {sorted(CONFIG_KEYS)}."
            )
        unknown = sorted(set(policy_cfg) - CONFIG_KEYS[self.kind])
        if unknown:
            raise CheckpointContentError(
                f"{source}: cfg.policy has keys {unknown}, which {self.kind} passes to "
                "scheduler.step; extra step options are not supported. Remove them from the "
                "config or load a checkpoint without them."
            )
        self.cfg = policy_cfg
        self.source = source
        self.device = torch.device(device)
        with naming_the_file(source):
            modules = self._build(policy_cfg, state_dict, source)
        self.modules = modules.to(self.device).eval()
        self.inpainting = not self.obs_as_global_cond

    def _build(self, cfg: dict, state_dict: dict[str, Tensor], source: str) -> nn.Module:
        """Validate ``cfg.policy``, then build the encoder, UNet and normalizer and load them
        (checked on the meta device first)."""
        self.horizon = positive_int(cfg["horizon"], "cfg.policy.horizon", source, "horizon")
        self.n_obs_steps = positive_int(
            cfg["n_obs_steps"], "cfg.policy.n_obs_steps", source, "horizon"
        )
        self.n_action_steps = positive_int(
            cfg["n_action_steps"], "cfg.policy.n_action_steps", source, "horizon"
        )
        check_action_window(
            source, self.horizon, self.n_obs_steps - 1, self.n_action_steps,
            "horizon - n_obs_steps + 1",
        )  # fmt: skip
        _, action_dim = parse_shape_meta(cfg.get("shape_meta"), "cfg.policy.shape_meta")
        if action_dim is None:
            raise CheckpointContentError(f"{source}: cfg.policy.shape_meta has no 'action'.")
        self.action_dim = positive_int(action_dim, "cfg.policy.shape_meta.action", source)
        self.obs_as_global_cond = bool(cfg.get("obs_as_global_cond", True))
        self.scheduler = build_scheduler(cfg["noise_scheduler"], source)
        self.num_inference_steps = inference_steps(cfg, self.scheduler, source)
        unet_cfg = {name: cfg.get(name, default) for name, default in UNET_DEFAULTS.items()}
        check_model_sizes(unet_cfg, source)
        unet_cfg["down_dims"] = tuple(unet_cfg["down_dims"])

        def encoder() -> nn.Module:
            try:
                return build_obs_encoder(self.kind, cfg, source)[0]
            except ValueError as error:
                if isinstance(error, CheckpointContentError):
                    raise
                raise CheckpointContentError(f"{source}: {error}") from error

        with torch.device("meta"):
            probe = encoder()
        self.obs_meta = parse_shape_meta(cfg["shape_meta"], "cfg.policy.shape_meta")[0]
        self.obs_feature_dim = probe.output_dim
        if self.obs_as_global_cond:
            unet_args = (self.action_dim,)
            unet_cfg["global_cond_dim"] = self.obs_feature_dim * self.n_obs_steps
        else:
            unet_args = (self.action_dim + self.obs_feature_dim,)
        fields = self._normalizer_fields(state_dict)
        return load_weights(
            lambda: {
                "": _ImageModules(
                    encoder(), ConditionalUnet1D(*unet_args, **unet_cfg), LinearNormalizer(fields)
                )
            },
            state_dict,
            source,
        )[""]

    def _normalizer_fields(self, state_dict: dict[str, Tensor]) -> dict[str, int]:
        fields = LinearNormalizer.fields_of(state_dict)
        for key in ["action", *self.obs_meta]:
            if key not in fields:
                raise CheckpointContentError(
                    f"{self.source}: the normalizer has no field {key!r} (it has "
                    f"{sorted(fields)}); upstream normalizes every observation key and the "
                    "action. Check that the weights belong to this config."
                )
        for key, (shape, _) in self.obs_meta.items():
            if int(np.prod(shape)) % fields[key]:
                raise CheckpointContentError(
                    f"{self.source}: normalizer field {key!r} has size {fields[key]}, which does "
                    f"not divide the observation shape {shape}."
                )
        return fields

    @property
    def observation_spec(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, (shape, _) in self.obs_meta.items()}

    @property
    def normalizer(self) -> LinearNormalizer:
        return self.modules.normalizer

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(key for key, (_, kind) in self.obs_meta.items() if kind == "rgb")

    def normalize_input(self, key: str, value: Tensor) -> Tensor:
        return self.normalizer.normalize(key, value)

    def observation_range(self, key: str) -> tuple[Tensor, Tensor] | None:
        return self.normalizer.normalized_range(key)

    def encode(self, obs: dict) -> Tensor:
        """Validated, normalized observations through the encoder: ``[B, n_obs_steps, Do]``."""
        nobs, batch = {}, None
        for key, (shape, kind) in self.obs_meta.items():
            raw = obs.get(key) if isinstance(obs, dict) else None
            if kind == "rgb" and raw is not None and not _is_float(raw):
                raise ObservationError(
                    f"obs[{key!r}] is an image of dtype {raw.dtype}; expected float images in "
                    f"[0, 1] of shape (B, T, {', '.join(map(str, shape))}) (divide uint8 images "
                    "by 255 and move channels first)."
                )
            value = self._observation(obs, key, shape)[:, : self.n_obs_steps]
            if batch is not None and value.shape[0] != batch[1]:
                raise ObservationError(
                    f"obs[{key!r}] has batch size {value.shape[0]} but obs[{batch[0]!r}] has "
                    f"{batch[1]}; every key must hold the same batch."
                )
            batch = batch or (key, value.shape[0])
            with torch.no_grad():
                normalized = self.normalizer.normalize(key, value)
            nobs[key] = normalized.reshape(-1, *shape)
        with torch.no_grad():
            features = self.modules.obs_encoder(nobs)
        return features.reshape(batch[1], self.n_obs_steps, -1)

    @property
    def event_shape(self) -> tuple[int, int]:
        if self.inpainting:  # features are written into the trajectory's extra channels
            return (self.horizon, self.action_dim + self.obs_feature_dim)
        return (self.horizon, self.action_dim)

    @property
    def action_start(self) -> int:
        return self.n_obs_steps - 1

    def conditioning(self, obs: dict) -> Conditioning:
        features = self.encode(obs)
        batch = features.shape[0]
        if self.obs_as_global_cond:
            return Conditioning(
                self.modules.model, batch, {"global_cond": features.reshape(batch, -1)}
            )
        return Conditioning(self.modules.model, batch, known=features)

    def normalize_action(self, action: Tensor) -> Tensor:
        with torch.no_grad():
            return self.normalizer.normalize("action", action)

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return self.normalizer.unnormalize("action", action)


def _is_float(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.is_floating_point()
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.floating)
    return True  # anything else is refused by Policy._observation with its own message
