"""Chunk transitions under inference delay: ``python -m policy_accel.bench.transitions``.

A replan that takes ``d`` control steps leaves the robot executing the old chunk's actions for
``d`` steps before the new chunk takes over (the eval engine's ``runtime.inference_delay_steps``,
see :mod:`policy_accel.eval.evaluate`). The sweep runs every shipped task at delays ``0 ..
4`` steps, ``n_action_steps`` 8 and 4, for each transition:

* ``naive``: the new chunk takes over at its step ``d`` (a jump where it disagrees);
* ``average``: temporal ensembling, the new chunk averaged with the old one where both planned;
* ``inpaint``: the ``d`` committed actions inpainted into the replan (real-time chunking without
  retraining), so the new chunk continues them;
* ``soft_inpaint``: ``inpaint`` plus the rest of the old chunk's overlap guided with decaying
  weights (RTC's prefix schedule),

sampled sequentially (exact DDPM) and by the default parallel solver warm-started, on the same
50 held-out seeds and noise. Per cell: success and its paired difference to the zero-delay
sequential run of the shipped chunk length (95% interval), mean score, the action jump where a
new chunk takes over, the motion within a chunk, jerk, starved steps, rounds and latency per
replan. Each cell is saved as it finishes under ``transitions/`` in the results folder
(``benchmarks/results/`` by default, see :mod:`policy_accel.bench.paths`; an interrupted sweep
resumes; ``--shard i/k`` splits the cells between processes), and ``--report`` writes
``transitions.json``, a markdown table and one plot per task from whatever cells exist.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from policy_accel.bench.paths import result_path, results_dir
from policy_accel.bench.solvers import machine
from policy_accel.bench.tasks import (
    interval,
    load_cells,
    shard_arg,
    shipped_checkpoints,
    task_config,
)
from policy_accel.eval.config import RuntimeConfig, SamplerConfig
from policy_accel.eval.evaluate import paired_difference, rollout
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy

TRANSITIONS = ("naive", "average", "inpaint", "soft_inpaint")
SAMPLERS = {
    "sequential": SamplerConfig(method="sequential", warm_start=False),
    "chord_warm": SamplerConfig(method="chord", warm_start=True),
}
RUNTIME = {  # transition -> the eval engine's runtime keys
    "naive": {"transition": "naive", "merge": "latest"},
    "average": {"transition": "naive", "merge": "average"},
    "inpaint": {"transition": "inpaint", "merge": "latest"},
    "soft_inpaint": {"transition": "soft_inpaint", "merge": "latest"},
}


@dataclass(frozen=True)
class Cell:
    task: str
    n_action_steps: int
    delay: int
    transition: str
    sampler: str

    @property
    def key(self) -> str:
        return f"{self.task}_n{self.n_action_steps}_d{self.delay}_{self.transition}_{self.sampler}"

    def reference(self) -> Cell:
        """The zero-delay sequential cell this one is paired with."""
        return Cell(self.task, self.n_action_steps, 0, "naive", "sequential")


def cells(tasks, n_action_steps, delays, transitions, samplers) -> list[Cell]:
    """Every combination, the zero-delay references first; at delay 0 nothing is committed,
    so the inpainting transitions equal ``naive`` there and are left out."""
    out = []
    for task, n, d, t, s in itertools.product(tasks, n_action_steps, delays, transitions, samplers):
        if d == 0 and t in ("inpaint", "soft_inpaint"):
            continue
        out.append(Cell(task, n, d, t, s))
    return sorted(out, key=lambda c: (c != c.reference(), c.task, -c.n_action_steps, c.delay))


def run_cell(cell: Cell, spec: dict, episodes: int, batch_size: int, policy=None) -> dict:
    runtime = RuntimeConfig(
        inference_delay_steps=cell.delay,
        n_action_steps=cell.n_action_steps,
        vector="sync",
        **RUNTIME[cell.transition],
    )
    config = task_config(spec, episodes, batch_size, runtime)
    start = time.perf_counter()
    run = rollout(config, SAMPLERS[cell.sampler], policy=policy)
    latency = run["latency"]
    return {
        "cell": asdict(cell),
        "episodes": episodes,
        "batch_size": batch_size,
        "wall_s": time.perf_counter() - start,
        "aggregated": run["aggregated"],
        "rounds_mean": latency.get("rounds_mean"),
        "rounds_p90": latency.get("rounds_p90"),
        "model_evals_mean": latency.get("model_evals_mean"),
        "latency_ms_p50": latency.get("latency_ms_p50"),
        "per_episode": run["per_episode"],
    }


def summarize(found: dict[Cell, dict], shipped: dict[str, int] | None = None) -> list[dict]:
    """One row per cell: its aggregates, the paired success difference to the zero-delay
    sequential run (of the task's shipped chunk length ``shipped[task]`` when given, else of
    the cell's own) and the boundary jump relative to the naive switch of its delay."""
    rows = []
    for cell, data in sorted(found.items(), key=lambda kv: kv[0].key):
        agg = data["aggregated"]
        base = cell.reference()
        if shipped and cell.task in shipped:
            base = Cell(cell.task, shipped[cell.task], 0, "naive", "sequential")
        reference = found.get(base)
        naive = found.get(Cell(cell.task, cell.n_action_steps, cell.delay, "naive", cell.sampler))
        row = {
            **asdict(cell),
            "episodes": agg.get("n_episodes"),
            "pc_success": agg.get("pc_success"),
            "mean_score": agg.get("mean_score"),
            "boundary_jump_mean": agg.get("boundary_jump_mean"),
            "boundary_jump_max": agg.get("boundary_jump_max"),
            "step_mean": agg.get("step_mean"),
            "jerk_mean": agg.get("jerk_mean"),
            "starved_steps": sum(e.get("starved_steps", 0) for e in data["per_episode"]),
            "rounds_mean": data.get("rounds_mean"),
            "latency_ms_p50": data.get("latency_ms_p50"),
        }
        if reference is not None and cell != base:
            row["success_diff_vs_zero_delay"] = paired_difference(
                data["per_episode"], reference["per_episode"]
            )
        jump, naive_jump = agg.get("boundary_jump_mean"), None
        if naive is not None:
            naive_jump = naive["aggregated"].get("boundary_jump_mean")
        if jump and naive_jump and cell.transition != "naive":
            row["jump_vs_naive"] = jump / naive_jump
        rows.append(row)
    return rows


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict], task: str) -> str:
    lines = [
        "| n_act | delay | transition | sampler | success | vs shipped zero delay, 95% | score "
        "| jump (mean) | jump vs naive | step (mean) | jerk | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {t: i for i, t in enumerate(TRANSITIONS)}
    chosen = [r for r in rows if r["task"] == task]
    chosen.sort(
        key=lambda r: (-r["n_action_steps"], r["delay"], order[r["transition"]], r["sampler"])
    )
    for r in chosen:
        ratio = r.get("jump_vs_naive")
        lines.append(
            f"| {r['n_action_steps']} | {r['delay']} | {r['transition']} | {r['sampler']} "
            f"| {r['pc_success']:.0f}% ({r['episodes']}) "
            f"| {interval(r.get('success_diff_vs_zero_delay'), 'ref')} | {r['mean_score']:.3f} "
            f"| {_number(r['boundary_jump_mean'])} | {'' if ratio is None else f'{ratio:.2f}x'} "
            f"| {_number(r.get('step_mean'))} | {_number(r['jerk_mean'], 1)} "
            f"| {_number(r['rounds_mean'], 1)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    chosen = [r for r in rows if r["task"] == task and r["sampler"] == "sequential"]
    colors = dict(zip(TRANSITIONS, ("C0", "C1", "C2", "C3"), strict=True))
    for name, (n, linestyle) in itertools.product(TRANSITIONS, ((8, "-"), (4, "--"))):
        # at delay 0 the inpainting transitions commit nothing: they start from naive's point
        at_zero = "average" if name == "average" else "naive"
        points = sorted(
            (r for r in chosen if r["n_action_steps"] == n
             and r["transition"] == (name if r["delay"] else at_zero)),
            key=lambda r: r["delay"],
        )  # fmt: skip
        if len(points) < 2:
            continue
        nudge = 0.06 * (TRANSITIONS.index(name) - 1.5)  # side by side, so the bars stay apart
        delays = [r["delay"] + nudge for r in points]
        success = [r["pc_success"] for r in points]
        low, high = [], []
        for r in points:
            diff = r.get("success_diff_vs_zero_delay")
            half = 0.0
            if diff and diff.get("ci95_low") is not None:
                half = 100 * (diff["ci95_high"] - diff["ci95_low"]) / 2
            low.append(half)
            high.append(half)
        label = f"{name}, n_act {n}"
        style = {"color": colors[name], "linestyle": linestyle, "marker": "o", "label": label}
        left.errorbar(delays, success, yerr=[low, high], capsize=3, **style)
        jumps = [r["boundary_jump_mean"] for r in points]
        right.plot(delays, [float("nan") if j is None else j for j in jumps], **style)
    left.set(xlabel="inference delay (control steps)", ylabel="success (%)",
             title=f"{task}: success (95% paired interval vs zero delay)")  # fmt: skip
    right.set(xlabel="inference delay (control steps)", ylabel="mean |a_new - a_old|",
              title=f"{task}: action jump at chunk boundaries")  # fmt: skip
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(directory: Path, output: Path, shipped: dict[str, int] | None = None) -> dict:
    found = load_cells(directory, Cell)
    rows = summarize(found, shipped)
    result = {"benchmark": "transitions", "machine": machine(), "shipped_n_action_steps": shipped,
              "rows": rows}  # fmt: skip
    write_json(output, result)
    tables = []
    for task in sorted({r["task"] for r in rows}):
        tables.append(f"### {task}\n\n{format_table(rows, task)}\n")
        plot(rows, task, output.with_name(f"transitions_{task}.png"))
    output.with_suffix(".md").write_text("\n".join(tables))
    return result


def shipped_chunks() -> dict[str, int]:
    """Each shipped task's checkpoint ``n_action_steps`` (the zero-delay reference's)."""
    return {
        name: load_policy(spec["path"]).n_action_steps
        for name, spec in shipped_checkpoints().items()
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", help="checkpoints/ names (default: all shipped)")
    parser.add_argument("--n-action-steps", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--delays", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--transitions", nargs="+", choices=TRANSITIONS, default=list(TRANSITIONS))
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=25, help="envs per batched replan")
    parser.add_argument("--shard", type=shard_arg, default=(0, 1), help="run cells i, i+k, ...")
    parser.add_argument("--cells-dir", type=Path, help="default: in the results folder")
    parser.add_argument("--output", type=Path, help="default: in the results folder")
    parser.add_argument("--report", action="store_true", help="only tabulate the saved cells")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        output = result_path("transitions.json", args.output)
        result = report(args.cells_dir or results_dir() / "transitions", output, shipped_chunks())
        print(output.with_suffix(".md").read_text())
        return result
    available = shipped_checkpoints()
    tasks = args.tasks or sorted(available)
    unknown = sorted(set(tasks) - set(available))
    if unknown:
        parser.error(f"unknown tasks {unknown}; shipped: {sorted(available)}")
    todo = cells(tasks, args.n_action_steps, args.delays, args.transitions, args.samplers)
    index, count = args.shard
    todo = todo[index::count]
    if args.list:
        print("\n".join(cell.key for cell in todo))
        return None
    cells_dir = args.cells_dir or results_dir() / "transitions"
    cells_dir.mkdir(parents=True, exist_ok=True)
    policies: dict[str, object] = {}
    for cell in todo:
        path = cells_dir / f"{cell.key}.json"
        if path.exists() and json.loads(path.read_text()).get("episodes") == args.episodes:
            continue
        spec = available[cell.task]
        if cell.task not in policies:
            policies[cell.task] = load_policy(spec["path"])
        policy = policies[cell.task]
        data = run_cell(cell, spec, args.episodes, args.batch_size, policy=policy)
        write_json(path, data)
        agg = data["aggregated"]
        print(
            f"{cell.key:>44}: success {agg['pc_success']:5.1f}%  jump "
            f"{agg.get('boundary_jump_mean') or 0:.2f}  rounds {data['rounds_mean']:.1f}  "
            f"{data['wall_s']:.0f} s",
            flush=True,
        )
    return report(cells_dir, result_path("transitions.json", args.output), shipped_chunks())


if __name__ == "__main__":
    main()
