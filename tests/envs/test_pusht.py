import numpy as np
import pytest

import envs
from envs.experts.pusht import PushTExpert
from envs.pusht import (
    GOAL_POSE,
    KEYPOINTS_LOCAL,
    LEGACY_TEST_SEED,
    T_OUTLINE,
    body_to_world,
    legacy_start_state,
)


@pytest.fixture(scope="module")
def keypoint_env():
    env = envs.make("pusht")
    yield env
    env.close()


def test_registry_lists_tasks_and_rejects_unknown_names():
    assert {"pusht", "robomimic/lift", "robomimic/can", "robomimic/square"} <= set(envs.names())
    with pytest.raises(KeyError, match="known envs"):
        envs.make("pushy")
    with pytest.raises(ValueError, match="keypoints, image, state"):
        envs.make("pusht", obs="pixels")


def test_keypoint_observation_is_nine_world_keypoints_then_agent(keypoint_env):
    obs, info = keypoint_env.reset(seed=3)
    assert obs.shape == (20,) and obs.dtype == np.float32
    assert keypoint_env.observation_space.contains(obs)
    pose = keypoint_env.unwrapped.block_pose
    np.testing.assert_allclose(obs[:18].reshape(9, 2), body_to_world(KEYPOINTS_LOCAL, pose), 1e-3)
    np.testing.assert_allclose(obs[18:], keypoint_env.unwrapped.agent_position, atol=1e-3)
    assert info["is_success"] is False and 0.0 <= info["coverage"] <= 1.0


def test_keypoints_lie_on_the_t_and_are_spread_out():
    x, y = KEYPOINTS_LOCAL[:, 0], KEYPOINTS_LOCAL[:, 1]
    on_bar = (np.abs(x) <= 61) & (y >= 0) & (y <= 31)
    on_stem = (np.abs(x) <= 16) & (y >= 30) & (y <= 121)
    assert np.all(on_bar | on_stem)
    distances = np.linalg.norm(KEYPOINTS_LOCAL[:, None] - KEYPOINTS_LOCAL[None], axis=-1)
    assert distances[~np.eye(9, dtype=bool)].min() > 20.0  # farthest-point sampling spreads them


def test_body_to_world_rotates_about_the_body_origin():
    corner = T_OUTLINE[1:2]  # (60, 0)
    world = body_to_world(corner, np.array([100.0, 50.0, np.pi / 2]))
    np.testing.assert_allclose(world, [[100.0, 110.0]], atol=1e-9)


def _goal_start_state() -> list[float]:
    # gym-pusht (like DiffusionPolicy) sets the position, then the angle, which turns the block
    # about its centre of gravity (0, 45): start where that turn lands the origin on the goal
    c, s = np.cos(GOAL_POSE[2]), np.sin(GOAL_POSE[2])
    cog = np.array([0.0, 45.0])
    start = GOAL_POSE[:2] - cog + np.array([[c, -s], [s, c]]) @ cog
    return [100.0, 100.0, *start, GOAL_POSE[2]]


def test_body_frame_matches_the_simulators_shapes(keypoint_env):
    keypoint_env.reset(seed=5)
    sim = keypoint_env.unwrapped._sim
    world = np.array(
        [shape.body.local_to_world(v) for shape in sim.block.shapes for v in shape.get_vertices()]
    )
    mine = body_to_world(T_OUTLINE, keypoint_env.unwrapped.block_pose)
    distances = np.linalg.norm(world[:, None] - mine[None], axis=-1)
    assert distances.min(axis=1).max() < 1e-6  # every pymunk vertex is an outline vertex


def test_same_seed_same_start_and_different_seeds_differ(keypoint_env):
    first, _ = keypoint_env.reset(seed=11)
    again, _ = keypoint_env.reset(seed=11)
    other, _ = keypoint_env.reset(seed=12)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_legacy_seeds_reproduce_diffusion_policy_start_states():
    # DiffusionPolicy draws its start state with numpy.random.RandomState(seed)
    rs = np.random.RandomState(LEGACY_TEST_SEED)
    expected = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400)]
    expected += [rs.randint(100, 400), rs.randn() * 2 * np.pi - np.pi]
    np.testing.assert_allclose(legacy_start_state(LEGACY_TEST_SEED), expected)
    env = envs.make("pusht", obs="state", legacy_seeds=True)
    obs, _ = env.reset(seed=LEGACY_TEST_SEED)
    # the block is placed at the drawn position, then turned about its centre of gravity
    c, s = np.cos(expected[4]), np.sin(expected[4])
    cog = np.array([0.0, 45.0])
    origin = np.array(expected[2:4]) + cog - np.array([[c, -s], [s, c]]) @ cog
    np.testing.assert_allclose(obs[:2], expected[:2], atol=1e-3)
    np.testing.assert_allclose(obs[2:4], origin, atol=1e-3)
    assert abs(np.angle(np.exp(1j * (obs[4] - expected[4])))) < 1e-3
    with pytest.raises(ValueError, match="needs reset\\(seed="):
        env.reset()


def test_image_and_state_observations():
    env = envs.make("pusht", obs="image")
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (3, 96, 96) and obs["image"].dtype == np.float32
    assert 0.0 <= obs["image"].min() and obs["image"].max() <= 1.0 and obs["image"].std() > 0.05
    assert obs["agent_pos"].shape == (2,)
    assert env.observation_space.contains(obs)
    assert env.render().shape[-1] == 3
    state_env = envs.make("pusht", obs="state")
    state, _ = state_env.reset(seed=0)
    assert state.shape == (5,) and 0 <= state[4] < 2 * np.pi


def test_reward_is_capped_coverage_and_goal_pose_succeeds(keypoint_env):
    keypoint_env.reset(options={"reset_to_state": _goal_start_state()})
    _, reward, terminated, truncated, info = keypoint_env.step(np.array([100.0, 100.0]))
    assert info["coverage"] > 0.99 and reward == 1.0 and info["score"] == 1.0
    assert terminated and info["is_success"] and not truncated


def test_episode_truncates_at_max_steps():
    env = envs.make("pusht", max_episode_steps=3)
    env.reset(seed=0)
    agent = env.unwrapped.agent_position
    results = [env.step(agent) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]


def test_bad_action_is_refused_with_a_clear_message(keypoint_env):
    keypoint_env.reset(seed=0)
    with pytest.raises(ValueError, match="2 finite numbers"):
        keypoint_env.step(np.array([np.nan, 3.0]))


@pytest.mark.parametrize("seed", [2000, 2001, 2003])
def test_expert_succeeds_on_fixed_seeds(seed):
    env = envs.make("pusht", obs="state")
    expert = envs.make_expert("pusht", env, seed=0)
    assert isinstance(expert, PushTExpert)
    obs, _ = env.reset(seed=seed)
    expert.reset()
    for _ in range(300):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
    assert info["is_success"], info["coverage"]
