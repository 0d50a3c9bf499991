"""Solver benchmark on exact analytic problems: ``python -m policy_accel.bench.solvers``.

For a Gaussian-mixture problem with a 16x2 event (a robot action chunk) and a 4x32x32 event (a
Stable Diffusion latent), and for DDPM-100, DDIM-50 and DPM-Solver++-20, every solver runs cold and
warm-started. The warm start is the realistic one for control: the solution of a nearby problem
(every mixture mean moved by ``--shift``, as a new observation moves the action distribution) is
the guess for this one. Reported per setting, over several noise seeds: rounds (sequential batched
denoiser calls, the latency unit), model evaluations, RMS error against the sequential sample with
the same noise, and wall time as a ratio to the sequential sampler timed in the same run. The
analytic denoiser costs almost nothing, so on it wall time measures solver overhead; rounds are
what carries over to real networks.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from policy_accel.bench.paths import result_path
from policy_accel.json_files import write_json
from policy_accel.sampling import SOLVERS, DenoisingProblem, sample
from policy_accel.sampling.analytic import GaussianMixtureDenoiser, action_chunk_means


@dataclass(frozen=True)
class Setting:
    """One benchmark problem: an event shape with its scheduler family and step count."""

    event: str
    scheduler: str
    steps: int


def make_scheduler(event: str, scheduler: str):
    if event == "chunk16x2":  # DiffusionPolicy: 100 training steps, cosine schedule, clipping
        base = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"}
        clip = {"clip_sample": True}
    else:  # Stable Diffusion: 1000 training steps, scaled-linear schedule, no clipping
        base = {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        }
        clip = {"clip_sample": False}
    if scheduler == "ddpm":
        return DDPMScheduler(**base, **clip)
    if scheduler == "ddim":
        return DDIMScheduler(**base, **clip, set_alpha_to_one=False)
    return DPMSolverMultistepScheduler(**base)


def make_denoiser(event: str, scheduler, shift: float = 0.0) -> GaussianMixtureDenoiser:
    if event == "chunk16x2":
        means = action_chunk_means(modes=4, horizon=16, action_dim=2)
        std = 0.1
    else:
        # A smooth image-like base with four overlapping modes around it. Well-separated modes in
        # 4096 dimensions make the posterior so sharp that any tolerance flips modes (measured:
        # RMS error 1.1 for every solver at its default tolerance), which real latents don't show.
        generator = torch.Generator().manual_seed(0)
        base = (
            torch.nn.functional.avg_pool2d(torch.randn(1, 4, 32, 32, generator=generator), 5, 1, 2)
            * 2
        )
        means = base + 0.1 * torch.randn(4, 4, 32, 32, generator=generator)
        std = 0.5
    return GaussianMixtureDenoiser(means + shift, std, scheduler.alphas_cumprod)


def timed(problem: DenoisingProblem, method: str, repeats: int, **kwargs):
    """Run ``repeats`` times after one warm-up; return the last result and the median seconds."""
    sample(problem, method, **kwargs)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = sample(problem, method, **kwargs)
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean().sqrt())


def run_setting(setting: Setting, repeats: int, shift: float, seeds: int) -> list[dict]:
    """Every solver cold and warm on ``seeds`` problems (seeded noise); figures aggregated over
    seeds: mean and max rounds, mean model evaluations, max RMS error vs sequential, and the
    ratio of summed sequential to summed solver wall time."""
    scheduler = make_scheduler(setting.event, setting.scheduler)
    shape = (1, 16, 2) if setting.event == "chunk16x2" else (1, 4, 32, 32)
    denoiser = make_denoiser(setting.event, scheduler)
    nearby = make_denoiser(setting.event, scheduler, -shift)
    runs: dict[tuple[str, str], list[dict]] = {}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        problem = DenoisingProblem.from_scheduler(
            scheduler, denoiser, setting.steps, shape, generator=generator
        )
        previous = DenoisingProblem(nearby, problem.rule, problem.x_T, problem.noise)
        reference, sequential_seconds = timed(problem, "sequential", repeats)
        for method in SOLVERS:
            for start in ("cold", "warm"):
                record: dict = {"sequential_seconds": sequential_seconds}
                # srds' latency is the critical path of its pipelined schedule (same sample)
                options = {"pipelined": True} if method == "srds" else {}
                try:
                    guess = (
                        sample(previous, method, **options).trajectory if start == "warm" else None
                    )
                    result, seconds = timed(problem, method, repeats, init=guess, **options)
                except ValueError as refusal:  # e.g. newton on an event too large for Jacobians
                    record["refused"] = str(refusal).split(".")[0]
                else:
                    record.update(
                        rounds=result.rounds,
                        model_evals=result.model_evals,
                        converged=result.converged,
                        error=rms(result.sample, reference.sample),
                        seconds=seconds,
                    )
                runs.setdefault((method, start), []).append(record)
    rows = []
    for (method, start), records in runs.items():
        row = {
            "event": setting.event,
            "scheduler": setting.scheduler,
            "steps": setting.steps,
            "method": method,
            "start": start,
            "seeds": seeds,
        }
        if "refused" in records[0]:
            rows.append({**row, "refused": records[0]["refused"]})
            continue
        rounds = [r["rounds"] for r in records]
        total_sequential = sum(r["sequential_seconds"] for r in records)
        total = sum(r["seconds"] for r in records)
        rows.append(
            {
                **row,
                "rounds_mean": statistics.mean(rounds),
                "rounds_max": max(rounds),
                "model_evals_mean": statistics.mean(r["model_evals"] for r in records),
                "all_converged": all(r["converged"] for r in records),
                "rms_error_vs_sequential_max": max(r["error"] for r in records),
                "rms_error_vs_sequential_median": statistics.median(r["error"] for r in records),
                "ms_per_sample": 1000 * total / seeds,
                "sequential_ms_per_sample": 1000 * total_sequential / seeds,
                "speedup_vs_sequential": total_sequential / total,
                "round_ratio_vs_sequential": setting.steps / statistics.mean(rounds),
            }
        )
    return rows


SWEEP_TOLERANCES = {
    "paradigms": (0.1, 0.03, 0.01, 0.003, 0.001),
    "picard": (0.1, 0.03, 0.01, 0.003, 0.001),
    "taa": (0.1, 0.03, 0.01, 0.003, 0.001),
    "srds": (0.1, 0.01, 0.001),
    "newton": (0.1, 0.01, 0.001),
}


def tolerance_sweep(shift: float, seeds: int) -> list[dict]:
    """Rounds against accuracy on the DDPM-100 action chunk, so solvers are compared at equal
    error: every solver at several tolerances, cold and warm, over ``seeds`` noise seeds."""
    scheduler = make_scheduler("chunk16x2", "ddpm")
    denoiser = make_denoiser("chunk16x2", scheduler)
    nearby = make_denoiser("chunk16x2", scheduler, -shift)
    problems = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        problem = DenoisingProblem.from_scheduler(
            scheduler, denoiser, 100, (1, 16, 2), generator=generator
        )
        previous = DenoisingProblem(nearby, problem.rule, problem.x_T, problem.noise)
        problems.append((problem, previous, sample(problem, "sequential").sample))
    rows = []
    for method, tolerances in SWEEP_TOLERANCES.items():
        options = {"pipelined": True} if method == "srds" else {}
        for tolerance in tolerances:
            row = {"method": method, "tolerance": tolerance}
            for start in ("cold", "warm"):
                rounds, errors = [], []
                for problem, previous, reference in problems:
                    guess = None
                    if start == "warm":
                        guess = sample(previous, method, tolerance=tolerance, **options).trajectory
                    result = sample(problem, method, init=guess, tolerance=tolerance, **options)
                    rounds.append(result.rounds)
                    errors.append(rms(result.sample, reference))
                row[f"{start}_rounds_mean"] = statistics.mean(rounds)
                row[f"{start}_rms_error_max"] = max(errors)
            rows.append(row)
    return rows


def format_sweep(rows: list[dict]) -> str:
    header = (
        f"{'method':10} {'tol':>6} {'cold rounds':>11} {'max err':>8} "
        f"{'warm rounds':>11} {'max err':>8}"
    )
    lines = ["DDPM-100 action chunk: rounds against accuracy", header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:10} {row['tolerance']:>6} {row['cold_rounds_mean']:>11.1f} "
            f"{row['cold_rms_error_max']:>8.1e} {row['warm_rounds_mean']:>11.1f} "
            f"{row['warm_rms_error_max']:>8.1e}"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'event':13} {'sched':5} {'N':>4} {'method':10} {'start':5} {'rounds':>6} {'max':>4} "
        f"{'evals':>7} {'max err':>8} {'ms':>7} {'x seq':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        head = (
            f"{row['event']:13} {row['scheduler']:5} {row['steps']:>4} "
            f"{row['method']:10} {row['start']:5}"
        )
        if "refused" in row:
            lines.append(f"{head} refused: {row['refused']}")
            continue
        lines.append(
            f"{head} {row['rounds_mean']:>6.1f} {row['rounds_max']:>4} "
            f"{row['model_evals_mean']:>7.0f} "
            f"{row['rms_error_vs_sequential_max']:>8.1e} {row['ms_per_sample']:>7.1f} "
            f"{row['speedup_vs_sequential']:>6.2f}"
        )
    return "\n".join(lines)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (empty where the OS has none): how quiet the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per configuration (median kept)"
    )
    parser.add_argument("--seeds", type=int, default=6, help="problems (noise seeds) per setting")
    parser.add_argument(
        "--shift", type=float, default=0.05, help="mean shift of the warm start's nearby problem"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument(
        "--events",
        nargs="+",
        default=["chunk16x2", "latent4x32x32"],
        choices=["chunk16x2", "latent4x32x32"],
    )
    parser.add_argument(
        "--schedulers", nargs="+", default=["ddpm", "ddim", "dpm"], choices=["ddpm", "ddim", "dpm"]
    )
    parser.add_argument("--output", type=Path, help="default: solvers.json in the results folder")
    parser.add_argument(
        "--no-sweep", dest="sweep", action="store_false", help="skip the tolerance sweep"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = {"ddpm": 100, "ddim": 50, "dpm": 20}
    rows = []
    for event in args.events:
        for scheduler in args.schedulers:
            rows.extend(
                run_setting(
                    Setting(event, scheduler, steps[scheduler]),
                    args.repeats,
                    args.shift,
                    args.seeds,
                )
            )
    sweep = tolerance_sweep(args.shift, args.seeds) if args.sweep else []
    report = {
        "benchmark": "policy_accel.bench.solvers",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "settings": {
            "repeats": args.repeats,
            "seeds": args.seeds,
            "warm_start_shift": args.shift,
            "batch": 1,
            "srds_rounds": "critical path of the pipelined schedule",
        },
        "rows": rows,
        "tolerance_sweep": sweep,
    }
    output = result_path("solvers.json", args.output)
    write_json(output, report)
    print(format_table(rows))
    if sweep:
        print("\n" + format_sweep(sweep))
    print(f"\ntorch threads: {torch.get_num_threads()}  |  wrote {output}")
    return report


if __name__ == "__main__":
    main()
