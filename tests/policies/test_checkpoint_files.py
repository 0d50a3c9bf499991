"""Checkpoint files: the restricted unpickler, corrupt files, conversion to the safe format."""

from __future__ import annotations

import lzma
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from policy_accel import load_policy
from policy_accel.cli import main as cli
from policy_accel.policies.diffusion_policy import CheckpointContentError
from policy_accel.policies.loading import convert
from policy_accel.policies.pickle_safe import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_checkpoint,
)
from tests.shared_fixtures import FIXTURES, require

FIXTURE = FIXTURES / "diffusion_policy" / "unet_lowdim_global"
require(FIXTURE)


class Payload:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_checkpoint_naming_os_system_is_refused_before_anything_runs(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"cfg": {}, "state_dicts": {}, "x": Payload(marker)},
        path,
        _use_new_zipfile_serialization=zipped,
    )
    with pytest.raises(
        UnsafeCheckpointError, match=r"evil.ckpt refers to the global (posix|os)\.system"
    ):
        load_policy(path)
    assert not marker.exists()
    # the same file really is malicious: a plain unpickler runs the command
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(FIXTURE.joinpath("model.ckpt").read_bytes()[:100_000])
    with pytest.raises(
        CheckpointFormatError, match=r"cut.ckpt is not a readable torch checkpoint.*truncated"
    ):
        load_policy(path)


def test_a_foreign_pickle_layout_is_named(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointFormatError, match="not a DiffusionPolicy workspace checkpoint"):
        load_policy(path)


def test_unknown_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointFormatError, match="without policy_accel.json .* or config.json"):
        load_policy(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format"):
        load_policy(tmp_path / "model.pt")


def _actions(policy):
    cases = np.load(FIXTURE / "cases.npz")
    x_T = torch.from_numpy(cases["ddim8__noise_init"])
    generator = torch.Generator().manual_seed(0)
    obs = {"obs": cases["obs"]}
    return policy.predict_action(obs, x_T=x_T, generator=generator, num_inference_steps=8)["action"]


def test_compressed_checkpoint_loads(tmp_path):
    path = tmp_path / "model.ckpt.xz"
    path.write_bytes(lzma.compress(FIXTURE.joinpath("model.ckpt").read_bytes(), preset=1))
    assert torch.equal(_actions(load_policy(path)), _actions(load_policy(FIXTURE / "model.ckpt")))
    (tmp_path / "bad.ckpt.xz").write_bytes(b"not xz")
    with pytest.raises(CheckpointFormatError, match="bad.ckpt.xz is not a valid .xz file"):
        load_policy(tmp_path / "bad.ckpt.xz")


def test_converted_checkpoint_loads_without_unpickling_and_acts_identically(tmp_path, monkeypatch):
    destination = tmp_path / "converted"
    assert cli(["convert", str(FIXTURE / "model.ckpt"), str(destination)]) == 0
    assert sorted(p.name for p in destination.iterdir()) == [
        "model.safetensors",
        "policy_accel.json",
    ]
    import policy_accel.policies.pickle_safe as pickle_safe

    def forbidden(*args, **kwargs):
        raise AssertionError("the safe format must not unpickle")

    monkeypatch.setattr(pickle_safe.RestrictedUnpickler, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    converted = load_policy(destination)
    monkeypatch.undo()
    assert torch.equal(_actions(converted), _actions(load_policy(FIXTURE / "model.ckpt")))


def test_converted_files_with_a_wrong_shape_or_truncation_are_named(tmp_path):
    destination = convert(FIXTURE / "model.ckpt", tmp_path / "converted")
    weights = destination / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.final_conv.1.bias"] = torch.zeros(3)
    save_file(tensors, str(weights))
    with pytest.raises(
        CheckpointContentError, match=r"model.final_conv.1.bias: file \(3,\) vs model \(2,\)"
    ):
        load_policy(destination)
    del tensors["model.final_conv.1.bias"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointContentError, match=r"missing keys \['model.final_conv.1.bias'\]"):
        load_policy(destination)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        CheckpointFormatError, match="model.safetensors is not a readable safetensors file"
    ):
        load_policy(destination)


def test_convert_refuses_directories_and_reports_on_the_command_line(tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    assert cli(["convert", str(copy), str(tmp_path / "out")]) == 2
    assert "only DiffusionPolicy .ckpt files need converting" in capsys.readouterr().err


def test_the_checkpoint_config_is_plain_data():
    payload = read_checkpoint(FIXTURE / "model.ckpt")
    assert isinstance(payload["cfg"], dict) and payload["cfg"]["training"]["use_ema"] is True
    assert set(payload["state_dicts"]) == {"model", "ema_model", "optimizer"}
