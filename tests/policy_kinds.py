"""Every kind of policy the loaders accept, small enough to plan in a test, and an env that feeds
each one observations it accepts.

Kinds: DiffusionPolicy's low-dim UNet with global, local and inpainting conditioning and with
``pred_action_steps_only``, its transformer, its hybrid image policy, and LeRobot's
DiffusionPolicy. The global UNet, the transformer and LeRobot come from the golden fixtures
(``../shared/fixtures``); the others reuse the fixture's config and normalizer with fresh
weights (no fixture covers them). The samples are small (16 x 2, or 16 x 22 inpainted).
"""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from policy_accel import load_policy
from policy_accel.policies.diffusion_policy import DiffusionPolicyLowdim, _Modules
from policy_accel.policies.diffusion_policy_image import DiffusionPolicyImage, build_obs_encoder
from policy_accel.policies.networks.transformer import TransformerForDiffusion
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.policies.normalizer import LinearNormalizer
from policy_accel.policies.pickle_safe import read_checkpoint
from tests.shared_fixtures import FIXTURES

DP = FIXTURES / "diffusion_policy"
LEROBOT = FIXTURES / "lerobot" / "diffusion_pusht_keypoints"
KINDS = (
    "global",
    "local",
    "inpainting",
    "pred_action_steps_only",
    "transformer",
    "image",
    "lerobot",
)

# --- DiffusionPolicy image policies (random weights; no fixture of the original code) ---------

SCHEDULER = {
    "_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler",
    "num_train_timesteps": 100,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}
SHAPE_META = {
    "obs": {
        "image": {"shape": [3, 40, 40], "type": "rgb"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}
SMALL_UNET = dict(diffusion_step_embed_dim=16, down_dims=[16, 32], kernel_size=3, n_groups=4)


def hybrid_cfg(**overrides) -> dict:
    cfg = {
        "_target_": "diffusion_policy.policy.diffusion_unet_hybrid_image_policy."
        "DiffusionUnetHybridImagePolicy",
        "shape_meta": SHAPE_META,
        "noise_scheduler": SCHEDULER,
        "horizon": 8,
        "n_action_steps": 4,
        "n_obs_steps": 2,
        "num_inference_steps": 100,
        "obs_as_global_cond": True,
        "crop_shape": [32, 32],
        "cond_predict_scale": True,
        "obs_encoder_group_norm": True,
        "eval_fixed_crop": True,
        **SMALL_UNET,
    }
    return {**cfg, **overrides}


def image_cfg(**overrides) -> dict:
    cfg = hybrid_cfg()
    for key in ("crop_shape", "obs_encoder_group_norm", "eval_fixed_crop"):
        del cfg[key]
    cfg["_target_"] = "diffusion_policy.policy.diffusion_unet_image_policy.DiffusionUnetImagePolicy"
    cfg["obs_encoder"] = {
        "_target_": "diffusion_policy.model.vision.multi_image_obs_encoder.MultiImageObsEncoder",
        "shape_meta": SHAPE_META,
        "rgb_model": {
            "_target_": "diffusion_policy.model.vision.model_getter.get_resnet",
            "name": "resnet18",
            "weights": None,
        },
        "resize_shape": None,
        "crop_shape": [32, 32],
        "random_crop": True,
        "use_group_norm": True,
        "share_rgb_model": False,
        "imagenet_norm": True,
    }
    return {**cfg, **overrides}


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out like upstream's ``policy.state_dict()`` with random weights, a
    DiffusionPolicy image range normalizer (scale 2, offset -1) and ModuleAttrMixin's keys."""
    torch.manual_seed(seed)
    kind = cfg["_target_"].rsplit(".", 1)[-1]
    encoder, _ = build_obs_encoder(kind, cfg, "test")
    features = encoder.output_dim
    unet = {k: cfg[k] for k in (*SMALL_UNET, "cond_predict_scale")}
    if cfg["obs_as_global_cond"]:
        model = ConditionalUnet1D(2, global_cond_dim=features * cfg["n_obs_steps"], **unet)
    else:
        model = ConditionalUnet1D(2 + features, **unet)
    holder = nn.Module()
    holder.obs_encoder, holder.model = encoder, model
    holder.normalizer = LinearNormalizer({"image": 1, "agent_pos": 2, "action": 2})
    state = dict(holder.state_dict())
    state["normalizer.params_dict.image.scale"] = torch.tensor([2.0])
    state["normalizer.params_dict.image.offset"] = torch.tensor([-1.0])
    state["normalizer.params_dict.agent_pos.scale"] = torch.tensor([0.01, 0.02])
    state["normalizer.params_dict.action.scale"] = torch.tensor([0.01, 0.02])
    state["normalizer.params_dict.action.offset"] = torch.tensor([-1.0, 0.5])
    state["_dummy_variable"] = torch.empty(0)
    state["mask_generator._dummy_variable"] = torch.empty(0)
    return state


# --- DiffusionPolicy low-dim variants of the fixture ------------------------------------------


def fresh_lowdim_state(cfg: dict, state: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for ``cfg`` with fresh network weights and the fixture's normalizer."""
    torch.manual_seed(seed)
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "_target_"}
    network = (
        TransformerForDiffusion(**model_cfg)
        if "Transformer" in cfg["_target_"]
        else ConditionalUnet1D(**model_cfg)
    )
    modules = _Modules(network, LinearNormalizer({"obs": 20, "action": 2}))
    fresh = modules.state_dict()
    fresh.update({k: v for k, v in state.items() if k.startswith("normalizer.")})
    return fresh


def lowdim_variant(kind: str) -> DiffusionPolicyLowdim:
    payload = read_checkpoint(DP / "unet_lowdim_global" / "model.ckpt")
    base, state = payload["cfg"]["policy"], payload["state_dicts"]["ema_model"]
    model = dict(base["model"])
    if kind == "local":
        cfg = {**base, "obs_as_global_cond": False, "obs_as_local_cond": True}
        cfg["model"] = {**model, "global_cond_dim": None, "local_cond_dim": 20}
    elif kind == "inpainting":
        cfg = {**base, "obs_as_global_cond": False}
        cfg["model"] = {**model, "global_cond_dim": None, "input_dim": 22}
    elif kind == "pred_action_steps_only":
        return DiffusionPolicyLowdim({**base, "pred_action_steps_only": True}, state, kind)
    else:
        raise ValueError(kind)
    return DiffusionPolicyLowdim(cfg, fresh_lowdim_state(cfg, state), kind)


def make_policy(kind: str):
    """A policy of ``kind`` (see :data:`KINDS`)."""
    if kind == "global":
        return load_policy(DP / "unet_lowdim_global" / "model.ckpt")
    if kind == "transformer":
        return load_policy(DP / "transformer_lowdim" / "model.ckpt")
    if kind == "lerobot":
        return load_policy(LEROBOT)
    if kind == "image":
        cfg = hybrid_cfg()
        return DiffusionPolicyImage(cfg, random_state(cfg), "image")
    return lowdim_variant(kind)


# --- observations each policy accepts ----------------------------------------------------------


def _affine(policy, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``normalized = a * raw + b`` per element of ``key`` (normalizers are affine)."""
    with torch.no_grad():
        zero = policy.normalize_input(key, torch.zeros(shape, device=policy.device))
        one = policy.normalize_input(key, torch.ones(shape, device=policy.device))
    if zero is None:
        return np.ones(shape, np.float32), np.zeros(shape, np.float32)
    b = zero.cpu().numpy()
    return one.cpu().numpy() - b, b


class ObservationWalk(gym.Env):
    """Observations ``policy`` accepts, drifting a little every step (a stand-in task for the
    policies no simulated task feeds): normalized values in [-0.9, 0.9], images in [0, 1]. The
    episode ends after ``length`` steps without success; the reward is 0."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, policy, length: int = 20) -> None:
        self.spec_shapes = dict(policy.observation_spec)
        self.images = set(policy.image_keys)
        self.maps = {
            key: _affine(policy, key, shape)
            for key, shape in self.spec_shapes.items()
            if key not in self.images
        }
        self.observation_space = spaces.Dict(
            {
                key: spaces.Box(0.0 if key in self.images else -np.inf, 1.0 if key in self.images
                                else np.inf, shape, np.float32)
                for key, shape in self.spec_shapes.items()
            }
        )  # fmt: skip
        self.action_space = spaces.Box(-np.inf, np.inf, (policy.action_dim,), np.float32)
        self.length = length
        self.rng = np.random.default_rng(0)
        self.latent: dict[str, np.ndarray] = {}
        self.steps = 0

    def _obs(self) -> dict[str, np.ndarray]:
        out = {}
        for key, latent in self.latent.items():
            if key in self.images:
                out[key] = latent.astype(np.float32)
            else:
                a, b = self.maps[key]
                out[key] = ((latent - b) / a).astype(np.float32)
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.rng = np.random.default_rng(seed)
        self.latent = {
            key: self.rng.uniform(0.0, 1.0, shape) if key in self.images
            else self.rng.uniform(-0.5, 0.5, shape)
            for key, shape in self.spec_shapes.items()
        }  # fmt: skip
        self.steps = 0
        return self._obs(), {}

    def step(self, action):
        self.steps += 1
        for key, latent in self.latent.items():
            drift = self.rng.normal(0.0, 0.05, latent.shape)
            low, high = (0.0, 1.0) if key in self.images else (-0.9, 0.9)
            self.latent[key] = np.clip(latent + drift, low, high)
        done = self.steps >= self.length
        return self._obs(), 0.0, done, False, {"is_success": False}

    def render(self):
        return np.zeros((8, 8, 3), np.uint8)


def steps_of(policy, seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` consecutive observation steps of an :class:`ObservationWalk`."""
    env = ObservationWalk(policy, length=count + 1)
    obs, _ = env.reset(seed=seed)
    out = [copy.deepcopy(obs)]
    for _ in range(count - 1):
        obs, *_ = env.step(np.zeros(policy.action_dim, np.float32))
        out.append(copy.deepcopy(obs))
    return out
