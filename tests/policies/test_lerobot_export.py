"""Shipped checkpoints written in LeRobot's format: our own LeRobot loader reads the export back
to the same policy (LeRobot itself loading it is tested in tests/integrations, .venv-lerobot)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from policy_accel.cli import main
from policy_accel.policies.errors import CheckpointContentError
from policy_accel.policies.lerobot_export import export_lerobot, robot_state_size
from policy_accel.policies.loading import load_policy
from policy_accel.sampling import sample

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.mark.parametrize("name", ["pusht_keypoints", "lift_lowdim"])
def test_export_round_trip_gives_the_same_samples(name, tmp_path):
    source = load_policy(CHECKPOINTS / name)
    k = robot_state_size(json.loads((CHECKPOINTS / name / "env.json").read_text())["env"])
    exported = load_policy(export_lerobot(source, tmp_path / name, k))
    assert type(exported).__name__ == "LeRobotDiffusionPolicy"
    assert exported.num_inference_steps == source.num_inference_steps
    generator = torch.Generator().manual_seed(0)
    obs = source.normalizer.unnormalize("obs", torch.rand(2, source.n_obs_steps, source.obs_dim,
                                                          generator=generator) * 2 - 1)  # fmt: skip
    x_T, noise = source.draw_noise(generator, 2, 10)
    ours = sample(source.problem({"obs": obs}, x_T=x_T, noise=noise, num_inference_steps=10),
                  "sequential").sample  # fmt: skip
    frames = {"observation.state": obs[..., -k:], "observation.environment_state": obs[..., :-k]}
    theirs = sample(exported.problem(frames, x_T=x_T, noise=noise, num_inference_steps=10),
                    "sequential").sample  # fmt: skip
    assert (ours - theirs).abs().max() <= 1e-5
    torch.testing.assert_close(
        source.unnormalize_action(ours), exported.unnormalize_action(theirs), atol=1e-3, rtol=0
    )


def test_the_cli_reads_the_task_and_refuses_what_lerobot_cannot_express(tmp_path, capsys):
    assert main(["export-lerobot", str(CHECKPOINTS / "pusht_keypoints"), str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["input_features"]["observation.state"]["shape"] == [2]
    assert config["input_features"]["observation.environment_state"]["shape"] == [18]
    assert "LeRobot" in capsys.readouterr().out
    policy = load_policy(CHECKPOINTS / "pusht_keypoints")
    policy.oa_step_convention = False
    with pytest.raises(CheckpointContentError, match="oa_step_convention"):
        export_lerobot(policy, tmp_path / "b", 2)
    with pytest.raises(ValueError, match="state_size must be in 1..19"):
        export_lerobot(load_policy(CHECKPOINTS / "pusht_keypoints"), tmp_path / "c", 20)
