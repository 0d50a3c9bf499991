"""An env wrapper that makes episodes safe to batch in a vector env.

* An exception in ``reset`` or ``step`` ends that episode instead of the whole evaluation: it is
  returned as ``terminated=True`` with ``info["error"]`` (the traceback), and the env is rebuilt on
  the next reset, so the other episodes and the finished ones are untouched.
* The end of an episode is reported in ``info["done"]`` (with ``info["truncated"]``), never as
  ``terminated``/``truncated``: gymnasium's vector envs refuse to step a finished sub-env without
  autoreset, and lockstep batches keep stepping rows whose episode is over. Those further steps
  are no-ops (robosuite refuses to step a finished episode).
* ``recording`` keeps a rendered frame after every step (for videos), fetched with
  ``take_frames()``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np


class EpisodeGuard(gym.Env):
    def __init__(self, make_env: Callable[[], gym.Env]) -> None:
        self._make_env = make_env
        self.env = make_env()
        self.observation_space = self.env.observation_space
        self.action_space = self.env.action_space
        self.metadata = getattr(self.env, "metadata", {})
        self.render_mode = "rgb_array"
        self.recording = False
        self._frames: list[np.ndarray] = []
        self._done = True
        self._last_obs: Any = None
        self._broken = False

    def _blank(self) -> Any:
        if self._last_obs is not None:
            return self._last_obs
        return self.observation_space.sample() * 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._frames = []
        try:
            if self._broken:
                self.env.close()
                self.env = self._make_env()
                self._broken = False
            obs, info = self.env.reset(seed=seed, options=options)
        except Exception:
            self._broken, self._done = True, True
            return self._blank(), {"error": traceback.format_exc()}
        self._done, self._last_obs = False, obs
        if self.recording:
            self._frames.append(self.env.render())
        return obs, info

    def step(self, action):
        if self._done:
            return self._blank(), 0.0, False, False, {"finished": True}
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception:
            self._broken, self._done = True, True
            return self._blank(), 0.0, False, False, {"done": True, "error": traceback.format_exc()}
        self._last_obs = obs
        self._done = bool(terminated or truncated)
        if self.recording:
            try:
                self._frames.append(self.env.render())
            except Exception:
                self.recording = False
        return obs, reward, False, False, {**info, "done": self._done, "truncated": truncated}

    def set_recording(self, flag: bool) -> None:
        self.recording = bool(flag)

    def take_frames(self) -> list[np.ndarray]:
        frames, self._frames = self._frames, []
        return frames

    def render(self):
        return self.env.render()

    def close(self) -> None:
        self.env.close()
