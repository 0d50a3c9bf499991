"""DiffusionPolicy (real-stanford) low-dimensional policies, rebuilt from ``cfg.policy``.

Supports ``DiffusionUnetLowdimPolicy`` (``ConditionalUnet1D``; global, local or inpainting
conditioning; ``pred_action_steps_only``; ``oa_step_convention``) and
``DiffusionTransformerLowdimPolicy`` (``TransformerForDiffusion``; ``obs_as_cond`` or
inpainting), with prediction types epsilon and sample. Observations follow upstream:
``{"obs": [B, >=n_obs_steps, obs_dim]}`` in environment units; the first ``n_obs_steps`` steps
condition the sample, exactly as ``predict_action`` does upstream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policy_accel.policies.base import Conditioning, Policy
from policy_accel.policies.errors import CheckpointContentError
from policy_accel.policies.networks.transformer import TransformerForDiffusion
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.policies.normalizer import LinearNormalizer
from policy_accel.policies.validation import (
    check_action_window,
    int_list,
    load_weights,
    naming_the_file,
    positive_int,
)
from policy_accel.sampling.rules import SUPPORTED_SCHEDULERS
from policy_accel.sampling.schedulers import build_scheduler as build_named_scheduler

UNET_POLICY = "DiffusionUnetLowdimPolicy"
TRANSFORMER_POLICY = "DiffusionTransformerLowdimPolicy"
IMAGE_POLICIES = ("DiffusionUnetHybridImagePolicy", "DiffusionUnetImagePolicy")


def class_name(spec: dict, what: str) -> str:
    target = spec.get("_target_") if isinstance(spec, dict) else None
    if not isinstance(target, str):
        raise CheckpointContentError(f"{what} has no '_target_' class path.")
    return target.rsplit(".", 1)[-1]


def build_scheduler(spec: dict, source: str = "checkpoint"):
    """A diffusers scheduler from a hydra spec, by class name only (nothing is imported by path)."""
    name = class_name(spec, "cfg.policy.noise_scheduler")
    if name not in SUPPORTED_SCHEDULERS:
        raise CheckpointContentError(
            f"noise scheduler {name} is not supported; expected one of "
            f"{sorted(SUPPORTED_SCHEDULERS)}."
        )
    options = {k: v for k, v in spec.items() if k != "_target_"}
    if "num_train_timesteps" in options:
        positive_int(
            options["num_train_timesteps"],
            "cfg.policy.noise_scheduler.num_train_timesteps",
            source,
            "train_timesteps",
        )
    return build_named_scheduler(name, **options)


def inference_steps(policy_cfg: dict, scheduler, source: str) -> int:
    """``cfg.policy.num_inference_steps`` (default: every training step), validated."""
    train_steps = int(scheduler.config.num_train_timesteps)
    steps = policy_cfg.get("num_inference_steps") or train_steps
    positive_int(steps, "cfg.policy.num_inference_steps", source, "train_timesteps")
    if steps > train_steps:
        raise CheckpointContentError(
            f"{source}: cfg.policy.num_inference_steps={steps} exceeds the scheduler's "
            f"num_train_timesteps={train_steps}."
        )
    return steps


def check_model_sizes(model_cfg: dict, source: str) -> None:
    """Bound every integer of ``cfg.policy.model`` before a network is constructed (the
    constructor loops over layers and heads in Python even on the meta device)."""
    layer_counts = ("n_layer", "n_head", "n_cond_layers")
    for key, value in model_cfg.items():
        name = f"cfg.policy.model.{key}"
        if isinstance(value, bool) or value is None or isinstance(value, (float, str)):
            continue
        if isinstance(value, int):
            if value != 0 or key not in (
                "local_cond_dim",
                "global_cond_dim",
                "cond_dim",
                "n_cond_layers",
            ):
                positive_int(value, name, source, "layers" if key in layer_counts else "width")
        elif isinstance(value, (list, tuple)):
            int_list(value, name, source)


class _Modules(nn.Module):
    """The parameter-holding part of an upstream policy: ``model.*`` and ``normalizer.*``."""

    def __init__(self, model: nn.Module, normalizer: LinearNormalizer) -> None:
        super().__init__()
        self.model = model
        self.normalizer = normalizer


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
        with naming_the_file(source):
            self._read_config(policy_cfg, source)
            network = self._network_factory(policy_cfg, source)
            fields = LinearNormalizer.fields_of(state_dict)
            self._check_normalizer(fields, source)
            modules = load_weights(
                lambda: {"": _Modules(network(), LinearNormalizer(fields))}, state_dict, source
            )[""]
        self.modules = modules.to(self.device).eval()
        self.inpainting = not (self.obs_as_local_cond or self.obs_as_global_cond)

    def _read_config(self, cfg: dict, source: str) -> None:
        """The timeline, sizes and conditioning of ``cfg.policy``, validated."""
        self.horizon = positive_int(cfg["horizon"], "cfg.policy.horizon", source, "horizon")
        self.n_obs_steps = positive_int(
            cfg["n_obs_steps"], "cfg.policy.n_obs_steps", source, "horizon"
        )
        self.n_action_steps = positive_int(
            cfg["n_action_steps"], "cfg.policy.n_action_steps", source, "horizon"
        )
        self.action_dim = positive_int(cfg["action_dim"], "cfg.policy.action_dim", source)
        self.obs_dim = positive_int(cfg["obs_dim"], "cfg.policy.obs_dim", source)
        self.pred_action_steps_only = bool(cfg.get("pred_action_steps_only", False))
        self.scheduler = build_scheduler(cfg["noise_scheduler"], source)
        self.num_inference_steps = inference_steps(cfg, self.scheduler, source)
        if self.kind == UNET_POLICY:
            self.obs_as_local_cond = bool(cfg.get("obs_as_local_cond", False))
            self.obs_as_global_cond = bool(cfg.get("obs_as_global_cond", False))
            self.oa_step_convention = bool(cfg.get("oa_step_convention", False))
        else:
            self.obs_as_local_cond = False
            self.obs_as_global_cond = bool(cfg.get("obs_as_cond", False))
            self.oa_step_convention = True  # the transformer policy starts actions at To - 1
        if self.n_obs_steps > self.horizon:
            raise CheckpointContentError(
                f"{source}: cfg.policy.n_obs_steps={self.n_obs_steps} exceeds the "
                f"horizon={self.horizon}."
            )
        if self.pred_action_steps_only:
            if not self.obs_as_global_cond:
                raise CheckpointContentError(
                    f"{source}: pred_action_steps_only needs obs_as_global_cond (as upstream "
                    "asserts): the sampled chunk then holds only the executed actions."
                )
        else:
            start = self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps
            rule = "horizon - n_obs_steps" + (" + 1" if self.oa_step_convention else "")
            check_action_window(source, self.horizon, start, self.n_action_steps, rule)

    def _network_factory(self, cfg: dict, source: str):
        """A function building the denoising network ``cfg.policy.model`` describes, after its
        sizes are checked against the policy's own."""
        model_cfg = {k: v for k, v in cfg["model"].items() if k != "_target_"}
        check_model_sizes(model_cfg, source)
        Da, Do, To = self.action_dim, self.obs_dim, self.n_obs_steps
        if self.kind == UNET_POLICY:
            model_cfg["down_dims"] = tuple(model_cfg.get("down_dims", (256, 512, 1024)))
            if self.obs_as_global_cond:
                expected = {"input_dim": Da, "global_cond_dim": Do * To}
            elif self.obs_as_local_cond:
                expected = {"input_dim": Da, "local_cond_dim": Do}
            else:
                expected = {"input_dim": Da + Do}
            factory = ConditionalUnet1D
        else:
            if self.obs_as_global_cond:
                expected = {"input_dim": Da, "output_dim": Da, "cond_dim": Do}
            else:
                expected = {"input_dim": Da + Do, "output_dim": Da + Do}
            factory = TransformerForDiffusion
        for key, value in expected.items():
            if model_cfg.get(key) != value:
                raise CheckpointContentError(
                    f"{source}: cfg.policy.model.{key} is {str(model_cfg.get(key))[:20]}, but "
                    f"action_dim={Da}, obs_dim={Do}, n_obs_steps={To} and the conditioning "
                    f"make it {value}. Check the config."
                )
        return lambda: factory(**model_cfg)

    def _check_normalizer(self, fields: dict[str, int], source: str) -> None:
        for key, size in (("obs", self.obs_dim), ("action", self.action_dim)):
            if fields.get(key) != size:
                raise CheckpointContentError(
                    f"{source}: the normalizer's {key!r} field has size {fields.get(key)}, but "
                    f"cfg.policy says {size}. Check that the weights belong to this config."
                )

    @property
    def observation_spec(self) -> dict[str, tuple[int, ...]]:
        return {"obs": (self.obs_dim,)}

    @property
    def normalizer(self) -> LinearNormalizer:
        return self.modules.normalizer

    def normalize_input(self, key: str, value: Tensor) -> Tensor:
        return self.normalizer.normalize("obs", value)

    def observation_range(self, key: str) -> tuple[Tensor, Tensor] | None:
        return self.normalizer.normalized_range("obs")

    @property
    def event_shape(self) -> tuple[int, int]:
        if self.inpainting:  # observations are written into the trajectory's obs channels
            return (self.horizon, self.action_dim + self.obs_dim)
        if self.pred_action_steps_only:
            return (self.n_action_steps, self.action_dim)
        return (self.horizon, self.action_dim)

    @property
    def action_start(self) -> int:
        if self.pred_action_steps_only:
            return 0
        return self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps

    def conditioning(self, obs: dict) -> Conditioning:
        observation = self._observation(obs, "obs", (self.obs_dim,))
        with torch.no_grad():
            nobs = self.normalizer.normalize("obs", observation)[:, : self.n_obs_steps]
        batch = nobs.shape[0]
        network = self.modules.model
        if self.obs_as_local_cond:
            local = torch.zeros(batch, self.horizon, self.obs_dim, device=self.device)
            local[:, : self.n_obs_steps] = nobs
            return Conditioning(network, batch, {"local_cond": local})
        if self.obs_as_global_cond:
            if self.kind == UNET_POLICY:
                return Conditioning(network, batch, {"global_cond": nobs.reshape(batch, -1)})
            return Conditioning(network, batch, {"cond": nobs})
        return Conditioning(network, batch, known=nobs)

    def normalize_action(self, action: Tensor) -> Tensor:
        with torch.no_grad():
            return self.normalizer.normalize("action", action)

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return self.normalizer.unnormalize("action", action)

    def decode_extra(self, x0: Tensor) -> dict[str, Tensor]:
        if not self.inpainting:
            return {}
        obs_pred = self.normalizer.unnormalize("obs", x0[..., self.action_dim :])
        start = self.action_start
        return {
            "obs_pred": obs_pred,
            "action_obs_pred": obs_pred[:, start : start + self.n_action_steps],
        }
