"""robomimic tasks on robosuite: observations, seeding, rendering, the registry and the experts.

Each env is built once per module (about a second each); the expert episodes take 40 to 150
steps of about 10 ms.
"""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs.experts.robomimic import CanExpert, LiftExpert, SquareExpert
from envs.robomimic import RobomimicEnv

TASKS = ("lift", "can", "square")
LOWDIM_SIZES = {"lift": 19, "can": 23, "square": 23}
ROBOT_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")


@pytest.fixture(scope="module")
def lowdim_envs():
    built = {task: RobomimicEnv(obs="lowdim", task=task) for task in TASKS}
    yield built
    for env in built.values():
        env.close()


def run_expert(env: RobomimicEnv, expert, seed: int) -> tuple[bool, int]:
    obs, _ = env.reset(seed=seed)
    expert.reset()
    for step in range(1, env.max_episode_steps + 1):
        obs, reward, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            assert reward == (1.0 if terminated else 0.0)
            return info["is_success"], step
    raise AssertionError("the episode neither terminated nor was truncated")


@pytest.mark.parametrize("task", TASKS)
def test_lowdim_observation_layout(lowdim_envs, task):
    env = lowdim_envs[task]
    obs, info = env.reset(seed=0)
    assert obs.shape == (LOWDIM_SIZES[task],) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    assert list(env.obs_keys) == ["object", *ROBOT_KEYS]
    assert sum(env.obs_keys.values()) == LOWDIM_SIZES[task]
    assert info == {"is_success": False}
    # the robot keys sit at the end, in order, and agree with the simulator
    state = env.sim_state()
    np.testing.assert_allclose(obs[-9:-6], state["eef_pos"], atol=1e-6)
    np.testing.assert_allclose(obs[-6:-2], state["eef_quat"], atol=1e-6)
    np.testing.assert_allclose(obs[-2:], state["gripper_qpos"], atol=1e-6)

    obs, reward, terminated, truncated, info = env.step(np.zeros(7, dtype=np.float32))
    assert obs.shape == (LOWDIM_SIZES[task],) and obs.dtype == np.float32
    assert (reward, terminated, truncated, info["is_success"]) == (0.0, False, False, False)


def global_rng_state() -> tuple:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, keys.tolist(), position, has_gauss, cached


@pytest.mark.parametrize("task", ["lift", "square"])
def test_seeds_fix_the_start_and_leave_the_global_rng_alone(lowdim_envs, task):
    env = lowdim_envs[task]
    np.random.seed(123)
    before = global_rng_state()
    first, _ = env.reset(seed=7)
    assert global_rng_state() == before

    env.reset(seed=8)
    np.random.rand(5)  # whatever the caller does with the global RNG in between
    for _ in range(3):
        env.step(env.action_space.sample())
    again, _ = env.reset(seed=7)
    np.testing.assert_array_equal(first, again)

    placements = set()
    for seed in range(5):
        env.reset(seed=seed)
        placements.add(tuple(env.sim_state()["object_pos"][:2]))
    assert len(placements) == 5


def test_unseeded_resets_continue_the_seeded_stream(lowdim_envs):
    env = lowdim_envs["lift"]
    env.reset(seed=3)
    follow_up = env.reset()[0]
    env.reset(seed=3)
    np.testing.assert_array_equal(env.reset()[0], follow_up)


def test_episode_is_truncated_at_max_episode_steps():
    env = RobomimicEnv(task="lift", max_episode_steps=2)
    env.reset(seed=0)
    assert env.step(np.zeros(7))[3] is False
    _, _, terminated, truncated, _ = env.step(np.zeros(7))
    assert (terminated, truncated) == (False, True)
    env.close()


def test_bad_arguments_are_rejected(lowdim_envs):
    with pytest.raises(ValueError, match="obs must be one of"):
        RobomimicEnv(obs="pixels", task="lift")
    with pytest.raises(ValueError, match="task must be one of"):
        RobomimicEnv(task="stack")
    with pytest.raises(ValueError, match="no observation mode 'pixels'"):
        envs.make("robomimic/lift", obs="pixels")
    env = lowdim_envs["lift"]
    env.reset(seed=0)
    with pytest.raises(ValueError, match="7 finite numbers"):
        env.step(np.zeros(6))
    with pytest.raises(RuntimeError, match="render_mode='rgb_array'"):
        env.render()


def test_sim_state_names_the_goal(lowdim_envs):
    can = lowdim_envs["can"].sim_state()
    square = lowdim_envs["square"].sim_state()
    assert can["target_pos"][1] > 0.28  # the goal bin (bin2) lies at y > 0.28
    np.testing.assert_allclose(square["target_pos"], [0.23, 0.1, 0.85])  # robosuite's peg1
    handle_offset = np.linalg.norm(square["handle_pos"][:2] - square["object_pos"][:2])
    assert handle_offset == pytest.approx(0.054, abs=1e-3)


def test_make_goes_through_the_registry():
    env = envs.make("robomimic/lift")
    assert isinstance(env, RobomimicEnv) and env.task == "lift" and env.obs_mode == "lowdim"
    assert isinstance(envs.make_expert("robomimic/lift", env, seed=0), LiftExpert)
    env.close()


def test_image_observations_are_upright_chw_floats():
    env = RobomimicEnv(obs="image", task="lift", image_size=64, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        image = obs[key]
        assert image.shape == (3, 64, 64) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    for key, size in zip(ROBOT_KEYS, (3, 4, 2), strict=True):
        assert obs[key].shape == (size,) and obs[key].dtype == np.float32
    # upright: agentview sees the white table in its lower half, the robot and room above it
    agentview = obs["agentview_image"]
    assert agentview[:, 48:].mean() > agentview[:, :16].mean() + 0.1
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert frame[192:].mean() > frame[:64].mean() + 25
    env.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_lift_expert_lifts_the_cube(lowdim_envs, seed):
    env = lowdim_envs["lift"]
    success, steps = run_expert(env, LiftExpert(env, seed=seed), seed=seed)
    assert success and steps < 120


def test_can_expert_puts_the_can_in_its_bin(lowdim_envs):
    env = lowdim_envs["can"]
    success, steps = run_expert(env, CanExpert(env, seed=0), seed=0)
    assert success and steps < 300


def test_square_expert_puts_the_nut_on_its_peg(lowdim_envs):
    env = lowdim_envs["square"]
    success, steps = run_expert(env, SquareExpert(env, seed=0), seed=0)
    assert success and steps < 300


def test_expert_seed_decides_the_demonstration(lowdim_envs):
    env = lowdim_envs["lift"]

    def first_actions(expert_seed: int) -> np.ndarray:
        expert = LiftExpert(env, seed=expert_seed)
        obs, _ = env.reset(seed=5)
        actions = []
        for _ in range(10):
            actions.append(expert(obs))
            obs = env.step(actions[-1])[0]
        return np.stack(actions)

    np.testing.assert_array_equal(first_actions(0), first_actions(0))
    assert not np.allclose(first_actions(0), first_actions(1), atol=1e-3)
