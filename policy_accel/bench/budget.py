"""Latency-budget benchmarking: which sampler configuration fits a control period.

``policy-accel bench`` (or :func:`run_sweep`) first records a closed-loop episode with the
sequential sampler: the observation history at every replan. Every configuration (solver x window
x tolerance x devices x warm/cold) then replays exactly those inputs through a
:class:`~policy_accel.control.Controller`, so all see the same observations, and each replan is
also solved sequentially with the noise that configuration used: the action error is the
configuration's own deviation from the exact sample. Reported per configuration: latency
p50/p95/p99 (warm-up replans excluded; torch threads pinned and recorded), rounds, model
evaluations, max action error, converged fraction, and latency ratios to the sequential sampler
measured in the same run.

``budget_ms`` picks (a) the most accurate configuration whose p99 fits the budget and (b) the
fastest configuration that is exact to tolerance (every replan converged), and writes the chosen
one as a sampler config (``configs/sampler/<name>.yaml``) that ``eval`` and ``serve`` accept.
"""

from __future__ import annotations

import csv
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import envs
from policy_accel.control import Controller, SamplerConfig, latency_stats
from policy_accel.execution import make_executor
from policy_accel.json_files import write_json
from policy_accel.policies.base import Policy

STATS = (
    "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "rounds_mean", "model_evals_mean",
    "converged_fraction",
)  # fmt: skip


@dataclass
class SweepConfig:
    methods: list[str] = field(default_factory=lambda: ["sequential", "picard", "chord", "newton"])
    windows: list[int | None] = field(default_factory=lambda: [None])
    tolerances: list[float | None] = field(default_factory=lambda: [None])
    warm: list[bool] = field(default_factory=lambda: [True, False])
    devices: list[list[str]] = field(default_factory=lambda: [["cpu"]])
    replans: int = 24
    warmup: int = 3
    seed: int = 100000
    budget_ms: float | None = None
    exact_action_error: float = 1e-2
    output_dir: str = "benchmarks/results"
    name: str = "budget"
    # named sampler configs run beside the grid (e.g. configs/sampler/ddim10.yaml): samplers
    # with another scheduler or step count than the checkpoint's are compared on latency and
    # rounds only (they do not target the same sample; compare their task reward with eval)
    samplers: list[dict] = field(default_factory=list)


@dataclass
class Recording:
    """Observation histories at each replan of a recorded episode (``executed`` actions apart)."""

    histories: list[Any]
    executed: int


def record_episode(
    policy: Policy, env_name: str, env_kwargs: dict, seed: int, replans: int
) -> Recording:
    """Drive one episode with the sequential sampler and keep the history of every replan."""
    env = envs.make(env_name, **env_kwargs)
    controller = Controller(policy, method="sequential", seed=seed)
    histories = []
    obs, _ = env.reset(seed=seed)
    while len(histories) < replans:
        step = controller.step(obs)
        if step.plan is not None:
            histories.append({key: value[0] for key, value in step.plan.observations.items()})
        obs, _, terminated, truncated, _ = env.step(step.action)
        if terminated or truncated:
            break
    env.close()
    return Recording(histories, controller.n_action_steps)


def configurations(config: SweepConfig) -> list[dict]:
    rows = []
    for method, window, tolerance, warm, devices in itertools.product(
        config.methods, config.windows, config.tolerances, config.warm, config.devices
    ):
        if method == "sequential" and (warm or window is not None or tolerance is not None):
            continue  # one sequential reference per device set
        options = {}
        if window is not None:
            if method == "srds":
                continue
            options["window"] = int(window)
        if tolerance is not None:
            options["tolerance"] = float(tolerance)
        rows.append(
            {
                "method": method,
                "warm_start": bool(warm),
                "options": options,
                "devices": list(devices),
            }
        )
    for values, devices in itertools.product(config.samplers, config.devices):
        sampler = SamplerConfig.from_dict(values)
        rows.append(
            {
                "method": sampler.method,
                "warm_start": sampler.warm_start,
                "options": dict(sampler.options),
                "devices": list(devices),
                "sampler": sampler,
            }
        )
    return rows


def replay(policy: Policy, recording: Recording, setting: dict, warmup: int, seed: int) -> dict:
    devices = setting["devices"]
    executor = (
        make_executor(device=devices[0]) if len(devices) == 1 else make_executor(devices=devices)
    )
    sampler = setting.get("sampler") or SamplerConfig(
        method=setting["method"], warm_start=setting["warm_start"], options=setting["options"]
    )
    controller = Controller(policy, sampler, seed=seed, executor=executor)
    same_sample = controller.planner.scheduler is policy.scheduler and (
        controller.planner.num_steps == policy.num_inference_steps
    )
    errors, records = [], []
    for index, history in enumerate(recording.histories):
        plan = controller.replan(history=history, executed=recording.executed if index else 0)
        errors.append(float(np.abs(plan.chunk - controller.reference(plan)).max()))
        records.append(plan.record)
    records = records[warmup:] or records
    stats = latency_stats(records)
    row = {k: v for k, v in setting.items() if k != "sampler"}
    return {
        **row,
        "label": label(setting),
        "sampler": sampler.to_dict(),
        "replans": len(records),
        **{key: stats[key] for key in STATS},
        "latency_ms": [r.latency_ms for r in records],
        # another scheduler or step count does not target the checkpoint's sample: no error
        "max_action_error": max(errors) if same_sample else None,
    }


def label(setting: dict) -> str:
    if setting.get("sampler") is not None:
        parts = [setting["sampler"].label]
        if setting["devices"] != ["cpu"]:
            parts.append("+".join(setting["devices"]))
        return " ".join(parts)
    parts = [setting["method"], "warm" if setting["warm_start"] else "cold"]
    parts += [f"{k}={v}" for k, v in sorted(setting["options"].items())]
    if setting["devices"] != ["cpu"]:
        parts.append("+".join(setting["devices"]))
    return " ".join(parts)


def choose(rows: list[dict], budget_ms: float, exact_error: float) -> dict[str, Any]:
    """The most accurate configuration within the budget (p99) and the fastest exact one."""
    comparable = [r for r in rows if r["max_action_error"] is not None]
    fitting = [r for r in comparable if r["latency_ms_p99"] <= budget_ms]
    best = min(fitting, key=lambda r: (r["max_action_error"], r["latency_ms_p99"]), default=None)
    exact = [
        r
        for r in comparable
        if r["converged_fraction"] == 1.0 and r["max_action_error"] <= exact_error
    ]
    fastest = min(exact, key=lambda r: r["latency_ms_p50"], default=None)
    return {"budget_ms": budget_ms, "most_accurate_within_budget": best, "fastest_exact": fastest}


def sampler_yaml(row: dict, budget_ms: float) -> str:
    lines = [
        f"# Chosen by `policy-accel bench --budget-ms {budget_ms:g}`: the most accurate",
        f"# configuration whose p99 latency ({row['latency_ms_p99']:.1f} ms) fits the budget.",
        f"method: {row['method']}",
        f"warm_start: {str(row['warm_start']).lower()}",
        "options:" + ("" if row["options"] else " {}"),
    ]
    lines += [f"  {k}: {v}" for k, v in sorted(row["options"].items())]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], directory: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["rounds_mean"], r["latency_ms_p50"])
        ax.annotate(r["label"], (r["rounds_mean"], r["latency_ms_p50"]), fontsize=6)
    ax.set_xlabel("rounds per replan (mean)")
    ax.set_ylabel("latency p50 (ms)")
    ax.set_title("latency vs rounds")
    paths.append(directory / f"{name}_latency_vs_rounds.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    comparable = [r for r in rows if r["max_action_error"] is not None]
    errors = np.array([max(r["max_action_error"], 1e-8) for r in comparable])
    p99 = np.array([r["latency_ms_p99"] for r in comparable])
    ax.scatter(p99, errors, c="grey")
    order = np.argsort(p99)
    front, best = [], np.inf
    for i in order:
        if errors[i] < best:
            front.append(i)
            best = errors[i]
    ax.plot(p99[front], errors[front], "o-", color="C3", label="Pareto front")
    for i in front:
        ax.annotate(comparable[i]["label"], (p99[i], errors[i]), fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("latency p99 (ms)")
    ax.set_ylabel("max action error vs sequential")
    ax.legend()
    paths.append(directory / f"{name}_pareto.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([r["latency_ms"] for r in rows], showfliers=True)
    ax.set_xticks(range(1, len(rows) + 1), [r["label"] for r in rows], rotation=60, fontsize=6)
    ax.set_ylabel("latency per replan (ms)")
    ax.set_title("latency distribution")
    paths.append(directory / f"{name}_latency_distribution.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'configuration':<36} {'p50 ms':>8} {'p99 ms':>8} {'x seq':>6} {'rounds':>7} "
        f"{'evals':>7} {'conv':>5} {'max err':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['label']:<36} {r['latency_ms_p50']:8.1f} {r['latency_ms_p99']:8.1f} "
            f"{r.get('speedup_p50', float('nan')):6.2f} {r['rounds_mean']:7.1f} "
            f"{r['model_evals_mean']:7.0f} {r['converged_fraction']:5.2f} "
            + (
                f"{r['max_action_error']:9.2e}"
                if r["max_action_error"] is not None
                else "    other"
            )
        )
    return "\n".join(lines)


def run_sweep(
    policy: Policy,
    env_name: str,
    env_kwargs: dict,
    config: SweepConfig,
    threads: int = 1,
    sampler_dir: Path | None = None,
    log=None,
) -> dict:
    """Record, replay every configuration, choose for the budget, write JSON/CSV/PNG.
    ``log(line)`` reports progress (the CLI prints it); ``threads`` is recorded (the entry
    point sets it)."""
    log = log or (lambda line: None)
    recording = record_episode(policy, env_name, env_kwargs, config.seed, config.replans)
    log(f"recorded {len(recording.histories)} replans of {env_name} seed {config.seed}")
    rows = []
    for setting in configurations(config):
        start = time.perf_counter()
        row = replay(policy, recording, setting, config.warmup, config.seed)
        rows.append(row)
        log(
            f"{row['label']:<36} p50 {row['latency_ms_p50']:8.1f} ms  rounds "
            f"{row['rounds_mean']:5.1f}  err {row['max_action_error'] or float('nan'):.1e}  "
            f"({time.perf_counter() - start:.0f} s)"
        )
    for row in rows:
        reference = next(
            (r for r in rows if r["method"] == "sequential" and r["devices"] == row["devices"]),
            None,
        )
        if reference is not None:
            row["speedup_p50"] = reference["latency_ms_p50"] / row["latency_ms_p50"]
            row["speedup_p99"] = reference["latency_ms_p99"] / row["latency_ms_p99"]
    directory = Path(config.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "budget",
        "env": env_name,
        "seed": config.seed,
        "replans": len(recording.histories),
        "warmup_excluded": config.warmup,
        "torch_threads": threads,
        "rows": rows,
    }
    if config.budget_ms is not None:
        choice = choose(rows, config.budget_ms, config.exact_action_error)
        report["choice"] = choice
        best = choice["most_accurate_within_budget"]
        if best is not None and sampler_dir is not None:
            path = Path(sampler_dir) / f"budget_{config.budget_ms:g}ms.yaml"
            path.write_text(sampler_yaml(best, config.budget_ms))
            report["sampler_config"] = str(path)
    report["plots"] = [str(p) for p in plots(rows, directory, config.name)]
    write_json(directory / f"{config.name}.json", report)
    with open(directory / f"{config.name}.csv", "w", newline="") as handle:
        fields = [k for k in rows[0] if k not in ("latency_ms", "options", "devices", "sampler")]
        writer = csv.DictWriter(handle, fieldnames=["label", *[f for f in fields if f != "label"]])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in writer.fieldnames if k in row})
    return report
