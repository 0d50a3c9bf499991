"""Image-model benchmark on tiny random pipelines: ``python -m policy_accel.bench.images``.

A tiny Stable Diffusion pipeline (32x32 images, ``[B, 4, 16, 16]`` latents, classifier-free
guidance) runs on CPU with DDPM-1000, DDIM-100 and DPM-Solver++-50: the sequential pipeline, our
solvers (``picard``, ``taa``, ``paradigms``) at a practical tolerance, and diffusers' own
``StableDiffusionParadigmsPipeline`` (DDPM and DDIM only: diffusers has no parallel DPM-Solver).
Reported per setting: rounds (sequential batched UNet calls, the latency unit), model evaluations
per sample, RMS difference from the sequential sample relative to its RMS, and wall time as a
ratio to the sequential pipeline timed in the same run. The models are tiny, so wall time here
measures per-round overhead on CPU; rounds are what carries over to real models on a GPU.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from policy_accel.adapters import generate
from policy_accel.adapters.compare import compare_with_paradigms
from policy_accel.adapters.tiny import parameter_count, tiny_stable_diffusion
from policy_accel.bench.paths import result_path
from policy_accel.json_files import write_json

BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SETTINGS = {
    # trailing spacing: with all 1000 steps, leading spacing plus steps_offset=1 would start at 1000
    "ddpm": (lambda: DDPMScheduler(**BETAS, clip_sample=False, timestep_spacing="trailing"), 1000),
    "ddim": (lambda: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False), 100),
    "dpmsolver++": (lambda: DPMSolverMultistepScheduler(**BETAS), 50),
}


def _timed(run) -> tuple[object, float]:
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def run_setting(pipe, name: str, steps: int, prompts, methods, tolerance, window) -> dict:
    """One scheduler setting: sequential pipeline, our solvers, diffusers' ParaDiGMS."""
    make_scheduler, _ = SETTINGS[name]
    pipe.scheduler = make_scheduler()
    call = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="latent")
    reference, seconds = _timed(
        lambda: pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
    )
    scale = float(reference.pow(2).mean().sqrt())
    rows = {"sequential": {"rounds": steps, "model_evals": steps, "seconds": seconds}}
    for method in methods:
        (latents, result), seconds = _timed(
            lambda method=method: generate(
                pipe,
                prompts,
                method,
                generator=torch.Generator().manual_seed(0),
                window=window,
                **({} if tolerance is None else {"tolerance": tolerance}),
                **call,
            )
        )
        rows[method] = {
            "rounds": result.rounds,
            "model_evals": result.model_evals // len(prompts),
            "converged": bool(result.converged),
            "relative_rms_error": float((latents - reference).pow(2).mean().sqrt()) / scale,
            "seconds": seconds,
        }
    if name in ("ddpm", "ddim"):
        report, seconds = _timed(
            lambda: compare_with_paradigms(
                pipe,
                prompts,
                make_scheduler(),
                steps,
                methods=(),
                paradigms_tolerance=0.1 if tolerance is None else tolerance,
                paradigms_parallel=window,
            )
        )
        theirs = report["paradigms_diffusers"]
        rows["paradigms_diffusers"] = {
            "rounds": theirs["rounds"],
            "model_evals": theirs["model_evals"],
            "relative_rms_error": theirs["rms"] / theirs["reference_rms"],
            # the comparison also reruns the sequential pipeline once
            "seconds": seconds - rows["sequential"]["seconds"],
        }
    for row in rows.values():
        row["speedup_vs_sequential"] = rows["sequential"]["seconds"] / row["seconds"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every step count (e.g. 0.02 for a smoke run)",
    )
    parser.add_argument("--methods", nargs="+", default=["picard", "taa", "paradigms"])
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="one tolerance for every solver (default: each solver's own; diffusers' 0.1)",
    )
    parser.add_argument("--window", type=int, default=None, help="steps per round (default: all)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per sample")
    parser.add_argument("--out", type=Path, help="default: images.json in the results folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        pipe = tiny_stable_diffusion(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat", "a red cube", "a tree", "a boat"][: args.batch]
    results = {}
    for name in args.settings:
        steps = max(2, round(SETTINGS[name][1] * args.steps_scale))
        results[f"{name}-{steps}"] = run_setting(
            pipe, name, steps, prompts, args.methods, args.tolerance, args.window
        )
    payload = {
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "model": {"pipeline": "tiny StableDiffusionPipeline, 32x32", **parameter_count(pipe)},
        "options": {
            "tolerance": args.tolerance if args.tolerance is not None else "solver defaults",
            "window": args.window,
            "batch": args.batch,
            "guidance_scale": 7.5,
        },
        "results": results,
    }
    output = result_path("images.json", args.out)
    write_json(output, payload)
    print(f"{'setting':16} {'method':20} {'rounds':>6} {'evals':>7} {'rel err':>9} {'x seq':>6}")
    for setting, rows in results.items():
        for method, row in rows.items():
            error = row.get("relative_rms_error", 0.0)
            print(
                f"{setting:16} {method:20} {row['rounds']:>6} {row['model_evals']:>7} "
                f"{error:>9.1e} {row['speedup_vs_sequential']:>6.2f}"
            )
    print(f"\ntorch threads: {torch.get_num_threads()}  |  wrote {output}")
    return payload


if __name__ == "__main__":
    main()
