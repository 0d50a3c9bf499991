"""make demo's job on a tiny policy: both samplers run the same episodes; files are written."""

from pathlib import Path

import pytest

from policy_accel import demo


def test_demo_compares_samplers_and_writes_video_and_plot(tiny_pusht_policy, tmp_path, capsys):
    info = demo.main(
        [
            "--checkpoint",
            tiny_pusht_policy.source,
            "--episodes",
            "1",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "40",
        ]
    )
    names = [run["sampler"]["name"] for run in info["runs"]]
    assert names == ["sequential", "chord_warm"]
    seeds = [[e["seed"] for e in run["per_episode"]] for run in info["runs"]]
    assert seeds == [[100000], [100000]]
    assert info["runs"][0]["latency"]["rounds_mean"] == 10
    out = capsys.readouterr().out
    assert "vs sequential" in out and "chord_warm" in out
    assert len(list(tmp_path.rglob("*.mp4"))) == 2 and len(list(tmp_path.rglob("*.png"))) == 1


def test_the_default_checkpoint_is_named_as_a_user_names_it(tmp_path, monkeypatch):
    (tmp_path / "repo" / "checkpoints" / "pusht_keypoints").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert demo.default_checkpoint() == "checkpoints/pusht_keypoints"  # recorded as given
    monkeypatch.chdir(tmp_path)  # elsewhere: the source checkout's, if there is one
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "site-packages" / "demo.py"))
    with pytest.raises(SystemExit, match="run from the repository root or pass --checkpoint"):
        demo.default_checkpoint()
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "repo" / "policy_accel" / "demo.py"))
    found = Path(demo.default_checkpoint())
    assert found.is_absolute() and found == tmp_path / "repo" / "checkpoints" / "pusht_keypoints"
