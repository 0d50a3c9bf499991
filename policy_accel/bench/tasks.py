"""Task reward of the shipped checkpoints: ``python -m policy_accel.bench.tasks``.

Every checkpoint in ``checkpoints/`` (a directory with ``env.json`` naming its task) runs closed
loop on held-out seeds with its own 100-step DDPM, through the evaluation engine
(:func:`policy_accel.eval.evaluate.rollout`: batched envs, per-episode noise streams), sampled
sequentially and by each parallel solver warm-started at its default tolerance, on the same seeds
and noise. Reported per solver: success rate, mean score, rounds and model evaluations per replan,
latency, and the paired success difference to sequential with its 95% interval. (Replan-by-replan
exactness against sequential is measured by ``bench.control``.) Results in
``benchmarks/results/tasks.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from policy_accel.bench.solvers import machine
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

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints"
RESULTS = Path("benchmarks/results/tasks.json")
METHODS = ("sequential", "picard", "paradigms", "taa", "srds", "newton")


def shipped_checkpoints(root: Path = CHECKPOINTS) -> dict[str, dict]:
    """``name -> env.json`` (plus its ``path``) for every shipped checkpoint."""
    found = {}
    for env_file in sorted(root.glob("*/env.json")):
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


def evaluate(
    name: str,
    spec: dict,
    methods: list[str],
    episodes: int,
    batch_size: int,
    limits: dict[str, int] | None = None,
    log=None,
    on_row=None,
) -> dict:
    policy = load_policy(spec["path"])
    config = task_config(spec, episodes, batch_size)
    rows, reference = [], None
    result = {
        "checkpoint": name,
        "env": spec["env"],
        "obs": spec.get("obs"),
        "seeds": [spec["eval_seed"], spec["eval_seed"] + episodes - 1],
        "batch_size": batch_size,
        "num_inference_steps": policy.num_inference_steps,
        "rows": rows,
    }
    for method in methods:
        sampler = SamplerConfig(method=method, warm_start=method != "sequential")
        start = time.perf_counter()
        config.eval.n_episodes = min(episodes, (limits or {}).get(method, episodes))
        run = rollout(config, sampler, policy=policy)
        row = {
            "method": method,
            "warm_start": sampler.warm_start,
            **run["aggregated"],
            "rounds_mean": run["latency"]["rounds_mean"],
            "rounds_p90": run["latency"]["rounds_p90"],
            "model_evals_mean": run["latency"]["model_evals_mean"],
            "converged_fraction": run["latency"]["converged_fraction"],
            "latency_ms_p50": run["latency"]["latency_ms_p50"],
            "wall_s": time.perf_counter() - start,
            "per_episode": run["per_episode"],
        }
        if method == "sequential":
            reference = run["per_episode"]
        elif reference is not None:
            row["success_diff_vs_sequential"] = paired_difference(run["per_episode"], reference)
        rows.append(row)
        (log or (lambda line: None))(
            f"{name:>16} {method:>10}: success {row['pc_success']:5.1f}%  score "
            f"{row['mean_score']:.3f}  rounds/replan {row['rounds_mean']:5.1f} "
            f"(p90 {row['rounds_p90']:.0f})  {row['wall_s']:6.1f} s"
        )
        if on_row is not None:
            on_row(result)  # finished solvers are kept if a later one is interrupted
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", help="names in checkpoints/ (default: all)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=25, help="envs per batched replan")
    parser.add_argument(
        "--limit",
        nargs="*",
        default=[],
        metavar="METHOD=N",
        help="run METHOD on the first N seeds only (e.g. newton=10: its JVPs are costly on a CPU)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--root", type=Path, default=CHECKPOINTS, help="checkpoints folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    available = shipped_checkpoints(args.root)
    limits = {}
    for item in args.limit:
        method, _, count = item.partition("=")
        if method not in args.methods or not count.isdigit():
            parser.error(f"--limit {item}: expected METHOD=N with METHOD among --methods")
        limits[method] = int(count)
    names = args.checkpoints or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown checkpoints {unknown}; shipped: {sorted(available)}")
    report = {
        "benchmark": "tasks",
        "machine": machine(),
        "torch_threads": args.threads,
        "episodes": args.episodes,
        "limits": limits,
        "results": [],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict | None = None) -> None:
        results = report["results"] + ([partial] if partial is not None else [])
        write_json(args.output, {**report, "results": results})

    for n in names:
        report["results"].append(
            evaluate(
                n,
                available[n],
                args.methods,
                args.episodes,
                args.batch_size,
                limits,
                log=lambda line: print(line, flush=True),
                on_row=save,
            )
        )
        save()
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
