"""The LeRobot drop-in against LeRobot itself (run in ``.venv-lerobot``: ``make test-lerobot``;
skipped where lerobot is not installed). Every comparison is with the same live LeRobot
``DiffusionPolicy`` un-patched, through its own processors and ``select_action`` queues."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.shared_fixtures import FIXTURES, require

lerobot = pytest.importorskip("lerobot")
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy  # noqa: E402
from lerobot.policies.factory import make_pre_post_processors  # noqa: E402

from policy_accel.integrations.lerobot import LeRobotSampler, accelerate  # noqa: E402
from policy_accel.sampling import SolverOptionError  # noqa: E402

CHECKPOINT = FIXTURES / "lerobot" / "diffusion_pusht_keypoints"


@pytest.fixture(scope="module")
def frames():
    require(CHECKPOINT)
    cases = np.load(CHECKPOINT / "cases.npz")
    keys = ("observation.state", "observation.environment_state")
    return [
        {key: torch.as_tensor(cases[f"episode__obs__{key}"][step]) for key in keys}
        for step in range(cases["episode__obs__observation.state"].shape[0])
    ]


def load():
    policy = DiffusionPolicy.from_pretrained(CHECKPOINT)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(CHECKPOINT))
    return policy, pre, post


def run_episode(policy, pre, post, frames, seed=0) -> torch.Tensor:
    """LeRobot's rollout loop: preprocess, select_action, postprocess, one frame at a time."""
    policy.reset()
    torch.manual_seed(seed)
    actions = []
    with torch.no_grad():
        for frame in frames:
            actions.append(post(policy.select_action(pre(dict(frame)))))
    return torch.stack(actions)


def test_sequential_equals_lerobot_bit_for_bit(frames):
    policy, pre, post = load()
    reference = run_episode(policy, pre, post, frames, seed=3)
    sampler = accelerate(policy, method="sequential")
    mine = run_episode(policy, pre, post, frames, seed=3)
    assert torch.equal(mine, reference)
    assert [r.rounds for r in sampler.records] == [100, 100]  # replans at steps 0 and 8
    sampler.restore()
    assert "conditional_sample" not in vars(policy.diffusion)
    assert torch.equal(run_episode(policy, pre, post, frames, seed=3), reference)


@pytest.mark.parametrize("method", ["chord", "picard", "taa"])
def test_parallel_solvers_match_lerobot_to_tolerance_and_warm_start(frames, method):
    policy, pre, post = load()
    reference = run_episode(policy, pre, post, frames, seed=4)
    sampler = accelerate(policy, method=method, tolerance=1e-4)
    mine = run_episode(policy, pre, post, frames, seed=4)
    # tolerance 1e-4 in normalized units; PushT's actions span 512 px (x 256 from [-1, 1])
    assert (mine - reference).abs().max() <= 0.1
    assert [r.warm for r in sampler.records] == [False, True]  # the second replan starts warm
    assert sampler.records[1].shift == policy.config.n_action_steps
    assert all(r.converged and r.rounds < 100 for r in sampler.records)


def test_reset_forgets_the_warm_start_and_predict_action_chunk_is_covered(frames):
    policy, pre, post = load()
    sampler = accelerate(policy)
    run_episode(policy, pre, post, frames)
    run_episode(policy, pre, post, frames)  # reset() between episodes: the first plan is cold
    assert [r.warm for r in sampler.records] == [False, True, False, True]
    policy.reset()
    batch = pre({k: v for k, v in frames[0].items()})
    with torch.no_grad():
        policy.select_action(dict(batch))  # fills the queues, plans (cold)
        sampler.executed = 2  # an async caller planning two steps later
        chunk = policy.predict_action_chunk(dict(batch))
    assert chunk.shape[1] == policy.config.n_action_steps
    assert sampler.records[-1].warm and sampler.records[-1].shift == 2


def test_accelerating_twice_replaces_and_bad_inputs_are_named():
    policy, _, _ = load()
    first = accelerate(policy, method="picard")
    second = accelerate(policy, method="chord")
    assert vars(policy.diffusion)["conditional_sample"] is second and first is not second
    assert isinstance(second, LeRobotSampler)
    with pytest.raises(TypeError, match="takes a LeRobot DiffusionPolicy"):
        accelerate(object())
    with pytest.raises(SolverOptionError, match="unknown method .warp."):
        accelerate(policy, method="warp")


@pytest.mark.parametrize("name", ["pusht_keypoints", "lift_lowdim"])
def test_exported_shipped_checkpoints_load_in_lerobot_and_act_the_same(name, tmp_path):
    """``policy-accel export-lerobot``: LeRobot's own from_pretrained and processors on the
    export give the shipped policy's actions for the same noise."""
    import json
    from pathlib import Path

    from policy_accel.policies.lerobot_export import export_lerobot, robot_state_size
    from policy_accel.policies.loading import load_policy
    from policy_accel.sampling import sample

    source = Path(__file__).resolve().parents[2] / "checkpoints" / name
    ours = load_policy(source)
    k = robot_state_size(json.loads((source / "env.json").read_text())["env"])
    directory = export_lerobot(ours, tmp_path / name, k)
    policy = DiffusionPolicy.from_pretrained(directory, strict=True)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(directory))
    obs = torch.randn(2, ours.n_obs_steps, ours.obs_dim, generator=torch.Generator().manual_seed(1))
    obs = ours.normalizer.unnormalize("obs", obs.clamp(-1, 1))  # inside the data's range
    torch.manual_seed(7)
    result = sample(ours.problem({"obs": obs}), "sequential").sample
    start = ours.n_obs_steps - 1
    expected = ours.unnormalize_action(result[:, start : start + ours.n_action_steps])
    frames = {"observation.state": obs[..., -k:], "observation.environment_state": obs[..., :-k]}
    torch.manual_seed(7)
    with torch.no_grad():
        batch = pre({key: value for key, value in frames.items()})
        chunk = post(policy.predict_action_chunk(batch))
    # DESIGN's fixture bound in normalized units (the old 1e-3 environment units was 4e-6
    # normalized for PushT's pixels: two implementations' float32 rounding on one CPU)
    error = (ours.normalize_action(chunk) - ours.normalize_action(expected)).abs().max()
    assert error <= 1e-4
