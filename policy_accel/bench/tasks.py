"""Task reward of the shipped checkpoints: ``python -m policy_accel.bench.tasks``.

Every shipped checkpoint (a directory in ``checkpoints/`` with ``env.json`` naming its task; found
by :func:`~policy_accel.bench.paths.checkpoints_dir`, ``--root`` to choose another) runs closed
loop on held-out seeds through the evaluation engine (:func:`policy_accel.eval.evaluate.rollout`:
batched envs, per-episode noise streams), once per sampler on the same seeds and noise:

* ``sequential``: the checkpoint's own 100-step DDPM, exact (the reference);
* ``ddim10``, ``ddim16``: what users pick instead, sequential DDIM in 10 and 16 steps on the
  checkpoint's training schedule (a different, cheaper sampler, not the DDPM-100 sample);
* ``picard``, ``paradigms``, ``taa``, ``srds``, ``newton``, ``chord``: each parallel solver
  warm-started at its default tolerance, which converge to the DDPM-100 sample.

Per cell (task x sampler): success, mean score, rounds (sequential batched model calls: the
latency unit on a GPU) and model evaluations per replan, latency per batched replan, and the
paired success difference to ``sequential`` on the seeds both ran, with its 95% interval.
Solvers too slow on a CPU for every seed run the first ``--limit METHOD=N`` seeds (defaults in
:data:`LIMITS`; the default solver, chord, runs all of them). Each cell is saved as it finishes
under ``tasks/`` in the results folder (``benchmarks/results/`` by default, see
:mod:`policy_accel.bench.paths`; an interrupted run resumes; ``--shard i/k`` splits cells
between processes), and ``--report`` writes ``tasks.json``, ``tasks.md`` (one table per task) and
``tasks.png`` (success with intervals and rounds per sampler across the tasks) from the saved
cells. Replan-by-replan exactness and interleaved latency ratios are ``bench.control``'s.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from policy_accel.bench.paths import checkpoints_dir, result_path, results_dir
from policy_accel.bench.solvers import load_average, machine
from policy_accel.eval.config import (
    EnvConfig,
    EvalConfig,
    EvalSettings,
    PolicyConfig,
    RuntimeConfig,
    SamplerConfig,
)
from policy_accel.eval.evaluate import paired_difference, rollout
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy

SOLVER_METHODS = ("picard", "paradigms", "taa", "srds", "newton", "chord")
SAMPLERS = {
    "sequential": SamplerConfig(method="sequential", warm_start=False),
    "ddim10": SamplerConfig(
        method="sequential", warm_start=False, scheduler="ddim", num_inference_steps=10
    ),
    "ddim16": SamplerConfig(
        method="sequential", warm_start=False, scheduler="ddim", num_inference_steps=16
    ),
    **{m: SamplerConfig(method=m, warm_start=True) for m in SOLVER_METHODS},
}
DEFAULT_SAMPLER = "chord"  # the Controller's and the server's default
# seeds per solver on a 2-core CPU, where a round over a whole chunk of 10 rows costs ~5-30
# sequential calls (newton's JVP directions many more); every other sampler runs all of them
LIMITS = {"picard": 20, "taa": 20, "paradigms": 10, "srds": 10, "newton": 1}


@dataclass(frozen=True)
class Cell:
    task: str
    sampler: str

    @property
    def key(self) -> str:
        return f"{self.task}_{self.sampler}"


def shipped_checkpoints(root: Path | None = None) -> dict[str, dict]:
    """``name -> env.json`` (plus its ``path``) for every checkpoint in ``root`` (default: the
    shipped ones, :func:`~policy_accel.bench.paths.checkpoints_dir`)."""
    found = {}
    for env_file in sorted((root or checkpoints_dir()).glob("*/env.json")):
        spec = json.loads(env_file.read_text())
        found[env_file.parent.name] = {**spec, "path": env_file.parent}
    return found


def task_config(
    spec: dict, episodes: int, batch_size: int, runtime: RuntimeConfig | None = None
) -> EvalConfig:
    """The eval engine's config for a shipped checkpoint's task (its ``env.json`` ``spec``):
    held-out seeds from ``eval_seed`` on, envs stepped in process by default."""
    env_kwargs = dict(spec.get("env_kwargs", {}))
    return EvalConfig(
        policy=PolicyConfig(path=str(spec["path"])),
        env=EnvConfig(
            name=spec["env"],
            obs=spec.get("obs"),
            first_seed=spec["eval_seed"],
            max_episode_steps=env_kwargs.pop("max_episode_steps", None),
            kwargs=env_kwargs,
        ),
        runtime=runtime or RuntimeConfig(vector="sync"),
        eval=EvalSettings(n_episodes=episodes, batch_size=batch_size),
    )


def run_cell(cell: Cell, spec: dict, episodes: int, batch_size: int, policy=None) -> dict:
    """One sampler on one task's first ``episodes`` held-out seeds: the saved cell."""
    sampler = SAMPLERS[cell.sampler]
    start = time.perf_counter()
    run = rollout(task_config(spec, episodes, batch_size), sampler, policy=policy)
    latency = run["latency"]
    return {
        "cell": asdict(cell),
        "sampler": sampler.to_dict(),
        "episodes": episodes,
        "batch_size": batch_size,
        "wall_s": time.perf_counter() - start,
        "load_average": load_average(),
        "aggregated": run["aggregated"],
        **{key: latency.get(key) for key in ("rounds_mean", "rounds_p90", "model_evals_mean",
                                              "converged_fraction", "latency_ms_p50")},
        "per_episode": run["per_episode"],
    }  # fmt: skip


def load_cells(directory: Path, cell_type: type = Cell) -> dict:
    """The saved cells of a sweep (``cell_type -> data``)."""
    found = {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        found[cell_type(**data["cell"])] = data
    return found


def summarize(found: dict[Cell, dict]) -> list[dict]:
    """One row per cell, with the paired success difference to its task's sequential cell."""
    rows = []
    for cell, data in sorted(found.items(), key=lambda kv: kv[0].key):
        agg = data["aggregated"]
        reference = found.get(Cell(cell.task, "sequential"))
        row = {
            **asdict(cell),
            "episodes": agg.get("n_episodes"),
            "errors": agg.get("n_errors", 0),
            "pc_success": agg.get("pc_success"),
            "successes": sum(bool(e.get("success")) for e in data["per_episode"]),
            "mean_score": agg.get("mean_score"),
            "rounds_mean": data.get("rounds_mean"),
            "rounds_p90": data.get("rounds_p90"),
            "model_evals_mean": data.get("model_evals_mean"),
            "converged_fraction": data.get("converged_fraction"),
            "latency_ms_p50": data.get("latency_ms_p50"),
            "batch_size": data.get("batch_size"),
            "wall_s": data.get("wall_s"),
        }
        if reference is not None and cell.sampler != "sequential":
            row["success_diff_vs_sequential"] = paired_difference(
                data["per_episode"], reference["per_episode"]
            )
        rows.append(row)
    return rows


def pooled(found: dict[Cell, dict]) -> list[dict]:
    """Per sampler run on every task: its paired success difference to sequential over all
    (task, seed) pairs (the tasks' episodes together), beside its mean rounds per task."""
    tasks = sorted({cell.task for cell in found})
    out = []
    for sampler in SAMPLERS:
        if sampler == "sequential" or any(Cell(t, sampler) not in found for t in tasks):
            continue
        if any(Cell(t, "sequential") not in found for t in tasks):
            continue

        def keyed(task: str, name: str) -> list[dict]:
            episodes = found[Cell(task, name)]["per_episode"]
            return [{**e, "seed": (task, e["seed"])} for e in episodes]

        mine = [e for t in tasks for e in keyed(t, sampler)]
        reference = [e for t in tasks for e in keyed(t, "sequential")]
        out.append({
            "sampler": sampler,
            "tasks": tasks,
            "success_diff_vs_sequential": paired_difference(mine, reference),
            "rounds_mean_by_task": {t: found[Cell(t, sampler)].get("rounds_mean") for t in tasks},
        })  # fmt: skip
    return out


def format_pooled(rows: list[dict]) -> str:
    if not rows:
        return ""
    tasks = rows[0]["tasks"]
    lines = [
        "| sampler | paired episodes | success vs sequential, all tasks (pp, 95%) | rounds / "
        "replan: " + ", ".join(tasks) + " |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        diff = r["success_diff_vs_sequential"]
        rounds = ", ".join(f"{r['rounds_mean_by_task'][t]:.1f}" for t in tasks)
        lines.append(
            f"| {_label(r['sampler'])} | {diff['n']} | {interval(diff, digits=1)} | {rounds} |"
        )
    return "\n".join(lines)


def interval(diff: dict | None, missing: str = "-", digits: int = 0) -> str:
    """``+d (low..high)`` of a paired success difference in percentage points; ``missing``
    where there is none, ``-`` where it has no interval (one pair)."""
    if diff is None:
        return missing
    if diff.get("ci95_low") is None:
        return "-"
    low, high, mean = (f"{100 * diff[k]:+.{digits}f}" for k in ("ci95_low", "ci95_high", "diff"))
    return f"{mean} ({low}..{high})"


def _label(sampler: str) -> str:
    if sampler in SOLVER_METHODS:
        return (
            f"**{sampler}** (warm, default)" if sampler == DEFAULT_SAMPLER else f"{sampler} (warm)"
        )
    return {"sequential": "sequential DDPM-100", "ddim10": "DDIM-10", "ddim16": "DDIM-16"}[sampler]


def format_table(rows: list[dict], task: str) -> str:
    lines = [
        "| sampler | episodes | success | vs sequential, same seeds (pp, 95%) | mean score "
        "| rounds / replan (mean, p90) | model evals / replan | p50 ms / batched replan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {name: i for i, name in enumerate(SAMPLERS)}
    for r in sorted((r for r in rows if r["task"] == task), key=lambda r: order[r["sampler"]]):
        lines.append(
            f"| {_label(r['sampler'])} | {r['episodes']} | {r['pc_success']:.0f}% "
            f"({r['successes']}/{r['episodes']}) | {interval(r.get('success_diff_vs_sequential'))} "
            f"| {r['mean_score']:.3f} | {r['rounds_mean']:.1f}, {r['rounds_p90']:.0f} "
            f"| {r['model_evals_mean']:.0f} | {r['latency_ms_p50']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Success (95% paired interval around sequential's rate) and rounds per sampler, grouped
    by task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    samplers = [s for s in SAMPLERS if any(r["sampler"] == s for r in rows)]
    by = {(r["task"], r["sampler"]): r for r in rows}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    width = 0.8 / max(len(samplers), 1)
    for i, sampler in enumerate(samplers):
        xs, success, err, rounds = [], [], [], []
        for t, task in enumerate(tasks):
            row = by.get((task, sampler))
            if row is None:
                continue
            xs.append(t + (i - (len(samplers) - 1) / 2) * width)
            success.append(row["pc_success"])
            diff = row.get("success_diff_vs_sequential")
            half = 0.0
            if diff and diff.get("ci95_low") is not None:
                half = 100 * (diff["ci95_high"] - diff["ci95_low"]) / 2
            err.append(half)
            rounds.append(row["rounds_mean"])
        color = f"C{i}"
        top.bar(xs, success, width, yerr=err, capsize=2, color=color, label=_label(sampler)
                .replace("*", ""))  # fmt: skip
        bottom.bar(xs, rounds, width, color=color)
    top.set(ylabel="success (%)", ylim=(0, 105),
            title="success on the same held-out seeds (error bar: 95% paired interval vs "
                  "sequential DDPM-100)")  # fmt: skip
    bottom.set(ylabel="rounds per replan (log)", yscale="log",
               title="sequential batched model calls per replan")  # fmt: skip
    bottom.set_xticks(range(len(tasks)), tasks)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(directory: Path, output: Path) -> dict:
    found = load_cells(directory)
    rows = summarize(found)
    output.parent.mkdir(parents=True, exist_ok=True)
    loads = [data.get("load_average") for data in found.values() if data.get("load_average")]
    result = {
        "benchmark": "tasks",
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_max": max((max(load) for load in loads), default=None),
        "note": "latency is per batched replan (batch_size envs) in whole-episode rollouts, "
        "not interleaved: compare rounds here and latency ratios in bench.control",
        "rows": rows,
        "pooled": pooled(found),
    }
    write_json(output, result)
    tasks = sorted({r["task"] for r in rows})
    tables = [f"#### {task}\n\n{format_table(rows, task)}\n" for task in tasks]
    if result["pooled"]:
        tables.append(f"#### all tasks, paired\n\n{format_pooled(result['pooled'])}\n")
    output.with_suffix(".md").write_text("\n".join(tables))
    if rows:
        plot(rows, output.with_suffix(".png"))
    return result


def shard_arg(text: str) -> tuple[int, int]:
    """``--shard i/k``: run cells ``i, i+k, ...``."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"--shard takes i/k with 0 <= i < k, got {text!r}")
    return int(index), int(count)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", help="names in checkpoints/ (default: all)")
    parser.add_argument("--samplers", nargs="*", choices=list(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10, help="envs per batched replan")
    parser.add_argument(
        "--limit",
        nargs="*",
        default=[f"{m}={n}" for m, n in LIMITS.items()],
        metavar="SAMPLER=N",
        help="run SAMPLER on the first N seeds only (default: %(default)s; `--limit` alone: none)",
    )
    parser.add_argument("--shard", type=shard_arg, default=(0, 1), help="run cells i, i+k, ...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cells-dir", type=Path, help="default: tasks/ in the results folder")
    parser.add_argument("--output", type=Path, help="default: tasks.json in the results folder")
    parser.add_argument("--root", type=Path, help="checkpoints folder (default: the shipped)")
    parser.add_argument("--report", action="store_true", help="only tabulate the saved cells")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        output = result_path("tasks.json", args.output)
        result = report(args.cells_dir or results_dir() / "tasks", output)
        print(output.with_suffix(".md").read_text())
        return result
    limits = {}
    for item in args.limit:
        sampler, _, count = item.partition("=")
        if sampler not in SAMPLERS or not count.isdigit():
            parser.error(f"--limit {item}: expected SAMPLER=N with SAMPLER among {list(SAMPLERS)}")
        limits[sampler] = int(count)
    available = shipped_checkpoints(args.root)
    names = args.checkpoints or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown checkpoints {unknown}; shipped: {sorted(available)}")
    # each task's sequential reference first, then the default solver, then the rest
    todo = [Cell(n, s) for s in args.samplers for n in names]
    todo.sort(key=lambda c: (c.sampler != "sequential", c.sampler != DEFAULT_SAMPLER))
    todo = todo[args.shard[0] :: args.shard[1]]
    if args.list:
        print("\n".join(cell.key for cell in todo))
        return None
    cells_dir = args.cells_dir or results_dir() / "tasks"
    cells_dir.mkdir(parents=True, exist_ok=True)
    policies: dict[str, object] = {}
    for cell in todo:
        episodes = min(args.episodes, limits.get(cell.sampler, args.episodes))
        path = cells_dir / f"{cell.key}.json"
        if path.exists() and json.loads(path.read_text()).get("episodes") == episodes:
            continue  # done by an earlier run
        spec = available[cell.task]
        if cell.task not in policies:
            policies[cell.task] = load_policy(spec["path"])
        data = run_cell(cell, spec, episodes, args.batch_size, policy=policies[cell.task])
        write_json(path, data)
        agg = data["aggregated"]
        print(
            f"{cell.key:>28}: success {agg.get('pc_success', 0):5.1f}% of {episodes}  score "
            f"{agg.get('mean_score', 0):.3f}  rounds/replan {data['rounds_mean']:5.1f} "
            f"(p90 {data['rounds_p90']:.0f})  {data['wall_s']:6.0f} s",
            flush=True,
        )
    output = result_path("tasks.json", args.output)
    result = report(cells_dir, output)
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
