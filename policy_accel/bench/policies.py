"""Solvers on real policy networks: ``python -m policy_accel.bench.policies``.

For each golden-fixture checkpoint (DiffusionPolicy lowdim UNet and transformer, LeRobot PushT
UNet; from ``--fixtures``, else where :func:`~policy_accel.bench.paths.fixtures_dir` finds them),
every solver at its default tolerance samples the recorded observations with the checkpoint's own
100-step DDPM and the recorded noise. Reported: rounds, model evaluations, max action error against
sequential sampling with the same noise (in environment units and in normalized units), converged,
wall time and its ratio to sequential in the same run. Results in ``policies.json`` in the
results folder (``benchmarks/results/`` by default, see :mod:`policy_accel.bench.paths`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from policy_accel.bench.paths import fixtures_dir, result_path
from policy_accel.bench.solvers import machine
from policy_accel.execution import make_executor
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy
from policy_accel.sampling import SOLVERS
from policy_accel.sampling.problem import noise_from_draws


def fixture_cases(root: Path) -> list[dict]:
    """Checkpoint path, observation batch and recorded DDPM-100 noise of every fixture found."""
    cases = []
    for name in ("unet_lowdim_global", "transformer_lowdim"):
        directory = root / "diffusion_policy" / name
        if directory.is_dir():
            data = np.load(directory / "cases.npz")
            cases.append(
                {
                    "name": f"diffusion_policy/{name}",
                    "checkpoint": directory / "model.ckpt",
                    "obs": {"obs": data["obs"]},
                    "x_T": data["ddpm100__noise_init"],
                    "draws": data["ddpm100__noise_steps"],
                }
            )
    directory = root / "lerobot" / "diffusion_pusht_keypoints"
    if directory.is_dir():
        data = np.load(directory / "cases.npz")
        keys = [k[len("obs__") :] for k in data.files if k.startswith("obs__")]
        cases.append(
            {
                "name": "lerobot/diffusion_pusht_keypoints",
                "checkpoint": directory,
                "obs": {key: data[f"obs__{key}"] for key in keys},
                "x_T": data["ddpm100__noise_init"],
                "draws": data["ddpm100__noise_steps"],
            }
        )
    return cases


def run_case(case: dict, device: str = "cpu", executor=None) -> list[dict]:
    policy = load_policy(case["checkpoint"], device=device)
    x_T = torch.from_numpy(case["x_T"]).to(device)
    problem = policy.problem(case["obs"], x_T=x_T)
    noise = noise_from_draws(problem.rule, torch.from_numpy(case["draws"]).to(device))
    rows, reference = [], None
    for method in SOLVERS:
        options = {"pipelined": True} if method == "srds" else {}
        options["executor"] = executor
        policy.predict_action(case["obs"], method, x_T=x_T, noise=noise, **options)  # warm-up
        start = time.perf_counter()
        out = policy.predict_action(case["obs"], method, x_T=x_T, noise=noise, **options)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = out
        normalized = _normalized_error(policy, out["action_pred"], reference["action_pred"])
        result = out["result"]
        rows.append(
            {
                "policy": case["name"],
                "method": method,
                "steps": problem.num_steps,
                "batch": problem.batch_size,
                "rounds": result.rounds,
                "model_evals": result.model_evals,
                "converged": result.converged,
                "max_action_error": float((out["action"] - reference["action"]).abs().max()),
                "max_action_error_normalized": normalized,
                "seconds": seconds,
                "speedup_vs_sequential": (rows[0]["seconds"] / seconds) if rows else 1.0,
            }
        )
    return rows


def _normalized_error(policy, action_pred, reference) -> float:
    """Max error in the model's normalized action units."""
    return float(
        (policy.normalize_action(action_pred) - policy.normalize_action(reference)).abs().max()
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, help="default: see policy_accel.bench.paths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the policy and solver run")
    parser.add_argument("--devices", nargs="+", default=None, help="split windows over these")
    parser.add_argument("--output", type=Path, help="default: policies.json in the results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixtures = args.fixtures or fixtures_dir()
    cases = fixture_cases(fixtures)
    if not cases:
        raise SystemExit(f"no fixtures under {fixtures}; pass --fixtures")
    executor = make_executor(devices=args.devices) if args.devices else None
    rows = [row for case in cases for row in run_case(case, args.device, executor)]
    report = {
        "benchmark": "policy_accel.bench.policies",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": {
            "scheduler": "checkpoint default (DDPM-100)",
            "tolerance": "solver defaults",
            "device": args.device,
            "devices": args.devices,
        },
        "rows": rows,
    }
    output = result_path("policies.json", args.output)
    write_json(output, report)
    header = (
        f"{'policy':36} {'method':10} {'rounds':>6} {'evals':>7} {'max err':>9} "
        f"{'norm err':>9} {'x seq':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['policy']:36} {row['method']:10} {row['rounds']:>6} {row['model_evals']:>7} "
            f"{row['max_action_error']:>9.2e} {row['max_action_error_normalized']:>9.2e} "
            f"{row['speedup_vs_sequential']:>6.2f}"
        )
    print(f"\ntorch threads: {torch.get_num_threads()}  |  wrote {output}")
    return report


if __name__ == "__main__":
    main()
