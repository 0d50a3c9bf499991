"""DiffusionPolicy's receding horizon: a history of the last ``n_obs_steps`` observations (the
first one repeated at reset) in, a chunk of ``n_action_steps`` actions out.

:class:`ObservationHistory` is the bookkeeping the closed-loop Controller and the rollout
evaluation share; :class:`RecedingHorizonWrapper` puts it around a gymnasium env (as upstream's
``MultiStepWrapper``): ``reset`` returns the stacked history, ``step`` executes a whole chunk and
stops early when the episode ends.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from policy_accel.control.history import ObservationHistory


class RecedingHorizonWrapper(gym.Wrapper):
    """Observations become histories; an action is a chunk ``(k, action_dim)`` with
    ``k <= n_action_steps`` executed one step at a time. The reward is the sum over executed
    steps; ``info`` is the last step's, plus ``executed`` (how many actions ran)."""

    def __init__(self, env: gym.Env, n_obs_steps: int, n_action_steps: int) -> None:
        super().__init__(env)
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.history = ObservationHistory(n_obs_steps)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history.reset(obs)
        return self.history.stacked(), info

    def step(self, action):
        chunk = np.asarray(action)
        if chunk.ndim == 1:
            chunk = chunk[None]
        if chunk.ndim != 2 or not 1 <= len(chunk) <= self.n_action_steps:
            raise ValueError(
                f"expected an action chunk of shape (k <= {self.n_action_steps}, action_dim), "
                f"got {np.shape(action)}"
            )
        total, terminated, truncated, info = 0.0, False, False, {}
        executed = 0
        for single in chunk:
            obs, reward, terminated, truncated, info = self.env.step(single)
            self.history.append(obs)
            total += float(reward)
            executed += 1
            if terminated or truncated:
                break
        return self.history.stacked(), total, terminated, truncated, {**info, "executed": executed}
