"""The main job (``make demo``): the shipped PushT policy in closed loop.

The shipped ``checkpoints/pusht_keypoints`` policy (100-step DDPM) runs a few of DiffusionPolicy's
PushT test episodes twice, on the same seeds and noise, in simulated real time at 10 Hz (each
replan takes its measured latency in control steps while the robot executes the previous chunk,
whose actions are inpainted into the new one): once with the sequential sampler, once with
warm-started chord Newton (the Controller's default). It prints success, score, rounds per
replan, the latency ratio, steps starved of a fresh action and the jump at chunk boundaries, and
writes a video of an episode and a plot of rounds and latency per replan under ``outputs/demo/``.

Rounds (sequential batched model calls per replan) are the hardware-independent latency: 100 for
the sequential sampler. Wall-clock time per replan depends on what one round costs: on a GPU a
round over all 100 steps costs about one model call, on a small CPU it costs many, so the latency
ratio printed here on a CPU is not the GPU's (see README's measured tables).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from policy_accel.eval.config import (
    EnvConfig,
    EvalConfig,
    EvalSettings,
    PolicyConfig,
    RuntimeConfig,
    SamplerConfig,
)
from policy_accel.eval.evaluate import evaluate

SHIPPED = Path("checkpoints") / "pusht_keypoints"


def default_checkpoint() -> str:
    """The shipped policy as a user names it, which ``eval_info.json`` records as given:
    ``checkpoints/pusht_keypoints`` under the working directory (``make demo`` runs in the
    repository), else the source checkout's (an editable install run from elsewhere)."""
    if SHIPPED.is_dir():
        return str(SHIPPED)
    checkout = Path(__file__).resolve().parents[1] / SHIPPED
    if checkout.is_dir():
        return str(checkout)
    raise SystemExit(
        f"no shipped checkpoint {SHIPPED} under {Path.cwd()} or the source checkout (the "
        "checkpoints are not part of an installed package): run from the repository root or "
        "pass --checkpoint PATH."
    )


def plot(info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for run in info["runs"]:
        name = run["sampler"]["name"]
        records = run["latency"]
        rounds = [e["rounds_mean"] for e in run["per_episode"]]
        axes[0].bar(name, np.mean(rounds))
        axes[1].bar(name, records["latency_ms_p50"])
    axes[0].set_ylabel("rounds per replan (mean)")
    axes[1].set_ylabel("latency per replan, p50 (ms)")
    fig.suptitle(
        "PushT, simulated real time at 10 Hz: sequential vs warm chord (same seeds, noise)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help=f"default: {SHIPPED}")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--max-steps", type=int, default=300, help="episode length limit")
    args = parser.parse_args(argv)
    config = EvalConfig(
        policy=PolicyConfig(path=args.checkpoint or default_checkpoint()),
        env=EnvConfig(
            name="pusht",
            obs="keypoints",
            max_episode_steps=args.max_steps,
            kwargs={"legacy_seeds": True},
        ),
        sampler=SamplerConfig(method="sequential", warm_start=False, name="sequential"),
        # simulated real time at 10 Hz: each replan takes its measured latency in control steps,
        # during which the robot executes the previous chunk's actions (inpainted into the new one)
        runtime=RuntimeConfig(
            vector="sync", threads=1, inference_delay_steps="auto", transition="inpaint"
        ),
        eval=EvalSettings(
            n_episodes=args.episodes,
            batch_size=1,  # one robot: the latency it would see
            n_videos=1,
            output_dir=args.output_dir,
            name="pusht_demo",
        ),
        compare_samplers=[SamplerConfig(name="chord_warm")],  # the Controller's default
    )
    from policy_accel.cli import progress_bars

    torch.set_num_threads(1)
    with progress_bars(quiet=False) as on_progress:
        info, directory = evaluate(config, on_progress=on_progress)
    plot(info, directory / "rounds_latency.png")
    sequential = info["runs"][0]["latency"]["latency_ms_p50"]
    print(
        f"\nPushT, {args.episodes} of DiffusionPolicy's test episodes, 100-step DDPM, simulated "
        "real time at 10 Hz (a replan takes its measured latency in control steps):"
    )
    print(
        f"{'sampler':<12} {'success':>8} {'score':>6} {'rounds/replan':>14} {'p50 ms':>8} "
        f"{'vs sequential':>14} {'starved':>8} {'jump':>6}"
    )
    for run in info["runs"]:
        agg, lat = run["aggregated"], run["latency"]
        starved = sum(e.get("starved_steps", 0) for e in run["per_episode"])
        steps = sum(e["steps"] for e in run["per_episode"])
        jump = agg.get("boundary_jump_mean")
        print(
            f"{run['sampler']['name']:<12} {agg['pc_success']:7.0f}% {agg['mean_score']:6.3f} "
            f"{lat['rounds_mean']:14.1f} {lat['latency_ms_p50']:8.1f} "
            f"{sequential / lat['latency_ms_p50']:13.2f}x {starved:4d}/{steps:<4d}"
            f"{'-' if jump is None else f'{jump:6.1f}':>6}"
        )
    print("starved: steps with no fresh action (the replan still in flight); jump: mean action")
    print("change where a new chunk takes over, in pixels.")
    videos = sorted((directory / "videos").rglob("*.mp4"))
    print(f"\nwrote {directory / 'eval_info.json'}, {directory / 'rounds_latency.png'}")
    for video in videos:
        print(f"wrote {video}")
    (directory / "summary.json").write_text(
        json.dumps(
            {
                "runs": [
                    {k: r[k] for k in ("sampler", "aggregated", "latency")} for r in info["runs"]
                ]
            },
            indent=2,
        )
    )
    return info


if __name__ == "__main__":
    main()
