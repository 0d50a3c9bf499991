import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from envs.receding_horizon import ObservationHistory, RecedingHorizonWrapper


class Counter(gym.Env):
    """Observation = number of steps taken; ends after ``length`` steps; reward = action."""

    observation_space = spaces.Box(-np.inf, np.inf, (1,))
    action_space = spaces.Box(-np.inf, np.inf, (1,))

    def __init__(self, length=5):
        self.length = length

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.array([0.0]), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)]), float(action[0]), self.t >= self.length, False, {}


def test_history_repeats_the_first_observation_then_slides():
    history = ObservationHistory(3)
    history.reset(np.array([1.0]))
    np.testing.assert_array_equal(history.stacked(), [[1.0], [1.0], [1.0]])
    history.append(np.array([2.0]))
    history.append(np.array([3.0]))
    history.append(np.array([4.0]))
    np.testing.assert_array_equal(history.stacked(), [[2.0], [3.0], [4.0]])


def test_history_copies_so_the_caller_can_reuse_buffers():
    history = ObservationHistory(2)
    buffer = {"image": np.zeros(2), "pos": np.ones(1)}
    history.reset(buffer)
    buffer["image"][:] = 7.0
    assert history.stacked()["image"].shape == (2, 2)
    assert np.all(history.stacked()["image"] == 0.0)


def test_history_needs_a_reset():
    with pytest.raises(RuntimeError, match="reset"):
        ObservationHistory(2).append(np.zeros(1))
    with pytest.raises(ValueError):
        ObservationHistory(0)


def test_wrapper_executes_whole_chunks_and_stops_at_episode_end():
    env = RecedingHorizonWrapper(Counter(length=5), n_obs_steps=2, n_action_steps=3)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs, [[0.0], [0.0]])
    obs, reward, terminated, _, info = env.step(np.ones((3, 1)))
    np.testing.assert_array_equal(obs, [[2.0], [3.0]])
    assert reward == 3.0 and info["executed"] == 3 and not terminated
    obs, reward, terminated, _, info = env.step(np.full((3, 1), 2.0))
    assert terminated and info["executed"] == 2 and reward == 4.0
    np.testing.assert_array_equal(obs, [[4.0], [5.0]])


def test_wrapper_refuses_chunks_longer_than_n_action_steps():
    env = RecedingHorizonWrapper(Counter(), n_obs_steps=2, n_action_steps=2)
    env.reset()
    with pytest.raises(ValueError, match="k <= 2"):
        env.step(np.ones((3, 1)))
