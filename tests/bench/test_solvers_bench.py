"""The solver benchmark runs end to end and writes its figures."""

from __future__ import annotations

import json

from policy_accel.bench import solvers


def test_benchmark_writes_rows_for_every_solver_and_start(tmp_path, capsys):
    output = tmp_path / "solvers.json"
    report = solvers.main(
        [
            "--repeats",
            "1",
            "--seeds",
            "2",
            "--events",
            "chunk16x2",
            "latent4x32x32",
            "--schedulers",
            "dpm",
            "--output",
            str(output),
        ]
    )
    saved = json.loads(output.read_text())
    assert saved["machine"]["torch_threads"] == 1
    rows = saved["rows"]
    assert len(rows) == len(report["rows"]) == 2 * 7 * 2  # 2 events x 7 solvers x cold, warm
    chunk = {(r["method"], r["start"]): r for r in rows if r["event"] == "chunk16x2"}
    assert chunk[("sequential", "cold")]["rounds_max"] == 20
    assert chunk[("sequential", "cold")]["rms_error_vs_sequential_max"] == 0.0
    for method in ("paradigms", "picard", "taa", "newton", "chord"):
        assert chunk[(method, "cold")]["rounds_max"] < 20
        assert chunk[(method, "warm")]["rounds_mean"] <= chunk[(method, "cold")]["rounds_mean"]
        assert chunk[(method, "cold")]["all_converged"]
        assert chunk[(method, "cold")]["speedup_vs_sequential"] > 0
    latent_newton = [r for r in rows if r["event"] == "latent4x32x32" and r["method"] == "newton"]
    assert all("max_event_size" in r["refused"] for r in latent_newton)
    assert "picard" in capsys.readouterr().out


def test_tolerance_sweep_trades_rounds_for_accuracy():
    rows = solvers.tolerance_sweep(shift=0.05, seeds=1)
    picard = {row["tolerance"]: row for row in rows if row["method"] == "picard"}
    assert picard[0.001]["cold_rms_error_max"] <= picard[0.1]["cold_rms_error_max"]
    assert picard[0.001]["cold_rounds_mean"] >= picard[0.1]["cold_rounds_mean"]
    assert {row["method"] for row in rows} == set(solvers.SWEEP_TOLERANCES)
