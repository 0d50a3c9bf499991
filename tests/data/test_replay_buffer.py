import json

import numpy as np
import pytest
import zarr

from policy_accel.data import ReplayBuffer, ReplayBufferError
from policy_accel.data.sequence import SequenceDataset, window_indices


def _buffer():
    buffer = ReplayBuffer()
    buffer.add_episode({"obs": np.arange(6.0).reshape(3, 2), "action": np.arange(3.0)[:, None]})
    buffer.add_episode({"obs": -np.ones((4, 2)), "action": np.full((4, 1), 9.0)})
    return buffer


def test_round_trip_through_the_zarr_v2_layout(tmp_path):
    path = _buffer().save(tmp_path / "demos.zarr")
    # DiffusionPolicy's layout, zarr format 2 (readable by zarr 2.x)
    assert json.loads((path / "data" / "obs" / ".zarray").read_text())["zarr_format"] == 2
    root = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(root["meta/episode_ends"][:], [3, 7])
    assert root["data/obs"].shape == (7, 2)
    loaded = ReplayBuffer.load(path)
    assert loaded.keys == ["action", "obs"] and loaded.n_episodes == 2 and loaded.n_steps == 7
    np.testing.assert_array_equal(loaded.episode(1)["action"], np.full((4, 1), 9.0))
    np.testing.assert_array_equal(loaded.episode_lengths, [3, 4])
    assert list(ReplayBuffer.load(path, keys=["obs"]).keys) == ["obs"]


def test_inconsistent_episodes_and_stores_are_refused(tmp_path):
    buffer = _buffer()
    with pytest.raises(ReplayBufferError, match="share a nonzero length"):
        buffer.add_episode({"obs": np.zeros((2, 2)), "action": np.zeros((3, 1))})
    with pytest.raises(ReplayBufferError, match="differ"):
        buffer.add_episode({"obs": np.zeros((2, 2))})
    path = buffer.save(tmp_path / "b.zarr")
    with pytest.raises(ReplayBufferError, match="no data"):
        ReplayBuffer.load(path, keys=["img"])
    with pytest.raises(FileNotFoundError, match="policy-accel demos"):
        ReplayBuffer.load(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w", zarr_format=2)
    with pytest.raises(ReplayBufferError, match="not a replay buffer"):
        ReplayBuffer.load(tmp_path / "empty.zarr")


def test_windows_pad_with_the_first_and_last_step_of_each_episode():
    # DiffusionPolicy's SequenceSampler with pad_before=1, pad_after=2 on episodes of 3 and 4
    rows = window_indices(np.array([3, 7]), horizon=4, pad_before=1, pad_after=2)
    assert rows.tolist()[:3] == [[0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2]]
    second = rows[rows.min(axis=1) >= 3]
    assert second.tolist()[0] == [3, 3, 4, 5] and second.tolist()[-1] == [5, 6, 6, 6]
    assert np.all((rows < 3).all(axis=1) | (rows >= 3).all(axis=1))  # never crosses episodes
    assert len(window_indices(np.array([3, 7]), horizon=4)) == 1  # only the 4-step episode fits


def test_sequence_dataset_gathers_windows_of_every_array():
    buffer = _buffer()
    dataset = SequenceDataset(
        {"obs": buffer["obs"], "action": buffer["action"]}, buffer.episode_ends, 4, 1, 2
    )
    batch = dataset[np.array([0, 1])]
    assert batch["obs"].shape == (2, 4, 2) and batch["action"].shape == (2, 4, 1)
    np.testing.assert_array_equal(batch["action"][0, :, 0], [0.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="no training window"):
        SequenceDataset({"a": np.zeros(3)}, np.array([3]), 8)
