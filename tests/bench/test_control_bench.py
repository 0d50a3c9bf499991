"""bench.control on a tiny policy: every configuration solves the same replans as sequential."""

import json

from policy_accel.bench import control


def test_control_bench_interleaves_configurations_and_reports_both_paths(
    tiny_pusht_policy, tmp_path
):
    output = tmp_path / "control.json"
    argv = ["--checkpoint", tiny_pusht_policy.source, "--episodes", "1", "--max-steps", "24"]
    argv += ["--configurations", "sequential", "picard", "picard_warm", "chord_warm",
             "chord_warm_jacobians", "--server", "--output", str(output)]  # fmt: skip
    report = control.main(argv)
    saved = json.loads(output.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert output.with_suffix(".png").stat().st_size > 0
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["sequential"]["rounds_mean"] == 10 and rows["sequential"]["speedup_p50"] == 1.0
    replans = report["replans"]
    # the same replans, in turn: every configuration saw every one of them
    assert len({len(v) for v in replans.values()}) == 1 and len(replans["sequential"]) == 3
    for label in ("picard", "picard_warm", "chord_warm", "chord_warm_jacobians"):
        assert rows[label]["max_action_error"] < 0.5  # px of 512: the same replans
        assert rows[label]["host_ms_p50"] >= 0.0
    assert rows["picard_warm"]["replans"] == 2  # the first replan of an episode is cold
    jacobians = rows["chord_warm_jacobians"]
    assert jacobians["jacobians_fraction"] == 1.0
    assert jacobians["model_evals_off_path_mean"] > 0 and jacobians["off_path_ms_p50"] > 0
    assert rows["chord_warm"]["model_evals_off_path_mean"] == 0
    server = report["server"]
    assert server["requests"] >= 2 and server["overhead_ms_p50"] >= 0.0
