"""LeRobot's diffusion networks from its checkpoint layout: key renaming onto our
``ConditionalUnet1D`` (LeRobot's UNet is DiffusionPolicy's with other key names), the RGB
encoder(s) and their key prefixes, and the scheduler as LeRobot's ``_make_noise_scheduler``
builds it. ``model.safetensors`` is loaded by the one strict loader,
:func:`policy_accel.policies.validation.load_weights`."""

from __future__ import annotations

import re

from torch import nn

from policy_accel.policies.lerobot_config import DiffusionSettings
from policy_accel.policies.networks.lerobot_rgb_encoder import DiffusionRgbEncoder
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.sampling.schedulers import build_scheduler as build_named_scheduler

UNET_PREFIX = "diffusion.unet."
RGB_ENCODER_PREFIX = "diffusion.rgb_encoder."

# LeRobot UNet key -> ours (applied in order) and back.
_TO_OURS = [
    (re.compile(r"\.conv1\."), ".blocks.0."),
    (re.compile(r"\.conv2\."), ".blocks.1."),
    (re.compile(r"^((?:down|up)_modules\.\d+\.2)\.(weight|bias)$"), r"\1.conv.\2"),
]
_TO_LEROBOT = [
    (re.compile(r"\.blocks\.0\."), ".conv1."),
    (re.compile(r"\.blocks\.1\."), ".conv2."),
    (re.compile(r"^((?:down|up)_modules\.\d+\.2)\.conv\.(weight|bias)$"), r"\1.\2"),
]


def to_our_key(lerobot_key: str) -> str:
    """``down_modules.0.0.conv1.block.0.weight`` -> ``down_modules.0.0.blocks.0.block.0.weight``
    (LeRobot UNet key without the ``diffusion.unet.`` prefix -> ours)."""
    for pattern, replacement in _TO_OURS:
        lerobot_key = pattern.sub(replacement, lerobot_key)
    return lerobot_key


def to_lerobot_key(key: str) -> str:
    """The inverse of :func:`to_our_key`, with the ``diffusion.unet.`` prefix."""
    for pattern, replacement in _TO_LEROBOT:
        key = pattern.sub(replacement, key)
    return UNET_PREFIX + key


# --- network and scheduler ---------------------------------------------------------------------


def build_unet(settings: DiffusionSettings) -> ConditionalUnet1D:
    """LeRobot's ``DiffusionConditionalUnet1d`` as our ``ConditionalUnet1D``."""
    return ConditionalUnet1D(
        input_dim=settings.action_dim,
        global_cond_dim=settings.n_obs_steps * settings.cond_dim_per_step,
        diffusion_step_embed_dim=settings.diffusion_step_embed_dim,
        down_dims=settings.down_dims,
        kernel_size=settings.kernel_size,
        n_groups=settings.n_groups,
        cond_predict_scale=settings.use_film_scale_modulation,
    )


def build_rgb_encoder(settings: DiffusionSettings) -> nn.Module | None:
    """LeRobot's ``rgb_encoder``: None without cameras, one shared ``DiffusionRgbEncoder``, or an
    ``nn.ModuleList`` with one per camera (config order). The backbone is built without weights:
    ``pretrained_backbone_weights`` only initialized LeRobot's training, and the trained weights
    come from ``model.safetensors``, so nothing is downloaded."""
    config = settings.rgb_encoder
    if config is None:
        return None
    image_shape = next(iter(settings.image_shapes.values()))  # LeRobot: all cameras share it

    def encoder() -> DiffusionRgbEncoder:
        return DiffusionRgbEncoder(
            image_shape,
            crop_shape=config.crop_shape,
            resize_shape=config.resize_shape,
            vision_backbone=config.vision_backbone,
            use_group_norm=config.use_group_norm,
            num_keypoints=config.num_keypoints,
        )

    if config.separate_encoder_per_camera:
        return nn.ModuleList(encoder() for _ in settings.image_shapes)
    return encoder()


def build_scheduler(settings: DiffusionSettings):
    """The scheduler exactly as LeRobot's ``_make_noise_scheduler`` configures it."""
    return build_named_scheduler(
        settings.noise_scheduler_type,
        num_train_timesteps=settings.num_train_timesteps,
        beta_start=settings.beta_start,
        beta_end=settings.beta_end,
        beta_schedule=settings.beta_schedule,
        clip_sample=settings.clip_sample,
        clip_sample_range=settings.clip_sample_range,
        prediction_type=settings.prediction_type,
    )


def rename_key(prefix: str, key: str) -> str:
    """A file key (without its prefix) as our module names it: UNet keys renamed, the rgb
    encoder's are LeRobot's already."""
    return to_our_key(key) if prefix == UNET_PREFIX else key


def file_key(prefix: str, key: str) -> str:
    """Our module key back as the file names it (to name a missing key)."""
    return to_lerobot_key(key) if prefix == UNET_PREFIX else prefix + key


def weights_hint(settings: DiffusionSettings) -> str:
    hint = "Check that config.json belongs to this model.safetensors."
    if settings.rgb_encoder is not None:
        hint += (
            " For the rgb encoder, check `use_separate_rgb_encoder_per_camera`, "
            "`use_group_norm`, `vision_backbone`, `spatial_softmax_num_keypoints` and the "
            "VISUAL input features."
        )
    return hint


def network_modules(unet: ConditionalUnet1D, rgb_encoder: nn.Module | None) -> dict:
    """LeRobot's ``DiffusionModel`` key prefixes and our modules: ``diffusion.unet.``, then
    ``diffusion.rgb_encoder.`` for a shared encoder or ``diffusion.rgb_encoder.<i>.`` for camera
    ``i`` of separate ones (LeRobot's ``nn.ModuleList`` indices)."""
    modules: dict[str, nn.Module] = {UNET_PREFIX: unet}
    if isinstance(rgb_encoder, nn.ModuleList):
        modules.update({f"{RGB_ENCODER_PREFIX}{i}.": m for i, m in enumerate(rgb_encoder)})
    elif rgb_encoder is not None:
        modules[RGB_ENCODER_PREFIX] = rgb_encoder
    return modules
