"""One front door for checkpoints: :func:`load_policy` detects the format.

* ``*.ckpt`` / ``*.ckpt.xz``: a DiffusionPolicy workspace checkpoint, read with the restricted
  unpickler (:mod:`policy_accel.policies.pickle_safe`); ``ema_model`` when ``cfg.training.use_ema``.
* a directory with ``policy_accel.json``: this package's safe format (JSON config +
  ``model.safetensors``), written by :func:`convert` / ``policy-accel convert``; no unpickling.
* a directory with ``config.json``: a LeRobot diffusion checkpoint (current processor-file
  format or the legacy one with normalization buffers inside ``model.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from policy_accel.policies.base import Policy
from policy_accel.policies.destination import check_destination, write_directory
from policy_accel.policies.diffusion_policy import (
    IMAGE_POLICIES,
    DiffusionPolicyLowdim,
    class_name,
)
from policy_accel.policies.diffusion_policy_image import DiffusionPolicyImage
from policy_accel.policies.errors import CheckpointContentError, CheckpointFormatError
from policy_accel.policies.pickle_safe import check_no_interpolation, read_checkpoint
from policy_accel.policies.validation import (
    BOOKKEEPING_KEYS,
    check_finite,
    naming_the_file,
    read_json_object,
)

SAFE_CONFIG = "policy_accel.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_FORMAT_VERSION = 1


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> Policy:
    """Load a policy checkpoint of any supported format onto ``device``.

    Checkpoints are read as inert data (no code from the file runs, no config interpolation is
    resolved, memory is bounded by the file's size); every refusal is a
    :class:`~policy_accel.policies.errors.CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        if (path / SAFE_CONFIG).is_file():
            return _load_converted(path, device)
        if (path / "config.json").is_file():
            from policy_accel.policies.lerobot import load_lerobot

            return load_lerobot(path, device=device)
        raise CheckpointFormatError(
            f"{path} is a directory without {SAFE_CONFIG} (policy_accel's safe format) or "
            "config.json (a LeRobot checkpoint); point at the checkpoint directory itself."
        )
    if path.name.endswith((".ckpt", ".ckpt.xz")):
        payload = read_checkpoint(path)
        cfg, state = _policy_and_weights(payload, path)
        return build_diffusion_policy(cfg, state, str(path), device)
    raise CheckpointFormatError(
        f"{path}: unknown checkpoint format. Expected a DiffusionPolicy .ckpt / .ckpt.xz file, a "
        f"LeRobot checkpoint directory (config.json + model.safetensors) or a directory "
        f"written by `policy-accel convert`."
    )


def build_diffusion_policy(cfg: dict, state: dict, source: str, device="cpu") -> Policy:
    """The DiffusionPolicy policy class that ``cfg["_target_"]`` names (image or low-dim)."""
    if not isinstance(cfg, dict):
        raise CheckpointContentError(f"{source}: cfg.policy must be a mapping.")
    check_no_interpolation(cfg, source, "cfg.policy")
    check_finite(cfg, source, "cfg.policy")
    with naming_the_file(source):
        if class_name(cfg, f"{source}: cfg.policy") in IMAGE_POLICIES:
            return DiffusionPolicyImage(cfg, state, source, device=device)
        return DiffusionPolicyLowdim(cfg, state, source, device=device)


def _policy_and_weights(payload: dict, path: Path) -> tuple[dict, dict]:
    cfg = payload["cfg"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("policy"), dict):
        raise CheckpointContentError(f"{path}: cfg has no 'policy' section.")
    training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
    use_ema = bool(training.get("use_ema", False))
    name = "ema_model" if use_ema else "model"
    state_dicts = payload["state_dicts"]
    if not isinstance(state_dicts, dict) or name not in state_dicts:
        found = sorted(map(str, state_dicts))[:10] if isinstance(state_dicts, dict) else None
        raise CheckpointContentError(
            f"{path}: cfg.training.use_ema={use_ema} but state_dicts has no {name!r} "
            f"(it has {found})."
        )
    state = state_dicts[name]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointContentError(
            f"{path}: state_dicts[{name!r}] must map parameter names to tensors."
        )
    return cfg["policy"], state


def convert(source: str | Path, destination: str | Path, *, overwrite: bool = False) -> Path:
    """Write a DiffusionPolicy ``.ckpt`` as ``destination/`` (``policy_accel.json`` +
    ``model.safetensors``), which :func:`load_policy` reads without any unpickling. The policy is
    rebuilt from the file first, so only checkpoints that load are converted.

    The files are written into a new folder renamed into place
    (:func:`~policy_accel.policies.destination.write_directory`): a ``destination`` that holds
    the source or links is refused, and one that holds files is replaced as a whole only with
    ``overwrite=True``."""
    source, destination = Path(source), Path(destination)
    if source.is_dir():
        raise ValueError(
            f"{source} is a directory: LeRobot and converted checkpoints are already safe "
            "(safetensors + JSON); only DiffusionPolicy .ckpt files need converting."
        )
    check_destination(destination, source=source, overwrite=overwrite)  # before the slow read
    payload = read_checkpoint(source)
    cfg, state = _policy_and_weights(payload, source)
    build_diffusion_policy(cfg, state, str(source))  # validates config and weights
    # clone: safetensors refuses tensors that share memory (robomimic's encoders register the
    # same trunk under two names), and each name must load on its own
    tensors = {
        k: v.detach().clone().contiguous() for k, v in state.items() if k not in BOOKKEEPING_KEYS
    }
    config = {
        "format": "diffusion_policy",
        "version": SAFE_FORMAT_VERSION,
        "source": source.name,
        "policy": cfg,
    }
    with write_directory(destination, source=source, overwrite=overwrite) as folder:
        save_file(tensors, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
        (folder / SAFE_CONFIG).write_text(json.dumps(config, indent=2))
    return destination


def _load_converted(path: Path, device) -> Policy:
    config_path, weights_path = path / SAFE_CONFIG, path / SAFE_WEIGHTS
    config = read_json_object(config_path, CheckpointFormatError)
    if config.get("format") != "diffusion_policy" or config.get("version") != SAFE_FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{config_path}: unsupported format {config.get('format')!r} version "
            f"{config.get('version')!r}; expected 'diffusion_policy' version {SAFE_FORMAT_VERSION}."
        )
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing (the weights of {path}).")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointFormatError(
            f"{weights_path} is not a readable safetensors file ({error}); it may be truncated."
        ) from error
    return build_diffusion_policy(config.get("policy"), state, str(path), device)
