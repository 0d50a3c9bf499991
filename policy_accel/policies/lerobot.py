"""LeRobot's DiffusionPolicy (``lerobot.policies.diffusion``) from a checkpoint directory.

A LeRobot ``pretrained_model/`` directory (what ``save_pretrained`` writes and the hub serves)
holds ``config.json`` (the draccus ``DiffusionConfig``), ``model.safetensors`` (keys
``diffusion.*``) and, from LeRobot 0.4 on, the processor pipelines that hold the normalization
stats (see :mod:`policy_accel.policies.lerobot_normalization`; the legacy layout keeps them inside
``model.safetensors``). ``train_config.json`` is ignored.

LeRobot's UNet is DiffusionPolicy's ``ConditionalUnet1D`` with other key names, so the weights are
renamed onto :class:`~policy_accel.policies.networks.unet1d.ConditionalUnet1D`; the networks,
the renaming, strict weight loading and the scheduler live in
:mod:`policy_accel.policies.lerobot_networks`.

Cameras (``VISUAL`` input features) go through LeRobot's ``DiffusionRgbEncoder``
(:class:`~policy_accel.policies.networks.lerobot_rgb_encoder.DiffusionRgbEncoder`, whose keys are
LeRobot's): one shared encoder under ``diffusion.rgb_encoder.*``, or with
``use_separate_rgb_encoder_per_camera`` an ``nn.ModuleList`` under ``diffusion.rgb_encoder.<i>.*``,
``i`` being the camera's index in ``input_features`` order. Images enter as float ``[0, 1]``
``(B, T, 3, H, W)`` and are normalized by the processor stats (MEAN_STD by default).

As in LeRobot's ``DiffusionModel._prepare_global_conditioning``, per observation step the global
condition is ``cat([state, features of each camera in config order, environment_state])`` (the
environment state is optional when there are cameras); the steps are flattened step-major to
``[B, n_obs_steps * D]``. The sample is ``[B, horizon, action_dim]`` and
``action = action_pred[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from policy_accel.policies.base import Conditioning, ObservationError, Policy
from policy_accel.policies.lerobot_config import STATE_KEY, read_config
from policy_accel.policies.lerobot_networks import (
    build_rgb_encoder,
    build_scheduler,
    build_unet,
    file_key,
    network_modules,
    rename_key,
    weights_hint,
)
from policy_accel.policies.lerobot_normalization import (
    PREPROCESSOR_FILE,
    FeatureNormalization,
    LeRobotCheckpointError,
    legacy_normalization,
    processor_normalization,
    read_safetensors,
    split_legacy_buffers,
)
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.policies.validation import load_weights, naming_the_file

__all__ = ["LeRobotCheckpointError", "LeRobotDiffusionPolicy", "load_lerobot"]

IDENTITY = FeatureNormalization(mode="IDENTITY", stats={}, eps=0.0)


class LeRobotDiffusionPolicy(Policy):
    """LeRobot's DiffusionPolicy: raw observations in, actions in environment units out.

    ``obs`` maps LeRobot keys (``observation.state``, ``observation.environment_state``) to
    ``[B, T >= n_obs_steps, D]`` histories in raw units, and each camera key (``image_shapes``)
    to ``[B, T, 3, H, W]`` float images in ``[0, 1]``; the last ``n_obs_steps`` are used. Keys
    are first renamed by the preprocessor's ``rename_map``, as LeRobot does.

    ``rgb_encoder`` is LeRobot's: one ``DiffusionRgbEncoder`` shared by all cameras, or an
    ``nn.ModuleList`` with one per camera in ``image_shapes`` order (None without cameras).
    """

    def __init__(
        self,
        unet: ConditionalUnet1D,
        scheduler: Any,
        num_inference_steps: int,
        *,
        n_obs_steps: int,
        horizon: int,
        n_action_steps: int,
        condition_sizes: dict[str, int],
        input_normalization: dict[str, FeatureNormalization],
        action_normalization: FeatureNormalization,
        rename_map: dict[str, str] | None = None,
        image_shapes: dict[str, tuple[int, int, int]] | None = None,
        rgb_encoder: nn.Module | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.image_shapes = {key: tuple(shape) for key, shape in (image_shapes or {}).items()}
        if bool(self.image_shapes) != (rgb_encoder is not None):
            raise ValueError("pass rgb_encoder exactly when the policy has image inputs.")
        if isinstance(rgb_encoder, nn.ModuleList) and len(rgb_encoder) != len(self.image_shapes):
            raise ValueError(
                f"{len(rgb_encoder)} rgb encoders for {len(self.image_shapes)} cameras; with "
                "separate encoders there must be one per camera."
            )
        self.rgb_encoder = (
            None
            if rgb_encoder is None
            else rgb_encoder.to(self.device).eval().requires_grad_(False)
        )
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.n_obs_steps = int(n_obs_steps)
        self.horizon = int(horizon)
        self.n_action_steps = int(n_action_steps)
        self.action_dim = int(unet.final_conv[1].out_channels)
        self.condition_sizes = dict(condition_sizes)
        self.input_normalization = {
            key: value.to(self.device) for key, value in input_normalization.items()
        }
        self.action_normalization = action_normalization.to(self.device)
        self.rename_map = dict(rename_map or {})

    @property
    def observation_spec(self) -> dict[str, tuple[int, ...]]:
        spec: dict[str, tuple[int, ...]] = {k: (size,) for k, size in self.condition_sizes.items()}
        spec.update(self.image_shapes)
        return spec

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(self.image_shapes)

    def rename_observation(self, obs: dict) -> dict:
        if not self.rename_map:
            return obs
        return {self.rename_map.get(key, key): value for key, value in obs.items()}

    def normalize_input(self, key: str, value: Tensor) -> Tensor | None:
        normalization = self.input_normalization.get(key, IDENTITY)
        if normalization.mode == "IDENTITY" and normalization.observed is None:
            return None  # raw values and no recorded range: nothing to check them against
        return normalization.normalize(value)

    def observation_range(self, key: str) -> tuple[Tensor, Tensor] | None:
        return self.input_normalization.get(key, IDENTITY).normalized_range()

    def normalize_observation(self, obs: dict) -> dict[str, Tensor]:
        """Validated, normalized ``[B, n_obs_steps, ...]`` history of every conditioning key
        (images ``[B, n_obs_steps, 3, H, W]``)."""
        if isinstance(obs, dict):
            obs = self.rename_observation(obs)
        normalized = {}
        for key, shape in self.observation_spec.items():
            if key in self.image_shapes:
                self._check_image(obs, key, shape)
            value = self._observation(obs, key, shape)[:, -self.n_obs_steps :]
            normalized[key] = self.input_normalization.get(key, IDENTITY).normalize(value)
        sizes = {key: int(value.shape[0]) for key, value in normalized.items()}
        if len(set(sizes.values())) != 1:
            raise ObservationError(
                f"obs arrays disagree on the batch size: {sizes}; pass the same B for every key."
            )
        return normalized

    def _check_image(self, obs: dict, key: str, shape: tuple[int, ...]) -> None:
        """Refuse what :meth:`_observation` would silently convert: integer (uint8) images, and
        name channels-last images as such."""
        value = obs.get(key) if isinstance(obs, dict) else None
        dtype = getattr(value, "dtype", None)
        if isinstance(value, Tensor):
            is_float = value.is_floating_point()
        elif isinstance(value, np.ndarray):
            is_float = np.issubdtype(value.dtype, np.floating)
        else:
            return  # missing or of the wrong type: _observation names it
        if not is_float:
            raise ObservationError(
                f"obs[{key!r}] is an image of dtype {dtype}; LeRobot policies take float images "
                f"in [0, 1] of shape (B, n_obs_steps={self.n_obs_steps}, "
                f"{', '.join(map(str, shape))}): scale uint8 images to [0, 1] (divide by 255) "
                "and convert them to float first."
            )
        channels, height, width = shape
        channels_last = (height, width, channels)
        if channels_last != tuple(shape) and tuple(value.shape[2:]) == channels_last:
            raise ObservationError(
                f"obs[{key!r}] has shape {tuple(value.shape)}, which is channels-last; expected "
                f"(B, n_obs_steps={self.n_obs_steps}, {channels}, {height}, {width}) (move the "
                "channel axis before H and W)."
            )

    def encode_images(self, normalized: dict[str, Tensor]) -> Tensor:
        """``[B, n_obs_steps, n_cameras * F]``: each camera's features, cameras in config order
        (LeRobot's ``b s (n ...)`` layout, shared or separate encoders alike)."""
        if self.rgb_encoder is None:
            raise ValueError("this policy has no image inputs.")
        images = [normalized[key] for key in self.image_shapes]
        batch, steps = images[0].shape[:2]
        if isinstance(self.rgb_encoder, nn.ModuleList):
            features = [
                encoder(camera.flatten(0, 1)).unflatten(0, (batch, steps))
                for encoder, camera in zip(self.rgb_encoder, images, strict=True)
            ]
            return torch.cat(features, dim=-1)
        stacked = torch.stack(images, dim=2)  # (B, T, N, C, H, W), as LeRobot stacks them
        features = self.rgb_encoder(stacked.flatten(0, 2))  # "(b s n) ..."
        return features.unflatten(0, (batch, steps, len(images))).flatten(2)

    def global_cond(self, obs: dict) -> Tensor:
        """``[B, n_obs_steps * D]``: per step ``cat([state, camera features, env_state])``,
        step-major."""
        normalized = self.normalize_observation(obs)
        parts = [normalized[STATE_KEY]]
        if self.image_shapes:
            parts.append(self.encode_images(normalized))
        parts += [normalized[key] for key in self.condition_sizes if key != STATE_KEY]
        return torch.cat(parts, dim=-1).flatten(1)

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.horizon, self.action_dim)

    @property
    def action_start(self) -> int:
        return self.n_obs_steps - 1

    def conditioning(self, obs: dict) -> Conditioning:
        cond = self.global_cond(obs)
        return Conditioning(self.unet, cond.shape[0], {"global_cond": cond})

    def normalize_action(self, action: Tensor) -> Tensor:
        with torch.no_grad():
            return self.action_normalization.normalize(action.to(self.device))

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return self.action_normalization.unnormalize(action)


def load_lerobot(
    directory: str | Path, device: torch.device | str = "cpu"
) -> LeRobotDiffusionPolicy:
    """Load a LeRobot DiffusionPolicy checkpoint directory (current or legacy layout)."""
    with naming_the_file(str(directory), LeRobotCheckpointError):
        return _load(Path(directory), device)


def _load(directory: Path, device: torch.device | str) -> LeRobotDiffusionPolicy:
    if not directory.is_dir():
        raise LeRobotCheckpointError(
            f"{directory} is not a directory; pass a LeRobot pretrained_model/ folder holding "
            "config.json and model.safetensors."
        )
    settings = read_config(directory / "config.json")
    model_path = directory / "model.safetensors"
    network, buffers = split_legacy_buffers(read_safetensors(model_path))
    built: dict = {}

    def build() -> dict:
        built["unet"], built["rgb"] = build_unet(settings), build_rgb_encoder(settings)
        return network_modules(built["unet"], built["rgb"])

    load_weights(
        build,
        network,
        str(model_path),
        rename=rename_key,
        file_key=file_key,
        hint=weights_hint(settings),
        error_type=LeRobotCheckpointError,
    )
    unet, rgb_encoder = built["unet"], built["rgb"]

    rename_map: dict[str, str] = {}
    if (directory / PREPROCESSOR_FILE).exists():
        if buffers:
            raise LeRobotCheckpointError(
                f"{directory} has both {PREPROCESSOR_FILE} and legacy normalization buffers in "
                f"{model_path.name} ({sorted(buffers)[:3]}...); remove one of the two."
            )
        inputs, action, rename_map = processor_normalization(
            directory, settings.input_stat_shapes, settings.action_dim
        )
    elif buffers:
        inputs, action = legacy_normalization(
            buffers,
            settings.input_features,
            settings.input_stat_shapes,
            settings.action_dim,
            settings.normalization_mapping,
            model_path,
        )
    else:
        raise LeRobotCheckpointError(
            f"{directory} has no {PREPROCESSOR_FILE} and {model_path.name} has no legacy "
            "normalization buffers, so the normalization stats are missing; copy the processor "
            "files (policy_*processor*.json and .safetensors) next to the model."
        )
    return LeRobotDiffusionPolicy(
        unet,
        build_scheduler(settings),
        settings.num_inference_steps or settings.num_train_timesteps,
        n_obs_steps=settings.n_obs_steps,
        horizon=settings.horizon,
        n_action_steps=settings.n_action_steps,
        condition_sizes=settings.condition_sizes,
        input_normalization=inputs,
        action_normalization=action,
        rename_map=rename_map,
        image_shapes=settings.image_shapes,
        rgb_encoder=rgb_encoder,
        device=device,
    )
