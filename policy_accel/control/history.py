"""DiffusionPolicy's observation history: the last ``n_obs_steps`` observations, the first one
repeated after a reset. Kept here, beside the controllers that use it, so a robot importing
:mod:`policy_accel.control` needs neither gymnasium nor the simulated tasks (``envs`` imports it
from here for its wrapper)."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class ObservationHistory:
    """The last ``n_obs_steps`` observations (arrays or dicts of arrays), oldest first."""

    def __init__(self, n_obs_steps: int) -> None:
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = n_obs_steps
        self._frames: deque = deque(maxlen=n_obs_steps)

    def reset(self, first: Any) -> None:
        """Start an episode: the history is ``first`` repeated, as DiffusionPolicy pads it."""
        self._frames.clear()
        for _ in range(self.n_obs_steps):
            self._frames.append(_copy(first))

    def append(self, obs: Any) -> None:
        if not self._frames:
            raise RuntimeError("ObservationHistory.append before reset(first_observation).")
        self._frames.append(_copy(obs))

    def copy(self) -> ObservationHistory:
        """An independent history with the same frames (frames are never modified in place, so
        they are shared)."""
        other = ObservationHistory(self.n_obs_steps)
        other._frames.extend(self._frames)
        return other

    def __len__(self) -> int:
        return len(self._frames)

    def stacked(self) -> Any:
        """``(n_obs_steps, *shape)`` arrays, or a dict of them for dict observations."""
        if not self._frames:
            raise RuntimeError("ObservationHistory is empty: call reset(first_observation).")
        first = self._frames[0]
        if isinstance(first, dict):
            return {key: np.stack([frame[key] for frame in self._frames]) for key in first}
        return np.stack(list(self._frames))


def _copy(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {key: np.array(value, copy=True) for key, value in obs.items()}
    return np.array(obs, copy=True)
