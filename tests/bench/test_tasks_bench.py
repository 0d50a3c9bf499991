"""bench.tasks: cells on a checkpoints folder holding the tiny policy, resuming, limits, and the
report's pairing with sequential."""

import json
import shutil
from pathlib import Path

import pytest

from policy_accel.bench import tasks
from policy_accel.bench.tasks import Cell, summarize


@pytest.fixture
def root(tiny_pusht_policy, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(Path(tiny_pusht_policy.source), root / "tiny")
    spec = {
        "env": "pusht",
        "obs": "keypoints",
        "eval_seed": 100000,
        "env_kwargs": {"legacy_seeds": True, "max_episode_steps": 16},
    }
    (root / "tiny" / "env.json").write_text(json.dumps(spec))
    return root


def test_every_sampler_runs_on_the_same_seeds_and_resumes(root, tmp_path):
    cells_dir, output = tmp_path / "cells", tmp_path / "results" / "tasks.json"
    argv = ["--root", str(root), "--episodes", "2", "--batch-size", "2", "--cells-dir",
            str(cells_dir), "--output", str(output), "--limit", "picard=1", "--samplers",
            "sequential", "ddim10", "picard", "chord"]  # fmt: skip
    report = tasks.main(argv)
    rows = {row["sampler"]: row for row in report["rows"]}
    assert set(rows) == {"sequential", "ddim10", "picard", "chord"}
    assert (
        rows["sequential"]["rounds_mean"] == 10
        and "success_diff_vs_sequential" not in rows["sequential"]
    )
    saved = json.loads((cells_dir / "tiny_ddim10.json").read_text())
    assert saved["sampler"]["scheduler"] == "ddim" and saved["sampler"]["num_inference_steps"] == 10
    assert rows["picard"]["episodes"] == 1  # the limit
    assert rows["chord"]["episodes"] == 2 and rows["chord"]["rounds_mean"] <= 10
    for name in ("ddim10", "chord"):
        assert rows[name]["success_diff_vs_sequential"]["n"] == 2
    chord = json.loads((cells_dir / "tiny_chord.json").read_text())
    assert chord["sampler"]["warm_start"] and [e["seed"] for e in chord["per_episode"]] == [
        100000,
        100001,
    ]
    table = output.with_suffix(".md").read_text()
    assert "#### tiny" in table and "| **chord** (warm, default) | 2 |" in table
    assert output.with_suffix(".png").stat().st_size > 0
    # a second run finds every cell done and runs nothing
    before = {p.name: p.stat().st_mtime_ns for p in cells_dir.iterdir()}
    tasks.main(argv)
    assert {p.name: p.stat().st_mtime_ns for p in cells_dir.iterdir()} == before


def test_shards_split_the_cells_references_first(root, capsys):
    tasks.main(["--root", str(root), "--list", "--shard", "0/2"])
    first = capsys.readouterr().out.split()
    tasks.main(["--root", str(root), "--list", "--shard", "1/2"])
    second = capsys.readouterr().out.split()
    assert first[:2] == ["tiny_sequential", "tiny_ddim10"] and second[0] == "tiny_chord"
    assert sorted(first + second) == sorted(f"tiny_{s}" for s in tasks.SAMPLERS)


def test_summary_pairs_each_sampler_with_sequential_on_the_seeds_both_ran():
    def cell(sampler, successes):
        per_episode = [{"seed": s, "success": bool(ok)} for s, ok in enumerate(successes)]
        n = len(successes)
        return Cell("lift", sampler), {
            "cell": {"task": "lift", "sampler": sampler},
            "aggregated": {"n_episodes": n, "pc_success": 100 * sum(successes) / n,
                           "mean_score": 1.0},
            "rounds_mean": 7.0, "rounds_p90": 9.0, "model_evals_mean": 300.0,
            "latency_ms_p50": 5.0, "per_episode": per_episode,
        }  # fmt: skip

    found = dict([cell("sequential", [1, 1, 1, 0]), cell("picard", [1, 0]),
                  cell("chord", [1, 1, 1, 1])])  # fmt: skip
    rows = {r["sampler"]: r for r in summarize(found)}
    assert rows["picard"]["success_diff_vs_sequential"]["n"] == 2  # its two seeds only
    assert rows["picard"]["success_diff_vs_sequential"]["diff"] == pytest.approx(-0.5)
    assert rows["chord"]["success_diff_vs_sequential"]["diff"] == pytest.approx(0.25)
    table = tasks.format_table(list(rows.values()), "lift")
    # pooled over tasks: (task, seed) pairs, only samplers every task ran
    other = {Cell("can", k.sampler): {**v, "cell": {"task": "can", "sampler": k.sampler}}
             for k, v in found.items() if k.sampler != "picard"}  # fmt: skip
    (chord,) = tasks.pooled({**found, **other})
    assert chord["sampler"] == "chord" and chord["success_diff_vs_sequential"]["n"] == 8
    assert chord["success_diff_vs_sequential"]["diff"] == pytest.approx(0.25)
    assert "| **chord** (warm, default) | 8 | +25.0 (" in tasks.format_pooled([chord])
    assert "| picard (warm) | 2 | 50% (1/2) | -50 (" in table
    assert table.index("sequential DDPM-100") < table.index("picard") < table.index("chord")


def test_limits_and_shards_are_validated(root):
    with pytest.raises(SystemExit):
        tasks.main(["--root", str(root), "--limit", "warp=3"])
    with pytest.raises(SystemExit):
        tasks.main(["--root", str(root), "--shard", "2/2"])
