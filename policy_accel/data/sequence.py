"""Fixed-length training windows over episodes, padded at episode edges as DiffusionPolicy's
``SequenceSampler`` pads them (the first / last step repeated).

With ``pad_before = n_obs_steps - 1`` and ``pad_after = n_action_steps - 1`` (DiffusionPolicy's
choice), a window may start before an episode (the history at reset repeats the first
observation, as the receding-horizon wrapper does at run time) or run past its end (the last
action repeated: the robot holds still).
"""

from __future__ import annotations

import numpy as np


def window_indices(
    episode_ends: np.ndarray, horizon: int, pad_before: int = 0, pad_after: int = 0
) -> np.ndarray:
    """Row indices ``(n_windows, horizon)`` into the flat step arrays, edge-padded per episode."""
    pad_before = min(max(pad_before, 0), horizon - 1)
    pad_after = min(max(pad_after, 0), horizon - 1)
    windows = []
    start = 0
    for end in np.asarray(episode_ends, dtype=np.int64):
        length = int(end) - start
        first = np.arange(-pad_before, length - horizon + pad_after + 1)
        if len(first):
            rows = np.clip(first[:, None] + np.arange(horizon)[None, :], 0, length - 1)
            windows.append(rows + start)
        start = int(end)
    if not windows:
        return np.zeros((0, horizon), dtype=np.int64)
    return np.concatenate(windows, axis=0)


class SequenceDataset:
    """Windows of ``horizon`` steps of every array in ``arrays`` (all indexed by step)."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        episode_ends: np.ndarray,
        horizon: int,
        pad_before: int = 0,
        pad_after: int = 0,
    ) -> None:
        lengths = {key: len(value) for key, value in arrays.items()}
        total = int(episode_ends[-1]) if len(episode_ends) else 0
        if any(length != total for length in lengths.values()):
            raise ValueError(f"arrays {lengths} do not match episode_ends (total {total} steps)")
        self.arrays = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
        self.indices = window_indices(episode_ends, horizon, pad_before, pad_after)
        if len(self.indices) == 0:
            raise ValueError(
                f"no training window of {horizon} steps fits the episodes (lengths "
                f"{np.diff(episode_ends, prepend=0).tolist()[:10]}...)"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, window: int | np.ndarray) -> dict[str, np.ndarray]:
        rows = self.indices[window]
        return {key: value[rows] for key, value in self.arrays.items()}
