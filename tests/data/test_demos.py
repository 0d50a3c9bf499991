import numpy as np

from policy_accel.cli import main
from policy_accel.data import ReplayBuffer
from policy_accel.data.demos import collect_demos


def test_pusht_demos_keep_successful_episodes_with_legacy_keys():
    buffer, stats = collect_demos("pusht", 2, first_seed=2000)
    assert buffer.n_episodes == 2 and stats.kept == 2 and stats.attempted >= 2
    assert set(buffer.keys) == {"obs", "action", "keypoint", "state"}
    assert buffer["obs"].shape[1] == 20 and buffer["keypoint"].shape[1:] == (9, 2)
    # DiffusionPolicy's PushT low-dim obs = keypoints + agent position (state[:, :2])
    rebuilt = np.concatenate([buffer["keypoint"].reshape(-1, 18), buffer["state"][:, :2]], axis=1)
    np.testing.assert_allclose(buffer["obs"], rebuilt, atol=1e-4)
    assert np.all(buffer.episode_lengths < 300)


def test_demos_command_writes_a_replay_buffer(tmp_path, capsys):
    out = tmp_path / "demos.zarr"
    assert main(["demos", "pusht", "1", str(out), "--seed", "2000", "--quiet"]) == 0
    assert "expert success" in capsys.readouterr().out
    assert ReplayBuffer.load(out).n_episodes == 1
