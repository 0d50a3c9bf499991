"""bench.tasks on a checkpoints folder holding the tiny policy."""

import json
import shutil
from pathlib import Path

from policy_accel.bench import tasks


def test_tasks_bench_runs_every_method_on_the_same_seeds(tiny_pusht_policy, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(Path(tiny_pusht_policy.source), root / "tiny")
    spec = {
        "env": "pusht",
        "obs": "keypoints",
        "eval_seed": 100000,
        "env_kwargs": {"legacy_seeds": True, "max_episode_steps": 16},
    }
    (root / "tiny" / "env.json").write_text(json.dumps(spec))
    output = tmp_path / "tasks.json"
    report = tasks.main(
        [
            "--root",
            str(root),
            "--episodes",
            "2",
            "--methods",
            "sequential",
            "picard",
            "newton",
            "--output",
            str(output),
        ]
    )
    (result,) = report["results"]
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["sequential"]["rounds_mean"] == 10
    for method in ("picard", "newton"):
        assert rows[method]["warm_start"] and rows[method]["rounds_mean"] <= 10
        assert [e["seed"] for e in rows[method]["per_episode"]] == [100000, 100001]
        assert rows[method]["success_diff_vs_sequential"]["n"] == 2
    assert json.loads(output.read_text())["results"][0]["checkpoint"] == "tiny"
