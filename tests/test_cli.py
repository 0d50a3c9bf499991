"""The hydra-composed CLIs: eval and bench end to end on a tiny policy, config errors."""

import json
from pathlib import Path

import pytest

from policy_accel.cli import main


def _eval_args(policy, tmp_path):
    return [
        "eval",
        f"policy={policy.source}",
        "env.max_episode_steps=10",
        "eval.n_episodes=2",
        "eval.batch_size=2",
        "runtime.vector=sync",
        f"eval.output_dir={tmp_path}",
        "--quiet",
    ]


def test_eval_command_composes_overrides_and_writes_eval_info(tiny_pusht_policy, tmp_path, capsys):
    args = _eval_args(tiny_pusht_policy, tmp_path) + ["sampler=newton", "eval.compare=[sequential]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "success vs picard" not in out and "newton" in out and "sequential" in out
    (info_path,) = tmp_path.rglob("eval_info.json")
    info = json.loads(info_path.read_text())
    assert [r["sampler"]["method"] for r in info["runs"]] == ["newton", "sequential"]
    assert info["env"]["max_episode_steps"] == 10 and len(info["per_episode"]) == 2


def test_config_errors_are_clear(tiny_pusht_policy, tmp_path, capsys):
    assert main(_eval_args(tiny_pusht_policy, tmp_path) + ["env=pushy"]) == 2
    error = capsys.readouterr().err
    assert "cannot compose eval" in error and "pusht_keypoints" in error
    assert main(["eval", "policy=no/such/checkpoint"]) == 2
    assert "neither a config" in capsys.readouterr().err
    assert main(_eval_args(tiny_pusht_policy, tmp_path) + ["eval.n_episode=3"]) == 2


def test_bench_command_sweeps_chooses_for_a_budget_and_writes_a_sampler_config(
    tiny_pusht_policy, tmp_path, capsys
):
    config_dir = tmp_path / "configs"
    source = Path(__file__).resolve().parents[1] / "configs"
    for path in source.rglob("*.yaml"):
        target = config_dir / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    out = tmp_path / "results"
    args = [
        "bench",
        f"policy={tiny_pusht_policy.source}",
        "bench.methods=[sequential,picard]",
        "bench.tolerances=[null,0.01]",
        "bench.replans=3",
        "bench.warmup=1",
        "bench.samplers=[ddim10]",
        f"bench.output_dir={out}",
        "--budget-ms",
        "100000",
        "--config-dir",
        str(config_dir),
    ]
    assert main(args) == 0
    report = json.loads((out / "budget.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels[0] == "sequential cold" and len(labels) == 6 and labels[-1] == "ddim10"
    ddim = report["rows"][-1]
    assert ddim["rounds_mean"] == 10 and ddim["max_action_error"] is None  # not the same sample
    best = report["choice"]["most_accurate_within_budget"]["label"]
    assert best != "ddim10"
    assert (out / "budget.csv").read_text().count("\n") == 7
    assert len(list(out.glob("*.png"))) == 3
    written = config_dir / "sampler" / "budget_100000ms.yaml"
    assert written.is_file() and "method:" in written.read_text()
    assert "use sampler=budget_100000ms" in capsys.readouterr().out
    # the chosen configuration is a sampler config eval accepts
    args = _eval_args(tiny_pusht_policy, tmp_path / "ev") + ["sampler=budget_100000ms"]
    assert main(args + ["--config-dir", str(config_dir)]) == 0


@pytest.mark.parametrize("flag", ["--sampler"])
def test_serve_refuses_an_unknown_sampler_config(flag, tiny_pusht_policy, capsys):
    assert main(["serve", tiny_pusht_policy.source, flag, "warp-drive"]) == 2
    assert "warp-drive" in capsys.readouterr().err
