"""bench.paths: results and checkpoints are found from the working directory or the environment,
never from the package's location alone (installed without -e it lives in site-packages)."""

import json
import shutil
from pathlib import Path

import pytest

from policy_accel.bench import paths, solvers, tasks


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The package as a plain install sees it: its files in site-packages (no checkout above),
    a working directory of the user's own, and none of the variables set."""
    site = tmp_path / "venv" / "lib" / "site-packages" / "policy_accel" / "bench" / "paths.py"
    monkeypatch.setattr(paths, "__file__", str(site))
    for variable in (paths.RESULTS_ENV, paths.CHECKPOINTS_ENV, paths.FIXTURES_ENV):
        monkeypatch.delenv(variable, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_results_go_under_the_working_directory_or_the_variable(installed, monkeypatch):
    assert paths.results_dir() == Path("benchmarks/results")
    assert (installed / "benchmarks" / "results").is_dir()  # created
    assert paths.result_path("control.json") == Path("benchmarks/results/control.json")
    elsewhere = installed.parent / "mine"
    monkeypatch.setenv(paths.RESULTS_ENV, str(elsewhere))
    assert paths.result_path("tasks.json") == elsewhere / "tasks.json" and elsewhere.is_dir()
    given = installed / "out" / "deep" / "x.json"  # an explicit --output wins, folder created
    assert paths.result_path("tasks.json", given) == given and given.parent.is_dir()


def test_checkpoints_are_found_in_the_working_directory_or_the_variable(installed, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no shipped checkpoints.*\$POLICY_ACCEL_CHECKP"):
        paths.checkpoints_dir()
    (installed / "checkpoints").mkdir()
    assert paths.checkpoints_dir() == Path("checkpoints")
    monkeypatch.setenv(paths.CHECKPOINTS_ENV, str(installed / "missing"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        paths.checkpoints_dir()
    monkeypatch.setenv(paths.CHECKPOINTS_ENV, str(installed.parent))
    assert paths.checkpoints_dir() == installed.parent
    with pytest.raises(FileNotFoundError, match=r"no golden fixtures.*--fixtures"):
        paths.fixtures_dir()


def test_an_editable_install_run_from_elsewhere_finds_the_checkouts_checkpoints(
    tmp_path, monkeypatch
):
    checkout = tmp_path / "repo"
    (checkout / "checkpoints").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(paths, "__file__", str(checkout / "policy_accel" / "bench" / "paths.py"))
    monkeypatch.delenv(paths.CHECKPOINTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.checkpoints_dir() == checkout / "checkpoints"


def test_bench_tasks_runs_from_a_plain_install(installed, tiny_pusht_policy, capsys):
    shutil.copytree(Path(tiny_pusht_policy.source), installed / "checkpoints" / "tiny")
    spec = {"env": "pusht", "obs": "keypoints", "eval_seed": 100000,
            "env_kwargs": {"legacy_seeds": True, "max_episode_steps": 8}}  # fmt: skip
    (installed / "checkpoints" / "tiny" / "env.json").write_text(json.dumps(spec))
    tasks.main(["--samplers", "sequential", "--episodes", "1", "--batch-size", "1"])
    results = installed / "benchmarks" / "results"
    assert (results / "tasks" / "tiny_sequential.json").is_file()
    assert json.loads((results / "tasks.json").read_text())["rows"][0]["sampler"] == "sequential"
    assert "wrote benchmarks/results/tasks.json" in capsys.readouterr().out


def test_bench_solvers_writes_where_the_variable_says(installed, monkeypatch):
    monkeypatch.setenv(paths.RESULTS_ENV, str(installed / "elsewhere"))
    solvers.main(["--repeats", "1", "--seeds", "1", "--events", "chunk16x2", "--schedulers",
                  "dpm", "--no-sweep"])  # fmt: skip
    assert json.loads((installed / "elsewhere" / "solvers.json").read_text())["rows"]
    assert not (installed / "benchmarks").exists()
