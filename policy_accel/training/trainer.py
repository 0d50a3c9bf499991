"""Train DiffusionPolicy's low-dim UNet policy (``DiffusionUnetLowdimPolicy``, global-conditioned
on the observation history) on a replay buffer, the way the paper's workspace does:

* windows of ``horizon`` steps padded at episode edges (:mod:`policy_accel.data.sequence`);
* a ``LinearNormalizer`` fitted with mode ``limits`` (to [-1, 1]) on all observations and actions;
* the DDPM epsilon loss (squaredcos_cap_v2, 100 train steps), AdamW (betas 0.95/0.999, weight
  decay 1e-6), a cosine learning rate with linear warm-up, and the EMA of the weights (power 0.75)
  that evaluation uses.

Training stops at ``max_steps`` or after ``max_minutes`` (whichever comes first) and resumes
from ``<output>/latest.ckpt``. Checkpoints are written in DiffusionPolicy's workspace payload
layout (``cfg`` + ``state_dicts`` {model, ema_model, optimizer}), which the original code loads,
and converted to this package's safe format in ``<output>/policy/``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from omegaconf import OmegaConf
from torch import Tensor, nn

from policy_accel.data import ReplayBuffer, SequenceDataset
from policy_accel.policies.loading import convert
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.policies.normalizer import LinearNormalizer
from policy_accel.policies.pickle_safe import read_checkpoint
from policy_accel.training.ema import EMAModel

UNET_LOWDIM_POLICY = (
    "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
)
UNET_TARGET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
DDPM_TARGET = "diffusers.schedulers.scheduling_ddpm.DDPMScheduler"
WORKSPACE_TARGET = (
    "diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace."
    "TrainDiffusionUnetLowdimWorkspace"
)
LATEST = "latest.ckpt"


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the paper's PushT low-dim recipe at a CPU size."""

    dataset: str
    output: str
    task_name: str = "pusht"
    obs_key: str = "obs"
    action_key: str = "action"
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    down_dims: tuple[int, ...] = (64, 128, 256)
    diffusion_step_embed_dim: int = 128
    kernel_size: int = 5
    n_groups: int = 8
    num_train_timesteps: int = 100
    batch_size: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    lr_warmup_steps: int = 500
    max_steps: int = 20000
    max_minutes: float | None = None
    ema_power: float = 0.75
    seed: int = 42
    checkpoint_every_minutes: float = 5.0
    log_every: int = 100
    num_threads: int = 1
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    checkpoint: Path
    policy_dir: Path
    global_step: int
    elapsed_s: float
    losses: list[float]


class _PolicyModules(nn.Module):
    """The state-dict layout of upstream ``DiffusionUnetLowdimPolicy`` (``model.*``,
    ``normalizer.*`` and the two empty bookkeeping parameters its mixins register)."""

    def __init__(self, model: nn.Module, normalizer: LinearNormalizer) -> None:
        super().__init__()
        self.model = model
        self.normalizer = normalizer
        self._dummy_variable = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.mask_generator = nn.Module()
        self.mask_generator._dummy_variable = nn.Parameter(torch.zeros(0), requires_grad=False)


def fit_limits(normalizer: LinearNormalizer, name: str, data: np.ndarray) -> None:
    """DiffusionPolicy's ``mode='limits'`` fit: map each dimension's [min, max] to [-1, 1]; a
    dimension with range below 1e-4 is only centred."""
    flat = torch.as_tensor(data.reshape(-1, data.shape[-1]), dtype=torch.float32)
    low, high = flat.min(0).values, flat.max(0).values
    span = high - low
    ignore = span < 1e-4
    span = torch.where(ignore, torch.full_like(span, 2.0), span)
    scale = 2.0 / span
    offset = torch.where(ignore, -low, -1.0 - scale * low)
    field = normalizer.params_dict[name]
    with torch.no_grad():
        field["scale"].copy_(scale)
        field["offset"].copy_(offset)
        stats = field["input_stats"]
        stats["min"].copy_(low)
        stats["max"].copy_(high)
        stats["mean"].copy_(flat.mean(0))
        stats["std"].copy_(flat.std(0))


def policy_config(config: TrainConfig, obs_dim: int, action_dim: int) -> dict:
    """``cfg.policy`` as upstream's hydra config resolves it."""
    return {
        "_target_": UNET_LOWDIM_POLICY,
        "model": {
            "_target_": UNET_TARGET,
            "input_dim": action_dim,
            "local_cond_dim": None,
            "global_cond_dim": obs_dim * config.n_obs_steps,
            "diffusion_step_embed_dim": config.diffusion_step_embed_dim,
            "down_dims": list(config.down_dims),
            "kernel_size": config.kernel_size,
            "n_groups": config.n_groups,
            "cond_predict_scale": True,
        },
        "noise_scheduler": {
            "_target_": DDPM_TARGET,
            "num_train_timesteps": config.num_train_timesteps,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "squaredcos_cap_v2",
            "variance_type": "fixed_small",
            "clip_sample": True,
            "prediction_type": "epsilon",
        },
        "horizon": config.horizon,
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "n_action_steps": config.n_action_steps,
        "n_obs_steps": config.n_obs_steps,
        "num_inference_steps": config.num_train_timesteps,
        "obs_as_local_cond": False,
        "obs_as_global_cond": True,
        "pred_action_steps_only": False,
        "oa_step_convention": True,
    }


def workspace_config(config: TrainConfig, obs_dim: int, action_dim: int) -> dict:
    """The workspace ``cfg`` saved in the checkpoint (the sections upstream's loader reads, and
    this run's hyperparameters for the record)."""
    return {
        "name": "train_diffusion_unet_lowdim",
        "_target_": WORKSPACE_TARGET,
        "task_name": config.task_name,
        "obs_dim": obs_dim,
        "action_dim": action_dim,
        "horizon": config.horizon,
        "n_obs_steps": config.n_obs_steps,
        "n_action_steps": config.n_action_steps,
        "n_latency_steps": 0,
        "obs_as_global_cond": True,
        "policy": policy_config(config, obs_dim, action_dim),
        "ema": {
            "_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel",
            "update_after_step": 0,
            "inv_gamma": 1.0,
            "power": config.ema_power,
            "min_value": 0.0,
            "max_value": 0.9999,
        },
        "dataloader": {"batch_size": config.batch_size, "shuffle": True},
        "optimizer": {
            "_target_": "torch.optim.AdamW",
            "lr": config.lr,
            "betas": list(config.betas),
            "eps": 1e-8,
            "weight_decay": config.weight_decay,
        },
        "training": {
            "device": config.device,
            "seed": config.seed,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": config.lr_warmup_steps,
            "max_train_steps": config.max_steps,
            "use_ema": True,
        },
        "task": {"name": config.task_name, "dataset": {"zarr_path": config.dataset}},
        "policy_accel": {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(config).items()
        },
    }


def _build(config: TrainConfig, obs_dim: int, action_dim: int) -> _PolicyModules:
    model_cfg = dict(policy_config(config, obs_dim, action_dim)["model"])
    model_cfg.pop("_target_")
    model_cfg["down_dims"] = tuple(model_cfg["down_dims"])
    normalizer = LinearNormalizer({"obs": obs_dim, "action": action_dim})
    return _PolicyModules(ConditionalUnet1D(**model_cfg), normalizer)


def _save(path: Path, cfg: dict, modules, ema, optimizer, lr_scheduler, state: dict) -> None:
    payload = {
        "cfg": OmegaConf.create(cfg),
        "state_dicts": {
            "model": modules.state_dict(),
            "ema_model": ema.averaged_model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        "pickles": {},
        "policy_accel_state": {**state, "lr_scheduler": lr_scheduler.state_dict()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) training; returns where the checkpoint and the safe policy are."""
    torch.set_num_threads(config.num_threads)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    buffer = ReplayBuffer.load(config.dataset, keys=[config.obs_key, config.action_key])
    obs = buffer[config.obs_key].astype(np.float32)
    action = buffer[config.action_key].astype(np.float32)
    if obs.ndim != 2 or action.ndim != 2:
        raise ValueError(
            f"{config.dataset}: the low-dim trainer needs flat (steps, dim) arrays, got "
            f"{config.obs_key} {obs.shape} and {config.action_key} {action.shape}."
        )
    obs_dim, action_dim = obs.shape[1], action.shape[1]
    dataset = SequenceDataset(
        {"obs": obs, "action": action},
        buffer.episode_ends,
        config.horizon,
        pad_before=config.n_obs_steps - 1,
        pad_after=config.n_action_steps - 1,
    )
    device = torch.device(config.device)
    cfg = workspace_config(config, obs_dim, action_dim)
    torch.manual_seed(config.seed)
    modules = _build(config, obs_dim, action_dim)
    fit_limits(modules.normalizer, "obs", obs)
    fit_limits(modules.normalizer, "action", action)
    ema_modules = _build(config, obs_dim, action_dim)
    ema_modules.load_state_dict(modules.state_dict())
    modules.to(device).train()
    ema_modules.to(device)
    ema = EMAModel(ema_modules, power=config.ema_power)
    optimizer = torch.optim.AdamW(
        modules.model.parameters(),
        lr=config.lr,
        betas=config.betas,
        eps=1e-8,
        weight_decay=config.weight_decay,
    )
    lr_scheduler = get_scheduler(
        "cosine",
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_steps,
    )
    noise_scheduler = DDPMScheduler(
        **{k: v for k, v in cfg["policy"]["noise_scheduler"].items() if k != "_target_"}
    )
    generator = torch.Generator().manual_seed(config.seed)
    step, elapsed, losses = 0, 0.0, []

    checkpoint = output / LATEST
    if checkpoint.exists():
        payload = read_checkpoint(checkpoint)
        modules.load_state_dict(payload["state_dicts"]["model"])
        ema_modules.load_state_dict(payload["state_dicts"]["ema_model"])
        optimizer.load_state_dict(payload["state_dicts"]["optimizer"])
        state = payload["policy_accel_state"]
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        step, elapsed, losses = state["global_step"], state["elapsed_s"], list(state["losses"])
        ema.optimization_step = step
        generator.set_state(state["generator"])
        log(f"resumed {checkpoint} at step {step} ({elapsed / 60:.1f} min trained)")

    n_params = sum(p.numel() for p in modules.model.parameters())
    log(
        f"training {config.task_name}: {buffer.n_episodes} episodes, {len(dataset)} windows, "
        f"{n_params / 1e6:.2f}M parameters, batch {config.batch_size}, {config.max_steps} steps"
    )

    def state() -> dict:
        return {
            "global_step": step,
            "elapsed_s": elapsed,
            "losses": losses,
            "generator": generator.get_state(),
        }

    budget_s = math.inf if config.max_minutes is None else config.max_minutes * 60
    last_save = time.perf_counter()
    running: list[float] = []
    order = torch.randperm(len(dataset), generator=generator)
    cursor = 0
    while step < config.max_steps and elapsed < budget_s:
        start = time.perf_counter()
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(dataset), generator=generator), 0
        batch = dataset[order[cursor : cursor + config.batch_size].numpy()]
        cursor += config.batch_size
        loss = _loss(modules, noise_scheduler, batch, config, generator, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        ema.step(modules)
        step += 1
        running.append(loss.item())
        elapsed += time.perf_counter() - start
        if step % config.log_every == 0 or step == config.max_steps:
            losses.append(float(np.mean(running)))
            running = []
            log(
                f"step {step} loss {losses[-1]:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e} "
                f"{elapsed / 60:.1f} min"
            )
        if time.perf_counter() - last_save > config.checkpoint_every_minutes * 60:
            _save(checkpoint, cfg, modules, ema, optimizer, lr_scheduler, state())
            last_save = time.perf_counter()
    _save(checkpoint, cfg, modules, ema, optimizer, lr_scheduler, state())
    # a resumed run replaces the policy folder it wrote before, as a whole
    policy_dir = convert(checkpoint, output / "policy", overwrite=True)
    (output / "train_log.json").write_text(
        json.dumps({"global_step": step, "elapsed_s": elapsed, "losses": losses}, indent=1)
    )
    log(f"saved {checkpoint} and {policy_dir} at step {step} ({elapsed / 60:.1f} min)")
    return TrainResult(checkpoint, policy_dir, step, elapsed, losses)


def _loss(
    modules: _PolicyModules,
    noise_scheduler: DDPMScheduler,
    batch: dict[str, np.ndarray],
    config: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """Upstream ``compute_loss`` with global conditioning: epsilon MSE on the whole action
    window, conditioned on the first ``n_obs_steps`` normalised observations."""
    nobs = modules.normalizer.normalize("obs", torch.as_tensor(batch["obs"], device=device))
    trajectory = modules.normalizer.normalize(
        "action", torch.as_tensor(batch["action"], device=device)
    )
    size = trajectory.shape[0]
    global_cond = nobs[:, : config.n_obs_steps].reshape(size, -1)
    noise = torch.randn(trajectory.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (size,), generator=generator
    ).to(device)
    noisy = noise_scheduler.add_noise(trajectory, noise, timesteps)
    prediction = modules.model(noisy, timesteps, global_cond=global_cond)
    return F.mse_loss(prediction, noise)
