"""Task reward of the shipped checkpoints: ``python -m policy_accel.bench.tasks``.

Every checkpoint in ``checkpoints/`` (a directory with ``env.json`` naming its task) runs closed
loop on held-out seeds with its own 100-step DDPM, sampled sequentially and by each parallel
solver, with the same noise per episode and replan. Reported per solver: success rate, mean
score, rounds and model evaluations per replan, and the largest action difference from
sequential sampling on the first replan (same observation, same noise), which checks that the
solver converges to the same sample. Results in ``benchmarks/results/tasks.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from policy_accel.bench.solvers import machine
from policy_accel.eval import run_episodes, summarize
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


def evaluate(name: str, spec: dict, methods: list[str], episodes: int, log=print) -> dict:
    policy = load_policy(spec["path"])
    seeds = list(range(spec["eval_seed"], spec["eval_seed"] + episodes))
    env_kwargs = spec.get("env_kwargs", {})
    rows, reference = [], None
    for method in methods:
        start = time.perf_counter()
        results = run_episodes(
            policy,
            spec["env"],
            seeds,
            method=method,
            obs=spec.get("obs"),
            record_actions=True,
            env_kwargs=env_kwargs,
        )
        wall = time.perf_counter() - start
        row = {"method": method, **summarize(results), "wall_s": wall}
        row["model_evals_mean"] = float(np.mean([e for r in results for e in r.model_evals]))
        row["converged_fraction"] = float(np.mean([c for r in results for c in r.converged]))
        first = np.stack([r.actions[0] for r in results])
        if method == "sequential":
            reference = first
        elif reference is not None:
            row["first_replan_max_action_diff"] = float(np.abs(first - reference).max())
        row["per_episode"] = [
            {"seed": r.seed, "success": r.success, "max_reward": r.max_reward, "steps": r.steps}
            for r in results
        ]
        rows.append(row)
        log(
            f"{name:>16} {method:>10}: success {row['pc_success']:5.1f}%  score "
            f"{row['mean_score']:.3f}  rounds/replan {row['rounds_mean']:5.1f} "
            f"(p90 {row['rounds_p90']:.0f})  {wall:6.1f} s"
        )
    return {
        "checkpoint": name,
        "env": spec["env"],
        "obs": spec.get("obs"),
        "seeds": [seeds[0], seeds[-1]],
        "num_inference_steps": policy.num_inference_steps,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="*", help="names in checkpoints/ (default: all)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--root", type=Path, default=CHECKPOINTS, help="checkpoints folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    available = shipped_checkpoints(args.root)
    names = args.checkpoints or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown checkpoints {unknown}; shipped: {sorted(available)}")
    report = {
        "benchmark": "tasks",
        "machine": machine(),
        "torch_threads": args.threads,
        "episodes": args.episodes,
        "results": [evaluate(n, available[n], args.methods, args.episodes) for n in names],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
