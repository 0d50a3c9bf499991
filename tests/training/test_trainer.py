"""The trainer: loss goes down, checkpoints have upstream's layout, load, act and resume."""

import json

import numpy as np
import pytest
import torch

from policy_accel.cli import main
from policy_accel.data import ReplayBuffer
from policy_accel.policies import load_policy
from policy_accel.policies.normalizer import LinearNormalizer
from policy_accel.policies.pickle_safe import read_checkpoint
from policy_accel.training import TrainConfig, train
from policy_accel.training.ema import EMAModel
from policy_accel.training.trainer import fit_limits
from tests.shared_fixtures import FIXTURES

UPSTREAM = FIXTURES / "diffusion_policy" / "unet_lowdim_global" / "meta.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """PushT-shaped data (obs 20, action 2) where the action is a function of the observation."""
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer()
    for _ in range(6):
        obs = rng.uniform(0, 512, size=(40, 20)).astype(np.float32)
        action = (obs[:, 18:20] * 0.5 + 100).astype(np.float32)
        buffer.add_episode({"obs": obs, "action": action})
    return buffer.save(tmp_path_factory.mktemp("data") / "demos.zarr")


def _config(dataset, output, **overrides):
    values = dict(
        dataset=str(dataset),
        output=str(output),
        down_dims=(16, 32, 64),
        diffusion_step_embed_dim=32,
        batch_size=32,
        lr=1e-3,
        lr_warmup_steps=5,
        max_steps=150,
        log_every=50,
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    return train(_config(dataset, output), log=lambda _: None)


def test_loss_decreases(run):
    assert len(run.losses) == 3
    assert run.losses[-1] < 0.7 * run.losses[0]


def test_checkpoint_has_upstream_payload_layout(run):
    payload = read_checkpoint(run.checkpoint)
    assert {"cfg", "state_dicts", "pickles"} <= set(payload)
    assert set(payload["state_dicts"]) == {"model", "ema_model", "optimizer"}
    assert payload["cfg"]["training"]["use_ema"] is True
    ema = payload["state_dicts"]["ema_model"]
    if UPSTREAM.exists():  # same architecture as the upstream fixture: same keys and shapes
        upstream = json.loads(UPSTREAM.read_text())["state_dict_keys"]
        assert {k: list(v.shape) for k, v in ema.items()} == upstream
    assert not torch.equal(
        ema["model.final_conv.1.weight"],
        payload["state_dicts"]["model"]["model.final_conv.1.weight"],
    )


def test_both_formats_load_and_act_identically(run):
    ckpt, safe = load_policy(run.checkpoint), load_policy(run.policy_dir)
    obs = {"obs": torch.rand(2, 2, 20) * 512}
    x_T = torch.randn(2, 16, 2)
    noise = torch.randn(100, 2, 16, 2)
    a = ckpt.predict_action(obs, x_T=x_T, noise=noise)["action"]
    b = safe.predict_action(obs, x_T=x_T, noise=noise)["action"]
    assert a.shape == (2, 8, 2) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_resume_continues_from_the_saved_step(run, dataset, tmp_path):
    first = train(_config(dataset, tmp_path, max_steps=20), log=lambda _: None)
    assert first.global_step == 20
    messages = []
    resumed = train(_config(dataset, tmp_path, max_steps=40), log=messages.append)
    assert resumed.global_step == 40 and "resumed" in messages[0]


def test_time_budget_stops_training(dataset, tmp_path):
    result = train(_config(dataset, tmp_path, max_steps=10_000, max_minutes=0.02), lambda _: 0)
    assert 0 < result.global_step < 10_000


def test_limits_normalizer_maps_the_data_range_to_unit_interval():
    data = np.array([[0.0, 5.0], [10.0, 5.0]], dtype=np.float32)
    normalizer = LinearNormalizer({"x": 2})
    fit_limits(normalizer, "x", data)
    out = normalizer.normalize("x", torch.as_tensor(data))
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out[:, 1], torch.tensor([0.0, 0.0]))  # constant dim: centred


def test_ema_follows_upstream_decay_schedule():
    model = torch.nn.Linear(1, 1)
    ema = EMAModel(torch.nn.Linear(1, 1), power=0.75)
    assert ema.get_decay(0) == 0.0 and ema.get_decay(1) == 0.0
    assert ema.get_decay(2) == pytest.approx(1 - 2**-0.75)
    ema.step(model)  # decay 0: a copy
    torch.testing.assert_close(ema.averaged_model.weight, model.weight)


def test_train_command(dataset, tmp_path, capsys):
    code = main(
        [
            "train",
            str(dataset),
            str(tmp_path),
            "--steps",
            "3",
            "--down-dims",
            "16",
            "32",
            "--step-embed-dim",
            "32",
            "--batch-size",
            "8",
            "--warmup",
            "1",
        ]
    )
    assert code == 0 and (tmp_path / "policy" / "model.safetensors").is_file()
    assert "saved" in capsys.readouterr().out
