"""The device check: ``python -m policy_accel.bench.gpu`` (``make bench-gpu``).

One command that measures what a replan costs on the current device, in one run:

1. the GPU-marked tests (on a GPU);
2. ``t(P)``: one batched model call over ``P`` window positions of one sample, for the shipped
   PushT policy, a DiffusionPolicy-paper-size low-dim UNet (Chi et al.: down_dims 256/512/1024,
   ~65M parameters) and LeRobot's default DiffusionPolicy UNet sizes (down_dims 512/1024/2048,
   ~249M with PushT's conditioning; LeRobot's 263M adds its image encoder, which runs once per
   replan, not per round), random weights built through the real loaders (timing does not
   depend on them), eager and CUDA-graph-captured, fp32 and bf16;
3. closed-loop PushT replans of the shipped policy on a recorded episode, every configuration
   planning the same replan in turn (interleaved): sequential eager, sequential captured (the
   whole 100-step loop one graph), warm chord and picard eager and captured; latency p50/p99,
   rounds, model evaluations and the ratios to both sequential baselines;
4. the cost model: each configuration's replan latency predicted from ``t(P)`` and its rounds
   (:mod:`policy_accel.bench.cost`), beside the measured one.

Without a GPU the same script runs on the CPU with tiny sizes (seconds) and says so
(``"mode": "cpu-smoke"``), or at the real sizes with ``--full`` (minutes: the cost model's check
on this CPU). Writes ``gpu_<device>.json`` and ``gpu_<device>.md`` in the results
folder (:mod:`policy_accel.bench.paths`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from policy_accel.bench.cost import predicted_latency_ms, validate
from policy_accel.bench.episode import load_episode, record_episode
from policy_accel.bench.paths import checkpoints_dir, result_path
from policy_accel.control import Controller, SamplerConfig
from policy_accel.execution import LocalExecutor
from policy_accel.execution.bound import ConditionedDenoiser
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy

# the paper-size and LeRobot-default UNets (network sizes; the rest of the config is PushT's)
MODELS = {
    "chi_lowdim_unet": {"down_dims": [256, 512, 1024], "diffusion_step_embed_dim": 256},
    "lerobot_default_unet": {"down_dims": [512, 1024, 2048], "diffusion_step_embed_dim": 128},
}
TINY = {"down_dims": [16, 32, 64], "diffusion_step_embed_dim": 16}


@dataclass(frozen=True)
class Sizes:
    """What one run measures: GPU sizes, or tiny ones for the CPU smoke run."""

    positions: tuple[int, ...]
    repeats: int
    replans: int
    warm_up_replans: int
    models: dict
    dtypes: tuple[str, ...]
    validation_replans: int  # each model's own warm chord replans, to check the cost model

    @classmethod
    def for_device(cls, device: torch.device, replans: int | None, full: bool) -> Sizes:
        ladder = (1, 2, 4, 8, 16, 32, 64, 100)
        if device.type == "cuda":
            return cls(ladder, 20, replans or 24, 2, MODELS, ("float32", "bfloat16"), 8)
        if full:  # the real sizes on this CPU (minutes): the cost model's check
            return cls(ladder, 3, replans or 8, 1, MODELS, ("float32",), 3)
        tiny = {f"{name}_tiny": TINY for name in MODELS}
        return cls((1, 8, 100), 3, replans or 4, 1, tiny, ("float32",), 2)


# --- models ---------------------------------------------------------------------------------


def paper_size_policy(name: str, network: dict, directory: Path, device: str):
    """A random-weight DiffusionPolicy low-dim checkpoint with PushT's config (and normalizer)
    and ``network``'s UNet sizes, written in the converted format and loaded by
    :func:`load_policy` (the real loader); the LeRobot-default one is then exported to
    LeRobot's layout and loaded from there."""
    from safetensors.torch import save_file

    from policy_accel.policies.lerobot_export import export_lerobot
    from policy_accel.policies.networks.unet1d import ConditionalUnet1D

    shipped = checkpoints_dir() / "pusht_keypoints"
    meta = json.loads((shipped / "policy_accel.json").read_text())
    meta["policy"]["model"].update(network)
    meta["source"] = f"random weights, {name}"
    model_cfg = {k: v for k, v in meta["policy"]["model"].items() if k != "_target_"}
    torch.manual_seed(0)
    model = ConditionalUnet1D(**model_cfg)
    base = load_policy(shipped)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({k: v for k, v in base.modules.state_dict().items() if k.startswith("normalizer")})
    folder = directory / name
    folder.mkdir(parents=True)
    (folder / "policy_accel.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    if name.startswith("lerobot"):
        exported = export_lerobot(load_policy(folder), directory / f"{name}_lerobot", 2)
        return load_policy(exported, device=device)
    return load_policy(folder, device=device)


def parameters(policy) -> int:
    """Parameters of the network a round calls (the denoiser; not the observation encoder)."""
    network = policy.conditioning(_observation(policy)).network
    return sum(p.numel() for p in network.parameters())


# --- t(P) -----------------------------------------------------------------------------------


def _observation(policy, batch: int = 1) -> dict:
    rng = np.random.default_rng(0)
    obs = {}
    for key, shape in policy.observation_spec.items():
        low, high = (0.2, 0.8) if key in policy.image_keys else (100.0, 400.0)
        step = rng.uniform(low, high, shape).astype(np.float32)
        obs[key] = np.broadcast_to(step, (batch, policy.n_obs_steps, *shape)).copy()
    return obs


def call_times(policy, device: torch.device, sizes: Sizes, modes: tuple[str, ...]) -> list[dict]:
    """Median ms of one model call over ``P`` positions (one sample), per mode and dtype."""
    conditioning = policy.conditioning(_observation(policy))
    event = policy.event_shape
    rows = []
    for dtype_name in sizes.dtypes:
        dtype = getattr(torch, dtype_name)
        network = conditioning.network
        if dtype != torch.float32:
            network = copy.deepcopy(network).to(dtype)
        context = {k: v.to(dtype) for k, v in conditioning.context.items()}
        denoiser = ConditionedDenoiser(network, context, 1)
        for mode in modes:
            executor = LocalExecutor(device, dtype=dtype, cuda_graphs=mode == "graphs",
                                     bucket_ratio=1)  # fmt: skip
            for positions in sizes.positions:
                x = torch.randn(positions, 1, *event, device=device)
                t = torch.linspace(99, 0, positions, device=device).round().long()
                call = partial(executor.evaluate, denoiser, x, t)
                ms = _median_ms(call, device, sizes.repeats)
                rows.append({"dtype": dtype_name, "mode": mode, "positions": positions, "ms": ms})
    return rows


def _median_ms(function, device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up (and the capture, for graphs)
        function()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- closed loop ----------------------------------------------------------------------------


def closed_loop_configs(device: torch.device) -> dict[str, tuple[SamplerConfig, callable]]:
    """name -> (sampler, executor factory) of every configuration planned interleaved."""
    graphs = device.type == "cuda"

    def eager():
        return LocalExecutor(device)

    def captured():
        return (
            LocalExecutor(device, cuda_graphs=True) if graphs else LocalExecutor.emulating_graphs()
        )

    return {
        "sequential eager": (SamplerConfig(method="sequential"), eager),
        "sequential captured": (SamplerConfig(method="sequential"), captured),
        "chord eager": (SamplerConfig(), eager),
        "chord captured": (SamplerConfig(), captured),
        "picard captured": (SamplerConfig(method="picard"), captured),
    }


def closed_loop(policy, device: torch.device, sizes: Sizes) -> dict:
    """Every configuration's Controller steps through the recorded episode; they replan at the
    same steps (every n_action_steps), one after another at each replan."""
    episode = load_episode()
    n = policy.n_action_steps
    steps = episode[: (sizes.replans + sizes.warm_up_replans) * n]
    controllers = {
        name: Controller(policy, sampler, seed=0, executor=make())
        for name, (sampler, make) in closed_loop_configs(device).items()
    }
    plans: dict[str, list] = {name: [] for name in controllers}
    first_ms: dict[str, float] = {}
    for index, obs in enumerate(steps):
        for name, controller in controllers.items():
            step = controller.step(obs)
            if step.plan is None:
                continue
            if index // n < sizes.warm_up_replans:
                first_ms.setdefault(name, step.plan.record.latency_ms)
                continue
            plans[name].append(step.plan)
    rows = {}
    for name, made in plans.items():
        latency = np.array([p.record.latency_ms for p in made])
        rows[name] = {
            "replans": len(made),
            "p50_ms": float(np.percentile(latency, 50)),
            "p99_ms": float(np.percentile(latency, 99)),
            "mean_ms": float(latency.mean()),
            "rounds_mean": float(np.mean([p.record.rounds for p in made])),
            "model_evals_mean": float(np.mean([p.record.model_evals for p in made])),
            "warm_fraction": float(np.mean([p.record.warm for p in made])),
            "first_replan_ms": first_ms.get(name),
            "window_sizes": _window_sizes(made),
            "captures": getattr(controllers[name].planner.executor, "captures", None),
        }
    exact = _max_error(policy, plans["sequential eager"], plans)
    for name, row in rows.items():
        row["max_action_error_vs_sequential"] = exact[name]
        for base in ("sequential eager", "sequential captured"):
            row[f"speedup_vs_{base.replace(' ', '_')}"] = rows[base]["p50_ms"] / row["p50_ms"]
    return rows


def _window_sizes(plans) -> list[list[int]]:
    """Per replan, the positions each round evaluated (from the solver's residual count and
    the sizes it records; the last few replans)."""
    sizes = []
    for plan in plans[-3:]:
        sizes.append(list(plan.result.stats.get("window_sizes", [])))
    return sizes


def _max_error(policy, reference: list, plans: dict) -> dict[str, float]:
    """Largest normalized action difference from sequential eager (the same noise)."""
    errors = {}
    for name, made in plans.items():
        worst = 0.0
        for ours, theirs in zip(made, reference, strict=False):
            a = policy.normalize_action(torch.as_tensor(ours.chunk))
            b = policy.normalize_action(torch.as_tensor(theirs.chunk))
            worst = max(worst, float((a - b).abs().max()))
        errors[name] = worst
    return errors


# --- the run --------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def gpu_tests(seconds: int) -> list[dict]:
    """The GPU-marked tests (``pytest -m gpu``), each folder within ``seconds`` (the adapters'
    on their own: their conftest needs transformers, which a bare machine may lack)."""
    results = []
    for paths in (["tests/execution", "tests/sampling"], ["tests/adapters"]):
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   *paths]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
        except subprocess.TimeoutExpired:
            results.append({"paths": paths, "status": f"timed out after {seconds} s"})
            continue
        tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
        results.append({"paths": paths, "returncode": done.returncode,
                        "summary": tail[-1] if tail else "", "tail": tail})  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--replans", type=int, default=None, help="timed replans per config")
    parser.add_argument("--skip-tests", action="store_true", help="skip the GPU-marked tests")
    parser.add_argument(
        "--full", action="store_true", help="on a CPU: the real model sizes (minutes), not tiny"
    )
    parser.add_argument("--output", default=None, help="JSON path (default: results folder)")
    parser.add_argument(
        "--record-episode", action="store_true", help="re-record the PushT episode and exit"
    )
    args = parser.parse_args(argv)
    if args.record_episode:
        _log(f"recorded {record_episode()}")
        return {}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)
    sizes = Sizes.for_device(device, args.replans, args.full)
    started = time.perf_counter()
    name = device_name(device)
    report: dict = {
        "mode": "gpu" if device.type == "cuda" else ("cpu" if args.full else "cpu-smoke"),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else [],
    }
    _log(f"{report['mode']} on {name}")
    if device.type == "cuda" and not args.skip_tests:
        report["gpu_tests"] = gpu_tests(120)
        for run in report["gpu_tests"]:
            _log(f"gpu tests {run['paths']}: {run.get('summary') or run.get('status')}")
    modes = ("eager", "graphs") if device.type == "cuda" else ("eager",)
    shipped = load_policy(checkpoints_dir() / "pusht_keypoints", device=str(device))
    report["models"] = {"shipped_pusht": {"parameters": parameters(shipped),
                                               "loaded_as": type(shipped).__name__}}  # fmt: skip
    report["t_ms"] = {"shipped_pusht": call_times(shipped, device, sizes, modes)}
    _log("t(P) shipped done")
    report["closed_loop"] = closed_loop(shipped, device, sizes)
    _log("closed loop done")
    shipped_check = validate(
        shipped, "shipped_pusht", report, None, device, sizes.validation_replans
    )
    report["cost_model_check"] = [shipped_check]
    host_per_round = shipped_check["host_per_round_ms"]
    with tempfile.TemporaryDirectory() as scratch:
        for model, network in sizes.models.items():
            policy = paper_size_policy(model, network, Path(scratch), str(device))
            report["models"][model] = {"parameters": parameters(policy),
                                       "loaded_as": type(policy).__name__}  # fmt: skip
            report["t_ms"][model] = call_times(policy, device, sizes, modes)
            report["cost_model_check"].append(
                validate(policy, model, report, host_per_round, device, sizes.validation_replans)
            )
            del policy
            _log(f"t(P) and cost-model check {model} done")
    report["cost_model"] = predicted_latency_ms(report)
    report["elapsed_s"] = time.perf_counter() - started
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    output = result_path(f"gpu_{slug}.json", args.output)
    write_json(output, report)
    output.with_suffix(".md").write_text(markdown(report))
    _log(f"wrote {output} in {report['elapsed_s']:.0f} s")
    return report


def markdown(report: dict) -> str:
    lines = [f"# Replan cost on {report['device']} ({report['mode']})", ""]
    if report["mode"] != "gpu":
        lines += [
            "No GPU: the captured configurations are emulated (a replay runs the captured "
            "function again, at full windows), which checks them, not their speed.",
            "",
        ]
    lines += ["| configuration | p50 ms | p99 ms | rounds | model evals | vs seq. eager | "
              "vs seq. captured | first replan ms | max error |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, row in report["closed_loop"].items():
        lines.append(
            f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['rounds_mean']:.1f} | "
            f"{row['model_evals_mean']:.0f} | {row['speedup_vs_sequential_eager']:.2f}x | "
            f"{row['speedup_vs_sequential_captured']:.2f}x | "
            f"{(row['first_replan_ms'] or math.nan):.0f} | "
            f"{row['max_action_error_vs_sequential']:.2g} |"
        )
    lines += ["", "## t(P): one model call over P positions (ms, median)", ""]
    for model, rows in report["t_ms"].items():
        keys = sorted({(r["dtype"], r["mode"]) for r in rows})
        positions = sorted({r["positions"] for r in rows})
        lines += [f"### {model} ({report['models'][model]['parameters'] or 0:,} parameters)", "",
                  "| dtype | mode | " + " | ".join(f"P={p}" for p in positions) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in positions) + " |"]  # fmt: skip
        for dtype, mode in keys:
            cells = [next(r["ms"] for r in rows if (r["dtype"], r["mode"], r["positions"])
                          == (dtype, mode, p)) for p in positions]  # fmt: skip
            lines.append(f"| {dtype} | {mode} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        lines.append("")
    lines += ["## Cost model check: each model's own warm chord replans (ms, mean)", "",
              "Predicted: the sum of t(P) over each replan's rounds plus the host time per "
              "round measured on the shipped policy (its row is that calibration).", "",
              "| model | replans | rounds | measured | predicted | error | host per round |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in report.get("cost_model_check", []):
        lines.append(
            f"| {row['model']} | {row['replans']} | {row['rounds_mean']:.1f} | "
            f"{row['measured_ms_mean']:.1f} | {row['predicted_ms_mean']:.1f} | "
            f"{100 * row['relative_error']:+.0f}% | {row['host_per_round_ms']:.2f} |"
        )
    lines += ["", "## Cost model: predicted vs measured replan latency (ms)", "",
              "| model | configuration | dtype | rounds | predicted | measured |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in report["cost_model"]:
        measured = row.get("measured_ms")
        lines.append(
            f"| {row['model']} | {row['configuration']} | {row['dtype']} | {row['rounds']:.1f} | "
            f"{row['predicted_ms']:.2f} | {'' if measured is None else f'{measured:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def _log(message: str) -> None:
    print(f"[bench-gpu] {message}", flush=True)


if __name__ == "__main__":
    main()
