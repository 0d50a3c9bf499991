"""DiffusionPolicy (real-stanford) low-dimensional policies, rebuilt from ``cfg.policy``.

Supports ``DiffusionUnetLowdimPolicy`` (``ConditionalUnet1D``; global, local or inpainting
conditioning; ``pred_action_steps_only``; ``oa_step_convention``) and
``DiffusionTransformerLowdimPolicy`` (``TransformerForDiffusion``; ``obs_as_cond`` or
inpainting), with prediction types epsilon and sample. Observations follow upstream:
``{"obs": [B, >=n_obs_steps, obs_dim]}`` in environment units; the first ``n_obs_steps`` steps
condition the sample, exactly as ``predict_action`` does upstream.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

from policy_accel.policies.base import Policy
from policy_accel.policies.networks.transformer import TransformerForDiffusion
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.policies.normalizer import LinearNormalizer
from policy_accel.sampling import DenoisingProblem

UNET_POLICY = "DiffusionUnetLowdimPolicy"
TRANSFORMER_POLICY = "DiffusionTransformerLowdimPolicy"
IMAGE_POLICIES = ("DiffusionUnetHybridImagePolicy", "DiffusionUnetImagePolicy")
SCHEDULERS = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
}
# Parameters upstream's ModuleAttrMixin adds for device bookkeeping; they hold nothing.
BOOKKEEPING_KEYS = ("_dummy_variable", "mask_generator._dummy_variable", "model._dummy_variable")


class CheckpointContentError(ValueError):
    """A checkpoint whose configuration or weights do not describe a supported policy."""


def class_name(spec: dict, what: str) -> str:
    target = spec.get("_target_") if isinstance(spec, dict) else None
    if not isinstance(target, str):
        raise CheckpointContentError(f"{what} has no '_target_' class path.")
    return target.rsplit(".", 1)[-1]


def build_scheduler(spec: dict):
    """A diffusers scheduler from a hydra spec, by class name only (nothing is imported by path)."""
    name = class_name(spec, "cfg.policy.noise_scheduler")
    if name not in SCHEDULERS:
        raise CheckpointContentError(
            f"noise scheduler {name} is not supported; expected one of {sorted(SCHEDULERS)}."
        )
    return SCHEDULERS[name](**{k: v for k, v in spec.items() if k != "_target_"})


class _Modules(nn.Module):
    """The parameter-holding part of an upstream policy: ``model.*`` and ``normalizer.*``."""

    def __init__(self, model: nn.Module, normalizer: LinearNormalizer) -> None:
        super().__init__()
        self.model = model
        self.normalizer = normalizer


def load_state_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load every tensor or fail naming the missing, unexpected and mis-shaped keys."""
    state = {k: v for k, v in state_dict.items() if k not in BOOKKEEPING_KEYS}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointContentError(
            f"{source} does not match the policy its config describes. Missing keys: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; unexpected keys: "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; shape mismatches: "
            f"{mismatched[:10]}. Check that the file and its config belong together."
        )
    module.load_state_dict(state, strict=True)


class DiffusionPolicyLowdim(Policy):
    """A low-dimensional DiffusionPolicy policy (UNet or transformer)."""

    def __init__(self, policy_cfg: dict, state_dict: dict[str, Tensor], source: str, device="cpu"):
        self.kind = class_name(policy_cfg, "cfg.policy")
        if self.kind in IMAGE_POLICIES:
            raise CheckpointContentError(
                f"{source}: {self.kind} has image observations; build it with "
                "DiffusionPolicyImage (load_policy picks the class from the config)."
            )
        if self.kind not in (UNET_POLICY, TRANSFORMER_POLICY):
            raise CheckpointContentError(
                f"{source}: policy class {self.kind} is not supported; expected "
                f"{UNET_POLICY} or {TRANSFORMER_POLICY}."
            )
        self.cfg = policy_cfg
        self.source = source
        self.device = torch.device(device)
        self.horizon = int(policy_cfg["horizon"])
        self.n_obs_steps = int(policy_cfg["n_obs_steps"])
        self.n_action_steps = int(policy_cfg["n_action_steps"])
        self.action_dim = int(policy_cfg["action_dim"])
        self.obs_dim = int(policy_cfg["obs_dim"])
        self.pred_action_steps_only = bool(policy_cfg.get("pred_action_steps_only", False))
        self.scheduler = build_scheduler(policy_cfg["noise_scheduler"])
        steps = policy_cfg.get("num_inference_steps")
        self.num_inference_steps = int(steps or self.scheduler.config.num_train_timesteps)
        model_cfg = {k: v for k, v in policy_cfg["model"].items() if k != "_target_"}
        if self.kind == UNET_POLICY:
            self.obs_as_local_cond = bool(policy_cfg.get("obs_as_local_cond", False))
            self.obs_as_global_cond = bool(policy_cfg.get("obs_as_global_cond", False))
            self.oa_step_convention = bool(policy_cfg.get("oa_step_convention", False))
            model_cfg["down_dims"] = tuple(model_cfg.get("down_dims", (256, 512, 1024)))
            network = ConditionalUnet1D(**model_cfg)
        else:
            self.obs_as_local_cond = False
            self.obs_as_global_cond = bool(policy_cfg.get("obs_as_cond", False))
            self.oa_step_convention = True  # the transformer policy starts actions at To - 1
            network = TransformerForDiffusion(**model_cfg)
        fields = LinearNormalizer.fields_of(state_dict)
        modules = _Modules(network, LinearNormalizer(fields))
        load_state_strict(modules, state_dict, source)
        self.modules = modules.to(self.device).eval()
        self.inpainting = not (self.obs_as_local_cond or self.obs_as_global_cond)

    @property
    def observation_spec(self) -> dict[str, tuple[int, ...]]:
        return {"obs": (self.obs_dim,)}

    @property
    def normalizer(self) -> LinearNormalizer:
        return self.modules.normalizer

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
        observation = self._observation(obs, "obs", (self.obs_dim,))
        To, Da, Do = self.n_obs_steps, self.action_dim, self.obs_dim
        with torch.no_grad():
            nobs = self.normalizer.normalize("obs", observation)[:, :To]
        batch = nobs.shape[0]
        context: dict[str, Tensor] = {}
        inpaint = None
        if self.obs_as_local_cond:
            local = torch.zeros(batch, self.horizon, Do, device=self.device)
            local[:, :To] = nobs
            context["local_cond"] = local
            shape = (batch, self.horizon, Da)
        elif self.obs_as_global_cond:
            if self.kind == UNET_POLICY:
                context["global_cond"] = nobs.reshape(batch, -1)
            else:
                context["cond"] = nobs
            steps = self.n_action_steps if self.pred_action_steps_only else self.horizon
            shape = (batch, steps, Da)
        else:  # inpainting: observations are written into the trajectory's obs channels
            shape = (batch, self.horizon, Da + Do)
            inpaint = nobs
        return self._conditioned_problem(
            self.modules.model,
            context,
            shape,
            inpaint=inpaint,
            x_T=x_T,
            noise=noise,
            generator=generator,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
        )

    def normalize_action(self, action: Tensor) -> Tensor:
        with torch.no_grad():
            return self.normalizer.normalize("action", action)

    def decode(self, x0: Tensor) -> dict[str, Tensor]:
        Da, To = self.action_dim, self.n_obs_steps
        with torch.no_grad():
            action_pred = self.normalizer.unnormalize("action", x0[..., :Da])
            if self.pred_action_steps_only:
                start = 0
                action = action_pred
            else:
                start = To - 1 if self.oa_step_convention else To
                action = action_pred[:, start : start + self.n_action_steps]
            result = {"action": action, "action_pred": action_pred}
            if self.inpainting:
                obs_pred = self.normalizer.unnormalize("obs", x0[..., Da:])
                result["obs_pred"] = obs_pred
                result["action_obs_pred"] = obs_pred[:, start : start + self.n_action_steps]
        return result
