"""A DiffusionPolicy lowdim UNet checkpoint written in LeRobot's format, so LeRobot users load it
with ``DiffusionPolicy.from_pretrained(dir)`` and ``make_pre_post_processors(config,
pretrained_path=dir)``: ``config.json``, ``model.safetensors`` (keys ``diffusion.unet.*``) and
the two processor pipelines with their normalization state (``policy-accel export-lerobot``).

LeRobot's policy takes ``observation.state`` (the robot) and ``observation.environment_state``
and concatenates them per step in that order; DiffusionPolicy's lowdim vector puts the robot
last (PushT: 18 keypoint coordinates, then the agent position; robomimic: the object, then the
arm). The global condition's columns of every FiLM encoder are permuted to LeRobot's order, an
exact reparametrization. DiffusionPolicy's ``LinearNormalizer`` (``y = x * scale + offset``,
which also covers its degenerate-range rule) becomes LeRobot's ``MIN_MAX`` with the ``min`` and
``max`` that give the same affine map under LeRobot's ``eps``. Only what LeRobot's
``DiffusionPolicy`` can express is exported: a UNet with a global condition, actions from
step ``n_obs_steps - 1`` (``oa_step_convention``), a full-horizon sample, DDPM or DDIM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from policy_accel.policies.destination import write_directory
from policy_accel.policies.diffusion_policy import UNET_POLICY, DiffusionPolicyLowdim
from policy_accel.policies.errors import CheckpointContentError
from policy_accel.policies.lerobot_networks import to_lerobot_key

__all__ = ["export_lerobot", "robot_state_size"]

EPS = 1e-8  # LeRobot's normalizer eps, written into both pipelines
PREPROCESSOR_STATE = "policy_preprocessor_step_3_normalizer_processor.safetensors"
POSTPROCESSOR_STATE = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
NORM_MAP = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"}


def robot_state_size(env: str) -> int:
    """How many trailing entries of a task's lowdim observation are the robot's own state."""
    if env.startswith("pusht"):
        return 2  # agent position
    if env.startswith("robomimic/"):
        from envs.robomimic import ROBOT_KEYS

        return sum(ROBOT_KEYS.values())  # eef position, quaternion, gripper
    raise ValueError(f"no robot-state layout known for env {env!r}; pass state_size.")


def _check_exportable(policy: DiffusionPolicyLowdim) -> None:
    problems = []
    if not isinstance(policy, DiffusionPolicyLowdim) or policy.kind != UNET_POLICY:
        problems.append("LeRobot's DiffusionPolicy is a UNet policy")
    elif not policy.obs_as_global_cond:
        problems.append("LeRobot conditions on the observation globally (obs_as_global_cond)")
    elif policy.pred_action_steps_only:
        problems.append("LeRobot samples the whole horizon (pred_action_steps_only is false)")
    elif not policy.oa_step_convention:
        problems.append("LeRobot's actions start at step n_obs_steps - 1 (oa_step_convention)")
    elif type(policy.scheduler).__name__ not in ("DDPMScheduler", "DDIMScheduler"):
        problems.append("LeRobot's schedulers are DDPM and DDIM")
    if problems:
        raise CheckpointContentError(f"{policy.source}: cannot export to LeRobot: {problems[0]}.")


def _min_max(scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """LeRobot's MIN_MAX ``2 (x - min) / (max - min + eps) - 1`` equal to ``x * scale + offset``."""
    scale, offset = scale.double(), offset.double()
    span = 2.0 / scale  # max - min + eps
    low = -(offset + 1.0) / scale
    return low.float(), (low + span - EPS).float()


def _stats(values: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for key, (low, high) in values.items():
        out[f"{key}.min"], out[f"{key}.max"] = low.contiguous(), high.contiguous()
    return out


def export_lerobot(
    policy: DiffusionPolicyLowdim,
    directory: str | Path,
    state_size: int,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``policy`` to ``directory`` in LeRobot 0.4+'s ``pretrained_model`` layout; the
    last ``state_size`` observation entries become ``observation.state``, the rest
    ``observation.environment_state``. Returns the directory.

    The files are written into a new folder renamed into place
    (:func:`~policy_accel.policies.destination.write_directory`): a ``directory`` that overlaps
    the policy's source or holds links is refused, and one that holds files is replaced as a
    whole only with ``overwrite=True``."""
    _check_exportable(policy)
    obs_dim, steps = policy.obs_dim, policy.n_obs_steps
    if not 0 < state_size < obs_dim:
        raise ValueError(f"state_size must be in 1..{obs_dim - 1}, got {state_size}.")
    env_size = obs_dim - state_size
    order = list(range(env_size, obs_dim)) + list(range(env_size))  # LeRobot's per-step order
    columns = torch.tensor([step * obs_dim + i for step in range(steps) for i in order])
    network = policy.modules.model
    tensors = _lerobot_weights(network, columns)
    normalizer = policy.normalizer.params_dict
    obs_low, obs_high = _min_max(normalizer["obs"]["scale"], normalizer["obs"]["offset"])
    stats = _stats(
        {
            "observation.state": (obs_low[env_size:], obs_high[env_size:]),
            "observation.environment_state": (obs_low[:env_size], obs_high[:env_size]),
            "action": _min_max(normalizer["action"]["scale"], normalizer["action"]["offset"]),
        }
    )
    features = {
        "observation.state": {"type": "STATE", "shape": [state_size]},
        "observation.environment_state": {"type": "ENV", "shape": [env_size]},
    }
    action = {"action": {"type": "ACTION", "shape": [policy.action_dim]}}
    config = _config(policy, features, action, network)
    with write_directory(directory, source=policy.source, overwrite=overwrite) as folder:
        _write_files(folder, tensors, stats, config, features, action)
    return Path(directory)


def _lerobot_weights(network, columns: Tensor) -> dict[str, Tensor]:
    """The UNet's weights under LeRobot's names, each FiLM encoder's condition columns permuted."""
    embed = network.diffusion_step_encoder[-1].out_features
    tensors = {}
    for key, value in network.state_dict().items():
        value = value.detach().cpu()
        if "cond_encoder" in key and key.endswith("weight") and value.dim() == 2:
            value = torch.cat([value[:, :embed], value[:, embed:][:, columns]], dim=1)
        tensors[to_lerobot_key(key)] = value.contiguous()
    return tensors


def _write_files(
    directory: Path, tensors: dict, stats: dict, config: dict, features: dict, action: dict
) -> None:
    save_file(tensors, directory / "model.safetensors")
    save_file(stats, directory / PREPROCESSOR_STATE)
    save_file({k: v for k, v in stats.items() if k.startswith("action.")},
              directory / POSTPROCESSOR_STATE)  # fmt: skip
    _write(directory / "config.json", config)
    normalizer_config = {"eps": EPS, "features": {**features, **action}, "norm_map": NORM_MAP}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    _write(
        directory / "policy_preprocessor.json",
        {
            "name": "policy_preprocessor",
            "steps": [
                {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
                {"registry_name": "to_batch_processor", "config": {}},
                device,
                {"registry_name": "normalizer_processor", "config": normalizer_config,
                 "state_file": PREPROCESSOR_STATE},
            ],
        },
    )  # fmt: skip
    _write(
        directory / "policy_postprocessor.json",
        {
            "name": "policy_postprocessor",
            "steps": [
                {"registry_name": "unnormalizer_processor",
                 "config": {**normalizer_config, "features": action},
                 "state_file": POSTPROCESSOR_STATE},
                device,
            ],
        },
    )  # fmt: skip


def _config(policy: DiffusionPolicyLowdim, features: dict, action: dict, network) -> dict:
    scheduler = policy.scheduler.config
    model = policy.cfg["model"]
    train_steps = int(scheduler["num_train_timesteps"])
    return {
        "type": "diffusion",
        "n_obs_steps": policy.n_obs_steps,
        "input_features": features,
        "output_features": action,
        "device": "cpu",
        "use_amp": False,
        "horizon": policy.horizon,
        "n_action_steps": policy.n_action_steps,
        "normalization_mapping": NORM_MAP,
        "drop_n_last_frames": policy.horizon - policy.n_action_steps - policy.n_obs_steps + 1,
        "down_dims": list(model["down_dims"]),
        "kernel_size": int(model["kernel_size"]),
        "n_groups": int(model["n_groups"]),
        "diffusion_step_embed_dim": int(model["diffusion_step_embed_dim"]),
        "use_film_scale_modulation": bool(model.get("cond_predict_scale", False)),
        "noise_scheduler_type": "DDIM" if "DDIM" in type(policy.scheduler).__name__ else "DDPM",
        "num_train_timesteps": train_steps,
        "beta_schedule": scheduler["beta_schedule"],
        "beta_start": float(scheduler["beta_start"]),
        "beta_end": float(scheduler["beta_end"]),
        "prediction_type": scheduler["prediction_type"],
        "clip_sample": bool(scheduler["clip_sample"]),
        "clip_sample_range": float(scheduler.get("clip_sample_range", 1.0)),
        "num_inference_steps": (
            None if policy.num_inference_steps == train_steps else policy.num_inference_steps
        ),
    }


def _write(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
