"""The chunk-transition sweep: its cells, one real cell through the eval engine, and the
report's pairing (success vs zero delay, jump vs the naive switch)."""

from __future__ import annotations

import json

import pytest

from policy_accel.bench import transitions
from policy_accel.bench.transitions import Cell, cells, report, run_cell, summarize


def test_cells_put_references_first_and_skip_inpainting_at_zero_delay():
    todo = cells(["pusht"], [8, 4], [0, 2], ["naive", "average", "inpaint"], ["sequential"])
    assert todo[:2] == [Cell("pusht", 8, 0, "naive", "sequential"),
                        Cell("pusht", 4, 0, "naive", "sequential")]  # fmt: skip
    assert Cell("pusht", 8, 0, "inpaint", "sequential") not in todo
    assert Cell("pusht", 8, 0, "average", "sequential") in todo
    assert len(todo) == 2 * (2 + 3) and len(set(todo)) == len(todo)


def _saved(directory, cell, successes, jump):
    per_episode = [{"seed": s, "success": bool(ok)} for s, ok in enumerate(successes)]
    data = {
        "cell": cell.__dict__,
        "episodes": len(successes),
        "aggregated": {"n_episodes": len(successes), "pc_success": 100.0 * sum(successes)
                       / len(successes), "boundary_jump_mean": jump, "jerk_mean": 1.0,
                       "mean_score": 0.5},
        "rounds_mean": 100.0,
        "per_episode": per_episode,
    }  # fmt: skip
    (directory / f"{cell.key}.json").write_text(json.dumps(data))


def test_report_pairs_each_cell_with_its_zero_delay_sequential_run(tmp_path):
    reference = Cell("pusht", 8, 0, "naive", "sequential")
    naive = Cell("pusht", 8, 2, "naive", "sequential")
    inpaint = Cell("pusht", 8, 2, "inpaint", "sequential")
    _saved(tmp_path, reference, [1, 1, 1, 1], 10.0)
    _saved(tmp_path, naive, [1, 0, 1, 0], 20.0)
    _saved(tmp_path, inpaint, [1, 1, 1, 0], 8.0)
    rows = {Cell(**{k: r[k] for k in Cell.__dataclass_fields__}): r
            for r in summarize(transitions.load_cells(tmp_path, Cell))}  # fmt: skip
    assert "success_diff_vs_zero_delay" not in rows[reference]
    assert rows[naive]["success_diff_vs_zero_delay"]["diff"] == pytest.approx(-0.5)
    assert rows[inpaint]["success_diff_vs_zero_delay"]["diff"] == pytest.approx(-0.25)
    assert rows[inpaint]["jump_vs_naive"] == pytest.approx(0.4)
    assert "jump_vs_naive" not in rows[naive]
    output = tmp_path / "out" / "transitions.json"
    output.parent.mkdir()
    report(tmp_path, output)
    table = output.with_suffix(".md").read_text()
    assert "| 8 | 2 | inpaint | sequential | 75% (4) | -25 (" in table and "| 0.40x | - |" in table
    assert (output.parent / "transitions_pusht.png").stat().st_size > 0


def test_a_cell_runs_through_the_eval_engine(tiny_pusht_policy):
    spec = {
        "path": tiny_pusht_policy.source,
        "env": "pusht",
        "obs": "keypoints",
        "eval_seed": 100000,
        "env_kwargs": {"max_episode_steps": 12, "legacy_seeds": True},
    }
    cell = Cell("pusht", 4, 2, "inpaint", "sequential")
    data = run_cell(cell, spec, episodes=1, batch_size=1, policy=tiny_pusht_policy)
    episode = data["per_episode"][0]
    assert data["cell"]["transition"] == "inpaint" and episode["replans"] == 3
    assert episode["committed_actions"] == 2 * 2  # two replans after the first hold 2 each
    assert data["rounds_mean"] == tiny_pusht_policy.num_inference_steps
