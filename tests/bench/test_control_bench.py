"""bench.control on a tiny policy: every configuration is checked against sequential."""

import json

from policy_accel.bench import control


def test_control_bench_writes_ratios_errors_and_server_overhead(tiny_pusht_policy, tmp_path):
    output = tmp_path / "control.json"
    argv = ["--checkpoint", tiny_pusht_policy.source, "--episodes", "1", "--max-steps", "16"]
    argv += ["--methods", "sequential", "picard", "--server", "--output", str(output)]
    report = control.main(argv)
    saved = json.loads(output.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    rows = {(r["method"], r["warm_start"]): r for r in report["rows"]}
    assert set(rows) == {("sequential", False), ("picard", False), ("picard", True)}
    assert rows[("sequential", False)]["rounds_mean"] == 10
    assert rows[("sequential", False)]["speedup_p50"] == 1.0
    for key in (("picard", False), ("picard", True)):
        assert rows[key]["replans"] == 2 and rows[key]["max_action_error"] < 0.05
    assert rows[("picard", True)]["rounds_mean"] <= rows[("picard", False)]["rounds_mean"]
    server = report["server"]
    assert server["requests"] >= 2 and server["overhead_ms_p50"] >= 0.0
