"""Round cost and replan latency on one device: ``python -m policy_accel.bench.execution``.

For the DiffusionPolicy-paper-size lowdim UNet (down_dims 256/512/1024, kernel 5, horizon 16,
action_dim 2, 2 x 20-dim observations; random weights, since timing does not depend on them):

* one denoiser call at batch 1, 8, 32, 100 (eager, ``torch.compile``d, CUDA-graphed on a GPU);
* the replan latency of 100-step DDPM (p50/p99 over ``--replans`` replans): sequential eager,
  sequential graphed (GPU), and each parallel solver warm-started from the previous replan (noise
  and trajectory shifted by n_action_steps=8, conditioning perturbed as a new observation would),
  with rounds and model evaluations, as ratios to sequential eager in the same run.

Writes ``execution_cpu.json`` (``gpu_<name>.json`` on a GPU) in the results folder
(``benchmarks/results/`` by default, see :mod:`policy_accel.bench.paths`). Threads are set to
``--threads`` and recorded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from policy_accel.bench.paths import result_path
from policy_accel.bench.solvers import machine
from policy_accel.execution import LocalExecutor
from policy_accel.json_files import write_json
from policy_accel.policies.base import ConditionedDenoiser
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from policy_accel.sampling import DenoisingProblem, sample
from policy_accel.sampling.warm_start import shift_noise, warm_start_guess

PAPER_UNET = dict(
    input_dim=2,
    global_cond_dim=40,
    diffusion_step_embed_dim=128,
    down_dims=(256, 512, 1024),
    kernel_size=5,
    n_groups=8,
    cond_predict_scale=True,
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, device, repeats: int) -> list[float]:
    function()
    _synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def call_times(network, device, modes, batches, repeats) -> list[dict]:
    """One denoiser call on a window of ``batch`` positions of one sample (as a round is)."""
    rows = []
    cond = torch.randn(1, 40, device=device)
    denoiser = ConditionedDenoiser(network, {"global_cond": cond}, 1)
    for batch in batches:
        window = torch.randn(batch, 1, 16, 2, device=device)  # [P, B=1, horizon, action_dim]
        positions = torch.arange(batch, device=device) % 100
        for mode in modes:
            executor = _executor(mode, device)

            def call(executor=executor, window=window, positions=positions):
                return executor.evaluate(denoiser, window, positions)

            seconds = _timed(call, device, repeats)
            rows.append(
                {"batch": batch, "mode": mode, "ms_median": 1000 * statistics.median(seconds)}
            )
    return rows


def _executor(mode: str, device: torch.device) -> LocalExecutor:
    return LocalExecutor(device, compile=mode == "compiled", cuda_graphs=mode == "graphed")


def replans(network, device, solvers, modes, count: int, seed: int = 0) -> list[dict]:
    scheduler = DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    conds = [torch.randn(1, 40, generator=generator)]
    for _ in range(count):
        conds.append(conds[-1] + 0.05 * torch.randn(1, 40, generator=generator))

    def problem_for(cond, x_T=None, noise=None):
        denoiser = ConditionedDenoiser(network, {"global_cond": cond.to(device)}, 1)
        return DenoisingProblem.from_scheduler(
            scheduler,
            denoiser,
            100,
            (1, 16, 2),
            generator=generator,
            x_T=x_T,
            noise=noise,
            device=device,
        )

    rows = []
    runs = [("sequential", mode) for mode in modes if mode != "compiled"] + [
        (s, "eager") for s in solvers
    ]
    for method, mode in runs:
        executor = _executor(mode, device)
        previous = sample(problem_for(conds[0]), "sequential", executor=executor)
        latencies, rounds, evals = [], [], []
        for index in range(1, count + 1):
            base = problem_for(conds[index])
            x_T, noise = shift_noise(previous.trajectory[0], base.noise, 8, generator=generator)
            problem = problem_for(conds[index], x_T=x_T, noise=noise)
            guess = None if method == "sequential" else warm_start_guess(problem, previous, 8)
            _synchronize(device)
            start = time.perf_counter()
            result = sample(problem, method, init=guess, executor=executor)
            _synchronize(device)
            latencies.append(time.perf_counter() - start)
            rounds.append(result.rounds)
            evals.append(result.model_evals)
            previous = result
        latencies.sort()
        rows.append(
            {
                "method": method,
                "mode": mode,
                "start": "cold" if method == "sequential" else "warm",
                "p50_ms": 1000 * statistics.median(latencies),
                "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                "rounds_mean": statistics.mean(rounds),
                "model_evals_mean": statistics.mean(evals),
            }
        )
    reference = next(
        r["p50_ms"] for r in rows if r["method"] == "sequential" and r["mode"] == "eager"
    )
    for row in rows:
        row["speedup_p50_vs_sequential_eager"] = reference / row["p50_ms"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replans", type=int, default=5)
    parser.add_argument(
        "--solvers",
        nargs="+",
        default=None,
        help="default: all parallel solvers "
        "(newton left out on CPU, where its 32 JVP directions per row are too slow)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = ConditionalUnet1D(**PAPER_UNET).to(device).eval()
    modes = (
        ["eager"]
        + (["compiled"] if args.compile else [])
        + (["graphed"] if device.type == "cuda" else [])
    )
    solvers = args.solvers or ["paradigms", "picard", "taa", "srds"] + (
        ["newton"] if device.type == "cuda" else []
    )
    report = {
        "benchmark": "policy_accel.bench.execution",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {**machine(), "device": str(device)},
        "network": {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in PAPER_UNET.items()},
            "parameters": sum(p.numel() for p in network.parameters()),
        },
        "call_times": call_times(network, device, modes, args.batches, args.repeats),
        "replans": replans(network, device, solvers, modes, args.replans),
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace(" ", "_")
        report["machine"]["gpu"] = torch.cuda.get_device_name(device)
        output = result_path(f"gpu_{name}.json", args.output)
    else:
        output = result_path("execution_cpu.json", args.output)
    write_json(output, report)
    for row in report["call_times"]:
        print(f"call  batch {row['batch']:>4} {row['mode']:9} {row['ms_median']:9.2f} ms")
    for row in report["replans"]:
        print(
            f"replan {row['method']:10} {row['mode']:8} {row['start']:5} "
            f"p50 {row['p50_ms']:9.1f} ms  p99 {row['p99_ms']:9.1f} ms  "
            f"rounds {row['rounds_mean']:5.1f}  "
            f"x{row['speedup_p50_vs_sequential_eager']:.2f}"
        )
    print(f"\ndevice {device}, torch threads {torch.get_num_threads()}  |  wrote {output}")
    return report


if __name__ == "__main__":
    main()
