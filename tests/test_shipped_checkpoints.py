"""Every shipped checkpoint loads, acts in its env, has a model card and stays small."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import envs
from policy_accel.control import Controller
from policy_accel.policies import load_policy

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED = sorted(path.parent for path in CHECKPOINTS.glob("*/env.json"))


def test_the_promised_checkpoints_are_shipped():
    assert {"pusht_keypoints", "lift_lowdim", "can_lowdim", "square_lowdim"} <= {
        path.name for path in SHIPPED
    }


@pytest.mark.parametrize("directory", SHIPPED, ids=lambda p: p.name)
def test_checkpoint_loads_and_acts_in_its_env(directory):
    spec = json.loads((directory / "env.json").read_text())
    policy = load_policy(directory)
    assert policy.num_inference_steps == 100
    env = envs.make(spec["env"], obs=spec.get("obs"), **spec.get("env_kwargs", {}))
    obs, _ = env.reset(seed=spec["eval_seed"])
    controller = Controller(policy, method="picard", seed=0)
    action = controller.act(obs)
    assert action.shape == env.action_space.shape and np.all(np.isfinite(action))
    # the policy's actions live where the demonstrations' did (normalizer limits)
    field = policy.normalizer.params_dict["action"]["input_stats"]
    low, high = field["min"], field["max"]
    span = high - low
    assert torch.all(torch.as_tensor(action) >= low - 0.5 * span)
    assert torch.all(torch.as_tensor(action) <= high + 0.5 * span)
    env.step(action)
    env.close()


@pytest.mark.parametrize("directory", SHIPPED, ids=lambda p: p.name)
def test_checkpoint_has_a_model_card_and_small_files(directory):
    card = (directory / "README.md").read_text()
    for section in ("Data", "Training", "Reproduce", "Results"):
        assert f"## {section}" in card, section
    assert "policy-accel train" in card and "policy-accel demos" in card
    for path in directory.iterdir():
        assert path.stat().st_size < 25 * 1024 * 1024, path
