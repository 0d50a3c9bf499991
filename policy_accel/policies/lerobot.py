"""LeRobot's DiffusionPolicy (``lerobot.policies.diffusion``) from a checkpoint directory.

A LeRobot ``pretrained_model/`` directory (what ``save_pretrained`` writes and the hub serves)
holds ``config.json`` (the draccus ``DiffusionConfig``), ``model.safetensors`` (keys
``diffusion.*``) and, from LeRobot 0.4 on, the processor pipelines that hold the normalization
stats (see :mod:`policy_accel.policies.lerobot_normalization`; the legacy layout keeps them inside
``model.safetensors``). ``train_config.json`` is ignored.

LeRobot's UNet is DiffusionPolicy's ``ConditionalUnet1D`` with other key names, so the weights are
renamed onto :class:`~policy_accel.policies.networks.unet1d.ConditionalUnet1D`. The scheduler is
built the way LeRobot's ``_make_noise_scheduler`` builds it. State-only policies (state plus
environment state) are supported; image inputs (the ResNet keypoint encoder) are not yet.

Per observation step the global condition is ``cat([state, environment_state])``; the steps are
flattened step-major to ``[B, n_obs_steps * D]``. The sample is ``[B, horizon, action_dim]`` and
``action = action_pred[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from policy_accel.policies.base import ObservationError, Policy
from policy_accel.policies.lerobot_config import DiffusionSettings, read_config
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
from policy_accel.sampling import DenoisingProblem

__all__ = ["LeRobotCheckpointError", "LeRobotDiffusionPolicy", "load_lerobot"]

UNET_PREFIX = "diffusion.unet."
SCHEDULERS = {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler}
IDENTITY = FeatureNormalization(mode="IDENTITY", stats={}, eps=0.0)

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
        global_cond_dim=settings.n_obs_steps * sum(settings.condition_sizes.values()),
        diffusion_step_embed_dim=settings.diffusion_step_embed_dim,
        down_dims=settings.down_dims,
        kernel_size=settings.kernel_size,
        n_groups=settings.n_groups,
        cond_predict_scale=settings.use_film_scale_modulation,
    )


def build_scheduler(settings: DiffusionSettings) -> DDPMScheduler | DDIMScheduler:
    """The scheduler exactly as LeRobot's ``_make_noise_scheduler`` configures it."""
    return SCHEDULERS[settings.noise_scheduler_type](
        num_train_timesteps=settings.num_train_timesteps,
        beta_start=settings.beta_start,
        beta_end=settings.beta_end,
        beta_schedule=settings.beta_schedule,
        clip_sample=settings.clip_sample,
        clip_sample_range=settings.clip_sample_range,
        prediction_type=settings.prediction_type,
    )


def load_unet_weights(unet: ConditionalUnet1D, state: dict[str, Tensor], path: Path) -> None:
    """Load LeRobot's ``diffusion.unet.*`` tensors into ``unet``; every key must match."""
    expected = unet.state_dict()
    renamed = {to_our_key(k[len(UNET_PREFIX) :]): k for k in state if k.startswith(UNET_PREFIX)}
    unexpected = sorted(k for k in state if not k.startswith(UNET_PREFIX))
    unexpected += sorted(renamed[k] for k in renamed if k not in expected)
    missing = sorted(to_lerobot_key(k) for k in expected if k not in renamed)
    if missing or unexpected:
        raise LeRobotCheckpointError(
            f"{path} does not match the UNet that config.json describes: missing keys "
            f"{missing}, unexpected keys {unexpected}. Check that config.json belongs to this "
            "model.safetensors."
        )
    weights = {}
    for ours, theirs in renamed.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise LeRobotCheckpointError(
                f"{path}: {theirs!r} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{tuple(expected[ours].shape)}. Check that config.json belongs to this "
                "model.safetensors."
            )
        if not tensor.is_floating_point():
            raise LeRobotCheckpointError(
                f"{path}: {theirs!r} has dtype {tensor.dtype}; network weights must be floats."
            )
        weights[ours] = tensor.to(torch.float32)
    unet.load_state_dict(weights, strict=True)


# --- the policy ----------------------------------------------------------------------------------


class LeRobotDiffusionPolicy(Policy):
    """LeRobot's DiffusionPolicy: raw observations in, actions in environment units out.

    ``obs`` maps LeRobot keys (``observation.state``, ``observation.environment_state``) to
    ``[B, T >= n_obs_steps, D]`` histories in raw units; the last ``n_obs_steps`` are used.
    Keys are first renamed by the preprocessor's ``rename_map``, as LeRobot does.
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
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
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
        return {key: (size,) for key, size in self.condition_sizes.items()}

    def normalize_observation(self, obs: dict) -> dict[str, Tensor]:
        """Validated, normalized ``[B, n_obs_steps, D]`` history of every conditioning key."""
        if isinstance(obs, dict) and self.rename_map:
            obs = {self.rename_map.get(key, key): value for key, value in obs.items()}
        normalized = {}
        for key, shape in self.observation_spec.items():
            value = self._observation(obs, key, shape)[:, -self.n_obs_steps :]
            normalized[key] = self.input_normalization.get(key, IDENTITY).normalize(value)
        sizes = {key: int(value.shape[0]) for key, value in normalized.items()}
        if len(set(sizes.values())) != 1:
            raise ObservationError(
                f"obs arrays disagree on the batch size: {sizes}; pass the same B for every key."
            )
        return normalized

    def global_cond(self, obs: dict) -> Tensor:
        """``[B, n_obs_steps * D]``: per step ``cat([state, env_state])``, step-major."""
        return torch.cat(list(self.normalize_observation(obs).values()), dim=-1).flatten(1)

    def problem(
        self,
        obs: dict,
        *,
        x_T: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        scheduler: Any = None,
        num_inference_steps: int | None = None,
    ) -> DenoisingProblem:
        cond = self.global_cond(obs)
        batch = cond.shape[0]
        unet = self.unet

        def denoiser(x: Tensor, t: Tensor) -> Tensor:
            if x.shape[0] % batch:
                raise ValueError(
                    f"denoiser got {x.shape[0]} rows, not a multiple of the batch size {batch}."
                )
            return unet(x, t.to(torch.int64), global_cond=cond.repeat(x.shape[0] // batch, 1))

        return DenoisingProblem.from_scheduler(
            self.scheduler if scheduler is None else scheduler,
            denoiser,
            num_inference_steps or self.num_inference_steps,
            (batch, self.horizon, self.action_dim),
            generator=generator,
            x_T=x_T,
            noise=noise,
            device=self.device,
        )

    def decode(self, x0: Tensor) -> dict[str, Tensor]:
        action_pred = self.action_normalization.unnormalize(x0)
        start = self.n_obs_steps - 1
        return {
            "action": action_pred[:, start : start + self.n_action_steps],
            "action_pred": action_pred,
        }


def load_lerobot(
    directory: str | Path, device: torch.device | str = "cpu"
) -> LeRobotDiffusionPolicy:
    """Load a LeRobot DiffusionPolicy checkpoint directory (current or legacy layout)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LeRobotCheckpointError(
            f"{directory} is not a directory; pass a LeRobot pretrained_model/ folder holding "
            "config.json and model.safetensors."
        )
    settings = read_config(directory / "config.json")
    model_path = directory / "model.safetensors"
    network, buffers = split_legacy_buffers(read_safetensors(model_path))
    unet = build_unet(settings)
    load_unet_weights(unet, network, model_path)

    rename_map: dict[str, str] = {}
    if (directory / PREPROCESSOR_FILE).exists():
        if buffers:
            raise LeRobotCheckpointError(
                f"{directory} has both {PREPROCESSOR_FILE} and legacy normalization buffers in "
                f"{model_path.name} ({sorted(buffers)[:3]}...); remove one of the two."
            )
        inputs, action, rename_map = processor_normalization(
            directory, settings.condition_sizes, settings.action_dim
        )
    elif buffers:
        inputs, action = legacy_normalization(
            buffers,
            settings.input_features,
            settings.condition_sizes,
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
        device=device,
    )
