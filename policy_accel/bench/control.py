"""Closed-loop control benchmark: ``python -m policy_accel.bench.control``.

The shipped PushT checkpoint drives the env through a :class:`~policy_accel.control.Controller`
on fixed seeds (DiffusionPolicy's test seeds), its own 100-step DDPM sampled by every solver, cold
and warm-started. After every replan the same problem (observation history and the noise the
Controller used) is also solved sequentially, so the reported action error is the solver's
deviation from the exact sample, replan by replan. Reported per configuration: rounds per replan
(mean, p90), model evaluations, latency p50/p99 and their ratio to the sequential sampler measured
in the same run, success and score, and max action error vs sequential. With ``--server`` the
round-trip overhead of the websocket server over loopback is measured on top (p50/p99 of
client round trip minus the server's own inference time). Results in
``benchmarks/results/control.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import envs
from policy_accel.bench.solvers import machine
from policy_accel.control import Controller, latency_stats
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "pusht_keypoints"
RESULTS = Path("benchmarks/results/control.json")
METHODS = ("sequential", "paradigms", "picard", "taa", "srds", "newton")


def run_configuration(
    policy, env_name: str, env_kwargs: dict, seeds: list[int], method: str, warm: bool, **options
) -> dict:
    env = envs.make(env_name, **env_kwargs)
    records, errors, episodes = [], [], []
    for seed in seeds:
        controller = Controller(policy, method=method, warm_start=warm, seed=seed, **options)
        obs, _ = env.reset(seed=seed)
        score, info = 0.0, {}
        while True:
            step = controller.step(obs)
            if step.plan is not None:
                records.append(step.plan.record)
                if method != "sequential":
                    reference = controller.reference(step.plan)
                    errors.append(float(np.abs(step.plan.chunk - reference).max()))
            obs, _, terminated, truncated, info = env.step(step.action)
            score = max(score, float(info.get("score", 0.0)))
            if terminated or truncated:
                break
        episodes.append({"seed": seed, "success": bool(info["is_success"]), "score": score})
    env.close()
    stats = latency_stats(records)
    return {
        "method": method,
        "warm_start": warm,
        "replans": len(records),
        **{
            key: stats[key]
            for key in (
                "rounds_mean",
                "rounds_p90",
                "model_evals_mean",
                "converged_fraction",
                "latency_ms_p50",
                "latency_ms_p99",
            )
        },  # fmt: skip
        "success": float(np.mean([e["success"] for e in episodes])),
        "mean_score": float(np.mean([e["score"] for e in episodes])),
        "max_action_error": max(errors) if errors else 0.0,
        "episodes": episodes,
    }


def server_overhead(
    policy, env_name: str, env_kwargs: dict, seed: int, method: str = "picard", steps: int = 200
) -> dict:
    """Round-trip time over loopback minus the server's own inference time, per request, for a
    closed-loop episode driven through the websocket server and our client."""
    from policy_accel.control import PolicyClient, PolicyServer

    env = envs.make(env_name, **env_kwargs)
    overhead, total = [], []
    with PolicyServer(policy, host="127.0.0.1", port=0, method=method) as server:
        with PolicyClient("127.0.0.1", server.port) as client:
            obs, _ = env.reset(seed=seed)
            key = next(iter(policy.observation_spec))
            queue: list[np.ndarray] = []
            for _ in range(steps):
                if not queue:
                    start = time.perf_counter()
                    reply = client.infer({key: np.asarray(obs, dtype=np.float32)})
                    elapsed = (time.perf_counter() - start) * 1e3
                    total.append(elapsed)
                    overhead.append(elapsed - float(reply["server_timing"]["infer_ms"]))
                    queue = list(reply["actions"])
                obs, _, terminated, truncated, _ = env.step(queue.pop(0))
                if terminated or truncated:
                    obs, _ = env.reset(seed=seed + 1)
                    client.reset()
                    queue = []
    env.close()
    return {
        "requests": len(overhead),
        "overhead_ms_p50": float(np.percentile(overhead, 50)),
        "overhead_ms_p99": float(np.percentile(overhead, 99)),
        "round_trip_ms_p50": float(np.percentile(total, 50)),
        "method": method,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'method':>10} {'warm':>5} {'rounds':>7} {'p90':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'x seq':>6} {'success':>8} {'score':>6} {'max err':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['method']:>10} {str(r['warm_start']):>5} {r['rounds_mean']:7.1f} "
            f"{r['rounds_p90']:5.0f} {r['latency_ms_p50']:8.1f} {r['latency_ms_p99']:8.1f} "
            f"{r['speedup_p50']:6.2f} {r['success']:8.2f} {r['mean_score']:6.3f} "
            f"{r['max_action_error']:9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--env", default="pusht")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=100000, help="DP's PushT test seeds")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server", action="store_true", help="also measure server overhead")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint)
    env_kwargs = {"max_episode_steps": args.max_steps}
    if args.env == "pusht":
        env_kwargs["legacy_seeds"] = True
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    rows = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        for warm in (False, True) if method != "sequential" else (False,):
            start = time.perf_counter()
            row = run_configuration(policy, args.env, env_kwargs, seeds, method, warm)
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(
                f"{method:>10} warm={warm!s:5} rounds {row['rounds_mean']:5.1f} p50 "
                f"{row['latency_ms_p50']:7.1f} ms success {row['success']:.2f} "
                f"max err {row['max_action_error']:.1e}",
                flush=True,
            )
            # finished configurations survive an interrupted run
            write_json(args.output, {"partial": True, "rows": rows})
    reference = next((r for r in rows if r["method"] == "sequential"), None)
    for row in rows:
        if reference is not None:
            row["speedup_p50"] = reference["latency_ms_p50"] / row["latency_ms_p50"]
            row["speedup_p99"] = reference["latency_ms_p99"] / row["latency_ms_p99"]
        else:
            row["speedup_p50"] = row["speedup_p99"] = float("nan")
    report = {
        "benchmark": "control",
        "machine": machine(),
        "torch_threads": args.threads,
        "checkpoint": args.checkpoint.name,
        "env": args.env,
        "seeds": [seeds[0], seeds[-1]],
        "num_inference_steps": policy.num_inference_steps,
        "rows": rows,
    }
    if args.server:
        report["server"] = server_overhead(policy, args.env, env_kwargs, seeds[0])
    print(format_table(rows))
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
