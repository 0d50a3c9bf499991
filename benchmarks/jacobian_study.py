"""Ways to amortise the Jacobian in chord Newton, side by side on the same closed-loop replans.

Records a closed-loop chain of replans of the shipped PushT policy (DDPM-100, the Controller's
warm start with fresh noise, driven by the sequential sampler), then solves every warm replan
with each variant below from the Controller's warm guess (or a pre-solve), and reports rounds
(mean, p90), the max action error vs the sequential sample (pixels of 512) and the JVP
evaluations each variant's linear part took off the critical path:

* ``picard``: the linear coefficient only (no Jacobian).
* ``chord_secant``: chord, Broyden secant updates only (the Controller's default).
* ``prev_full`` / ``prev_stride4``: the previous replan's Jacobians (every step / every 4th),
  shifted by the executed actions, with secant updates; ``prev_full_nosecant`` without them.
* ``prev_diagonal``: only the diagonal of the previous replan's Jacobians (ParaSolver-style).
* ``guess_stale``: Jacobians at the warm guess with the previous replan's observation, computed
  before the new observation arrives (a chord method within one replan, off the critical path).
* ``answer``: the exact Jacobians at this replan's answer (not available in practice: a bound).
* ``presolve``: pre-solve the replan with the observation one control step older (its noise is
  known before its observation), then chord from that trajectory with its exact Jacobians.

Run: ``python benchmarks/jacobian_study.py [--seeds 2 --replans 8]`` (about 10 s per replan on
one CPU thread); writes ``benchmarks/results/jacobian_study.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import envs
from policy_accel.bench.solvers import machine
from policy_accel.control import Controller, SamplerConfig
from policy_accel.execution import LocalExecutor
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy
from policy_accel.sampling import Jacobians, estimate_jacobians, sample
from policy_accel.sampling.warm_start import WarmStart, warm_start_guess

ROOT = Path(__file__).resolve().parents[1]


def record_chain(policy, seed: int, replans: int) -> list[dict]:
    """Closed-loop replans: each with its observation history, the one a control step older,
    its noise and the sequential solution."""
    controller = Controller(policy, SamplerConfig(method="sequential", warm_start=True), seed=seed)
    env = envs.make("pusht", legacy_seeds=True)
    obs, _ = env.reset(seed=seed)
    raw, chain = [], []
    while len(chain) < replans + 1:
        raw.append(np.asarray(obs, dtype=np.float32))
        step = controller.step(obs)
        if step.plan is not None:
            plan = step.plan
            steps = policy.n_obs_steps
            older = [raw[max(len(raw) - 2 - k, 0)] for k in reversed(range(steps))]
            chain.append(
                {
                    "obs": plan.observations,
                    "stale": {"obs": np.stack(older)[None]},
                    "problem": plan.problem,
                    "result": plan.result,
                    "shift": plan.record.shift,
                }
            )
        obs, _, terminated, truncated, _ = env.step(step.action)
        if terminated or truncated:
            break
    env.close()
    return chain


def diagonal(estimate: Jacobians) -> Jacobians:
    model = torch.diag_embed(torch.diagonal(estimate.model, dim1=-2, dim2=-1))
    return Jacobians(model, estimate.positions, estimate.num_steps, estimate.event_shape)


def study(policy, chain: list[dict], executor) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    axis = policy.horizon_axis
    for previous, current in zip(chain, chain[1:], strict=False):
        problem, shift = current["problem"], current["shift"]
        reference = policy.decode(current["result"].sample)["action"]
        warm = WarmStart.rows(previous["problem"], previous["result"])
        guess = warm_start_guess(problem, warm, [shift], axis)
        stale_problem = policy.problem(previous["obs"], x_T=problem.x_T, noise=problem.noise)
        full = estimate_jacobians(previous["problem"], previous["result"].trajectory, executor)
        strided = estimate_jacobians(
            previous["problem"], previous["result"].trajectory, executor, stride=4
        )
        at_guess = estimate_jacobians(stale_problem, guess, executor)
        answer = estimate_jacobians(problem, current["result"].trajectory, executor)
        presolve_problem = policy.problem(current["stale"], x_T=problem.x_T, noise=problem.noise)
        presolved = sample(presolve_problem, "sequential", executor=executor).trajectory
        at_presolve = estimate_jacobians(presolve_problem, presolved, executor)
        variants = {
            "picard": ("picard", guess, {}, 0),
            "chord_secant": ("chord", guess, {}, 0),
            "prev_full": ("chord", guess, {"jacobians": full.shifted(shift, axis)},
                          full.evaluations),
            "prev_full_nosecant": ("chord", guess, {"jacobians": full.shifted(shift, axis),
                                                    "secant": False}, full.evaluations),
            "prev_stride4": ("chord", guess, {"jacobians": strided.shifted(shift, axis)},
                             strided.evaluations),
            "prev_diagonal": ("chord", guess, {"jacobians": diagonal(full).shifted(shift, axis)},
                              full.evaluations),
            "guess_stale": ("chord", guess, {"jacobians": at_guess}, at_guess.evaluations),
            "answer": ("chord", guess, {"jacobians": answer}, answer.evaluations),
            "presolve": ("chord", presolved, {"jacobians": at_presolve},
                         at_presolve.evaluations + 100),
        }  # fmt: skip
        for name, (method, init, options, off_path) in variants.items():
            result = sample(problem, method, init=init, executor=executor, **options)
            actions = policy.decode(result.sample)["action"]
            rows.setdefault(name, []).append(
                {
                    "rounds": int(result.rounds),
                    "error_px": float((actions - reference).abs().max()),
                    "off_path_evals": int(off_path),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "pusht_keypoints")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=100000)
    parser.add_argument("--replans", type=int, default=8, help="warm replans per seed")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks/results/jacobian_study.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    policy = load_policy(args.checkpoint)
    executor = LocalExecutor()
    start = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        chain = record_chain(policy, seed, args.replans)
        for name, values in study(policy, chain, executor).items():
            rows.setdefault(name, []).extend(values)
    summary = {
        name: {
            "replans": len(values),
            "rounds_mean": float(np.mean([v["rounds"] for v in values])),
            "rounds_p90": float(np.percentile([v["rounds"] for v in values], 90)),
            "max_error_px": float(max(v["error_px"] for v in values)),
            "off_path_evals": int(np.mean([v["off_path_evals"] for v in values])),
        }
        for name, values in rows.items()
    }
    for name, s in summary.items():
        print(
            f"{name:>20} rounds {s['rounds_mean']:5.2f} p90 {s['rounds_p90']:4.1f} "
            f"max err {s['max_error_px']:.3f} px, off-path evals {s['off_path_evals']}"
        )
    report = {
        "benchmark": "jacobian_study",
        "machine": machine(),
        "checkpoint": args.checkpoint.name,
        "seeds": [args.first_seed, args.first_seed + args.seeds - 1],
        "warm_noise": "fresh",
        "n_action_steps": policy.n_action_steps,
        "wall_s": time.perf_counter() - start,
        "summary": summary,
        "replans": rows,
    }
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
