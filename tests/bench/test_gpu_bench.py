"""The device check's script in its CPU mode (tiny sizes): what `make bench-gpu` runs on a GPU
machine cannot rot unnoticed on a machine without one."""

from __future__ import annotations

import json

import torch

from policy_accel.bench import gpu


def test_the_device_check_runs_on_the_cpu_and_says_so(tmp_path):
    if torch.cuda.is_available():
        return  # the GPU mode is the device run itself
    output = tmp_path / "gpu.json"
    report = gpu.main(["--replans", "2", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["mode"] == "cpu-smoke" == report["mode"]
    loop = saved["closed_loop"]
    assert set(loop) == set(gpu.closed_loop_configs(torch.device("cpu")))
    assert loop["sequential eager"]["rounds_mean"] == 100
    assert loop["chord captured"]["rounds_mean"] == loop["chord eager"]["rounds_mean"]
    assert all(row["max_action_error_vs_sequential"] < 1e-2 for row in loop.values())
    assert {row["configuration"] for row in saved["cost_model"]} >= {"chord eager"}
    assert output.with_suffix(".md").read_text().startswith("# Replan cost on")
