"""Closed-loop control benchmark: ``python -m policy_accel.bench.control``.

The shipped PushT checkpoint drives the env on DiffusionPolicy's test seeds with its own 100-step
DDPM, sampled sequentially with the Controller's warm noise (each replan's noise shifted from the
last, a fresh tail). Every configuration then solves *the same replan in turn* (interleaved:
load on a shared machine falls on all alike), each from its own previous solution when warm, so
ratios to sequential come from one run. Per configuration: critical-path rounds per replan (mean,
p90), batched calls and model evaluations on and off the critical path (JVP directions count as
evaluations; the off-path work is chord's Jacobian refresh, timed between replans as the robot's
idle time), host overhead (latency minus the time inside model calls), latency p50/p99 and their
ratio to sequential, and the max action error vs the sequential sample (env units). With
``--server`` the websocket server's loopback overhead is measured too. Results in
``control.json`` in the results folder (``benchmarks/results/`` by default, see
:mod:`policy_accel.bench.paths`) and a plot beside it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import envs
from policy_accel.bench.cost import TimedExecutor
from policy_accel.bench.paths import checkpoints_dir, result_path
from policy_accel.bench.solvers import load_average, machine
from policy_accel.control import Controller, SamplerConfig
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy
from policy_accel.sampling import estimate_jacobians, sample
from policy_accel.sampling.warm_start import WarmStart, warm_start_guess

# label -> (method, warm, options, jacobian_stride)
CONFIGURATIONS = {
    "sequential": ("sequential", False, {}, None),
    "picard": ("picard", False, {}, None),
    "picard_warm": ("picard", True, {}, None),
    "taa_warm": ("taa", True, {}, None),
    "chord": ("chord", False, {}, None),
    "chord_warm": ("chord", True, {}, None),
    "chord_warm_jacobians": ("chord", True, {}, 4),
    "newton_warm": ("newton", True, {}, None),
}
DEFAULT = ["sequential", "picard", "picard_warm", "taa_warm", "chord", "chord_warm",
           "chord_warm_jacobians"]  # fmt: skip


@dataclass
class Configuration:
    label: str
    method: str
    warm: bool
    options: dict
    jacobian_stride: int | None
    previous: WarmStart | None = None
    jacobians: object = None
    rows: list = field(default_factory=list)

    def solve(self, policy, problem, shift: int, executor: TimedExecutor) -> tuple:
        init, options = None, dict(self.options)
        if (
            self.warm
            and self.previous is not None
            and shift < policy.event_shape[policy.horizon_axis]
        ):
            init = warm_start_guess(problem, [self.previous], [shift], policy.horizon_axis)
            if self.jacobians is not None:
                options["jacobians"] = self.jacobians.shifted(shift, policy.horizon_axis)
        executor.model_s = 0.0
        start = time.perf_counter()
        result = sample(problem, self.method, init=init, executor=executor, **options)
        actions = policy.decode(result.sample)["action"].cpu().numpy()
        latency = time.perf_counter() - start
        row = {
            "warm": init is not None,
            "jacobians": "jacobians" in options,
            "rounds": int(result.rounds),
            "model_evals": int(result.model_evals),
            "latency_ms": latency * 1e3,
            "host_ms": (latency - executor.model_s) * 1e3,
            "converged": bool(result.converged),
            "off_path_ms": 0.0,
            "off_path_evals": 0,
            "off_path_calls": 0,
        }
        self.previous = WarmStart.rows(problem, result)[0]
        if self.jacobian_stride is not None:  # the robot's idle time, timed apart
            start = time.perf_counter()
            self.jacobians = estimate_jacobians(
                problem, result.trajectory, executor, self.jacobian_stride
            )
            row["off_path_ms"] = (time.perf_counter() - start) * 1e3
            row["off_path_evals"] = self.jacobians.evaluations
            row["off_path_calls"] = -(-self.jacobians.evaluations // 4096)
        return actions, row


def run_interleaved(policy, env_name, env_kwargs, seeds, labels, n_action_steps=None) -> dict:
    configurations = {label: Configuration(label, *CONFIGURATIONS[label]) for label in labels}
    executor = TimedExecutor()
    env = envs.make(env_name, **env_kwargs)
    episodes = []
    for seed in seeds:
        driver = Controller(
            policy, SamplerConfig(method="sequential", warm_start=True), seed=seed,
            n_action_steps=n_action_steps,
        )  # fmt: skip
        for configuration in configurations.values():
            configuration.previous, configuration.jacobians = None, None
        obs, _ = env.reset(seed=seed)
        score, info = 0.0, {}
        while True:
            step = driver.step(obs)
            plan = step.plan
            if plan is not None:
                reference = plan.actions[0]
                for configuration in configurations.values():
                    actions, row = configuration.solve(
                        policy, plan.problem, plan.record.shift, executor
                    )
                    chunk = actions[0, : driver.n_action_steps]
                    row["action_error"] = float(np.abs(chunk - reference).max())
                    row["seed"] = seed
                    configuration.rows.append(row)
            obs, _, terminated, truncated, info = env.step(step.action)
            score = max(score, float(info.get("score", 0.0)))
            if terminated or truncated:
                break
        episodes.append({"seed": seed, "success": bool(info["is_success"]), "score": score})
    env.close()
    return {"episodes": episodes, "configurations": configurations}


def summarize(configuration: Configuration, sequential_p50: float | None) -> dict:
    rows = configuration.rows
    counted = [r for r in rows if r["warm"]] if configuration.warm else rows
    counted = counted or rows

    def column(key, subset=counted):
        return np.array([r[key] for r in subset], dtype=float)

    latency = column("latency_ms")
    summary = {
        "label": configuration.label,
        "method": configuration.method,
        "warm_start": configuration.warm,
        "jacobian_stride": configuration.jacobian_stride,
        "replans": len(counted),
        "rounds_mean": float(column("rounds").mean()),
        "rounds_p90": float(np.percentile(column("rounds"), 90)),
        "rounds_max": int(column("rounds").max()),
        "calls_on_path_mean": float(column("rounds").mean()),
        "model_evals_on_path_mean": float(column("model_evals").mean()),
        "calls_off_path_mean": float(column("off_path_calls").mean()),
        "model_evals_off_path_mean": float(column("off_path_evals").mean()),
        "off_path_ms_p50": float(np.percentile(column("off_path_ms"), 50)),
        "off_path_ms_max": float(column("off_path_ms").max()),
        "host_ms_p50": float(np.percentile(column("host_ms"), 50)),
        "latency_ms_p50": float(np.percentile(latency, 50)),
        "latency_ms_p99": float(np.percentile(latency, 99)),
        "converged_fraction": float(column("converged").mean()),
        "jacobians_fraction": float(column("jacobians").mean()),
        "max_action_error": float(column("action_error").max()),
    }
    if sequential_p50:
        summary["speedup_p50"] = sequential_p50 / summary["latency_ms_p50"]
        summary["latency_ratio_p50"] = summary["latency_ms_p50"] / sequential_p50
    summary["note"] = "warm replans only" if configuration.warm else "every replan, cold"
    return summary


def server_overhead(
    policy, env_name: str, env_kwargs: dict, seed: int, method: str = "chord", steps: int = 200
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
        f"{'configuration':>22} {'rounds':>6} {'p90':>4} {'evals':>7} {'off ms':>7} "
        f"{'off evals':>9} {'host ms':>7} {'p50 ms':>7} {'p99 ms':>7} {'x seq':>5} {'max err':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['label']:>22} {r['rounds_mean']:6.2f} {r['rounds_p90']:4.0f} "
            f"{r['model_evals_on_path_mean']:7.0f} {r['off_path_ms_p50']:7.0f} "
            f"{r['model_evals_off_path_mean']:9.0f} {r['host_ms_p50']:7.1f} "
            f"{r['latency_ms_p50']:7.1f} {r['latency_ms_p99']:7.1f} "
            f"{r.get('speedup_p50', float('nan')):5.2f} {r['max_action_error']:8.1e}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = ["#888" if not r["warm_start"] else "#2a7" for r in rows]
    left.barh(labels, [r["rounds_mean"] for r in rows], color=colors)
    left.errorbar([r["rounds_p90"] for r in rows], labels, fmt="k|", label="p90")
    left.set_xlabel("critical-path rounds per replan (mean; | p90)")
    right.barh(labels, [r["latency_ms_p50"] for r in rows], color=colors)
    right.set_xlabel("latency p50, ms (1 CPU thread)")
    right.set_yticks([])
    fig.suptitle("PushT closed loop, DDPM-100, interleaved (grey: cold, green: warm)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the shipped pusht_keypoints")
    parser.add_argument("--env", default="pusht")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=100000, help="DP's PushT test seeds")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--configurations", nargs="*", default=DEFAULT,
                        choices=sorted(CONFIGURATIONS))  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--n-action-steps", type=int, default=None, help="replan cadence (default: the policy's)"
    )
    parser.add_argument("--server", action="store_true", help="also measure server overhead")
    parser.add_argument("--output", type=Path, help="default: control.json in the results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or checkpoints_dir() / "pusht_keypoints"
    policy = load_policy(checkpoint)
    env_kwargs = {"max_episode_steps": args.max_steps}
    if args.env == "pusht":
        env_kwargs["legacy_seeds"] = True
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    load_before = load_average()
    start = time.perf_counter()
    run = run_interleaved(
        policy, args.env, env_kwargs, seeds, args.configurations, args.n_action_steps
    )
    configurations = run["configurations"]
    sequential = configurations.get("sequential")
    sequential_p50 = (
        float(np.percentile([r["latency_ms"] for r in sequential.rows], 50)) if sequential else None
    )
    rows = [summarize(c, sequential_p50) for c in configurations.values()]
    report = {
        "benchmark": "control",
        "machine": machine(),
        "torch_threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "interleaved": True,
        "wall_s": time.perf_counter() - start,
        "checkpoint": checkpoint.name,
        "env": args.env,
        "seeds": [seeds[0], seeds[-1]],
        "num_inference_steps": policy.num_inference_steps,
        "n_action_steps": args.n_action_steps or policy.n_action_steps,
        "episodes": run["episodes"],
        "rows": rows,
        "replans": {c.label: c.rows for c in configurations.values()},
    }
    if args.server:
        report["server"] = server_overhead(policy, args.env, env_kwargs, seeds[0])
    print(format_table(rows))
    output = result_path("control.json", args.output)
    write_json(output, report)
    plot(rows, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
