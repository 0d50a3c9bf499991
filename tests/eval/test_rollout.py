"""Lockstep rollouts: episodes end independently, metrics use DP/LeRobot names, samplers see the
same noise."""

import numpy as np
import pytest

from policy_accel.eval import run_episodes, summarize


def test_episodes_run_to_their_own_end(tiny_pusht_policy):
    kwargs = {"env_kwargs": {"max_episode_steps": 20}, "record_actions": True}
    results = run_episodes(tiny_pusht_policy, "pusht", [1, 2], **kwargs)
    assert [r.seed for r in results] == [1, 2]
    for result in results:
        assert result.steps == 20 and len(result.rounds) == 3  # 8 + 8 + 4 executed
        assert result.rounds == [10, 10, 10]  # sequential: one round per denoising step
        assert result.actions[0].shape == (8, 2)
        assert 0.0 <= result.max_reward <= 1.0 and result.coverage is not None
    summary = summarize(results)
    assert summary["pc_success"] == 0.0 and summary["n_episodes"] == 2
    assert summary["mean_score"] == pytest.approx(np.mean([r.max_reward for r in results]))


def test_same_seeds_give_the_same_noise_whatever_the_batch(tiny_pusht_policy):
    kwargs = {"env_kwargs": {"max_episode_steps": 8}, "record_actions": True}
    alone = run_episodes(tiny_pusht_policy, "pusht", [2], **kwargs)
    together = run_episodes(tiny_pusht_policy, "pusht", [1, 2], **kwargs)
    np.testing.assert_allclose(alone[0].actions[0], together[1].actions[0], atol=1e-4)
    other_noise = run_episodes(tiny_pusht_policy, "pusht", [2], noise_seed=1, **kwargs)
    assert not np.allclose(alone[0].actions[0], other_noise[0].actions[0])


def test_parallel_solver_reproduces_sequential_actions(tiny_pusht_policy):
    kwargs = {"env_kwargs": {"max_episode_steps": 8}, "record_actions": True}
    sequential = run_episodes(tiny_pusht_policy, "pusht", [3], **kwargs)
    picard = run_episodes(tiny_pusht_policy, "pusht", [3], method="picard", tolerance=0.0, **kwargs)
    np.testing.assert_allclose(picard[0].actions[0], sequential[0].actions[0], atol=1e-3)
    assert picard[0].rounds[0] <= 10
