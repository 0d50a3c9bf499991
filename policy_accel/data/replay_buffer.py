"""DiffusionPolicy's ``ReplayBuffer`` layout in zarr format v2, readable by the original code.

A buffer is a zarr group with ``data/<key>`` arrays, all of length ``total_steps`` along axis 0,
and ``meta/episode_ends``: the cumulative end index of every episode (int64). Episode ``i`` is
rows ``episode_ends[i-1]:episode_ends[i]`` of every data array. zarr 3 writes this as format 2
(``zarr_format=2``), the format the original code (zarr 2.x) opens.
"""

from __future__ import annotations

from pathlib import Path

import numcodecs
import numpy as np
import zarr

COMPRESSOR = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)


class ReplayBufferError(ValueError):
    """A zarr store that is not a readable DiffusionPolicy replay buffer."""


class ReplayBuffer:
    """Episodes of equal-keyed arrays, in memory; :meth:`save` / :meth:`load` use the zarr
    layout. ``add_episode`` appends one episode (a dict of arrays with the same length)."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[np.ndarray]] = {}
        self._data: dict[str, np.ndarray] = {}
        self.episode_ends = np.zeros(0, dtype=np.int64)

    # -- building -----------------------------------------------------------------------------
    def add_episode(self, episode: dict[str, np.ndarray]) -> None:
        lengths = {key: len(value) for key, value in episode.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ReplayBufferError(f"episode arrays must share a nonzero length, got {lengths}")
        if self.n_episodes and set(episode) != set(self.keys):
            raise ReplayBufferError(
                f"episode keys {sorted(episode)} differ from the buffer's {sorted(self.keys)}"
            )
        for key, value in episode.items():
            self._chunks.setdefault(key, []).append(np.asarray(value))
            self._data.pop(key, None)
        length = next(iter(lengths.values()))
        self.episode_ends = np.append(self.episode_ends, self.n_steps + length).astype(np.int64)

    # -- reading ------------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return sorted(set(self._chunks) | set(self._data))

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if self.n_episodes else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._data:
            if key not in self._chunks:
                raise KeyError(f"replay buffer has no key {key!r}; it has {self.keys}")
            self._data[key] = np.concatenate(self._chunks.pop(key), axis=0)
        return self._data[key]

    def episode(self, index: int) -> dict[str, np.ndarray]:
        start = 0 if index == 0 else int(self.episode_ends[index - 1])
        end = int(self.episode_ends[index])
        return {key: self[key][start:end] for key in self.keys}

    # -- zarr ---------------------------------------------------------------------------------
    def save(self, path: str | Path, chunk_steps: int = 1000) -> Path:
        """Write ``path`` (a directory store, replaced if it exists) in zarr format v2."""
        path = Path(path)
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        data = root.require_group("data")
        for key in self.keys:
            array = self[key]
            chunks = (min(chunk_steps, max(len(array), 1)), *array.shape[1:])
            data.create_array(key, data=array, chunks=chunks, compressors=COMPRESSOR)
        meta = root.require_group("meta")
        meta.create_array("episode_ends", data=self.episode_ends, chunks=(max(self.n_episodes, 1),))
        return path

    @classmethod
    def load(cls, path: str | Path, keys: list[str] | None = None) -> ReplayBuffer:
        """Read a buffer written by :meth:`save` or by DiffusionPolicy (``keys``: a subset)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (make one with `policy-accel demos`).")
        try:
            root = zarr.open_group(str(path), mode="r")
            ends = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
            data = root["data"]
            available = sorted(data.array_keys())
        except (KeyError, FileNotFoundError, ValueError) as error:
            raise ReplayBufferError(
                f"{path} is not a replay buffer (needs data/<key> arrays and meta/episode_ends): "
                f"{error}"
            ) from error
        wanted = available if keys is None else list(keys)
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise ReplayBufferError(f"{path} has no data/{missing}; it has {available}")
        buffer = cls()
        buffer.episode_ends = ends
        total = int(ends[-1]) if len(ends) else 0
        for key in wanted:
            array = np.asarray(data[key][:])
            if len(array) != total:
                raise ReplayBufferError(
                    f"{path}: data/{key} has {len(array)} steps but episode_ends ends at {total}"
                )
            buffer._data[key] = array
        return buffer
