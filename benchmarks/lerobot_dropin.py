"""LeRobot's own sampler vs the drop-in, interleaved, through LeRobot's ``select_action`` loop.

Two copies of one LeRobot ``DiffusionPolicy`` step side by side through the same observations,
each with LeRobot's processors and queues: the first samples with LeRobot's own 100-step DDPM
loop, the second is accelerated (:func:`policy_accel.integrations.lerobot.accelerate`, chord,
warm). Before each step both draw from torch's global generator seeded alike, so they sample
with the same noise, and every replan is timed for both in turn (interleaved: other load on the
machine slows both alike). Reported: rounds per replan (mean, p90), model evaluations, latency
(p50) of each and their ratio, and the max action difference (environment units).

Two cases: ``fixture``, the LeRobot PushT fixture checkpoint (30 training steps; state 2 +
environment state 16) on its recorded frames, interpolated to a slowly moving sequence; and
``pusht_export``, the shipped PushT policy exported to LeRobot's format (``policy-accel
export-lerobot``) in closed loop on the simulated PushT task, driven by LeRobot's own actions.

Run in the LeRobot venv (``make test-lerobot`` builds it):
``.venv-lerobot/bin/python benchmarks/lerobot_dropin.py``; writes
``benchmarks/results/lerobot_dropin.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors

from policy_accel.integrations.lerobot import accelerate

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "lerobot" / "diffusion_pusht_keypoints"


def load(directory: Path):
    policy = DiffusionPolicy.from_pretrained(directory)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(directory))
    return policy, pre, post


def fixture_frames(count: int) -> list[dict]:
    cases = np.load(FIXTURE / "cases.npz")
    keys = ("observation.state", "observation.environment_state")
    recorded = {key: cases[f"episode__obs__{key}"][:, :1] for key in keys}  # one robot
    length = recorded[keys[0]].shape[0]
    frames = []
    for step in range(count):
        position = step * (length - 1) / max(count - 1, 1)
        low, frac = int(position), position - int(position)
        high = min(low + 1, length - 1)
        frames.append({
            key: torch.as_tensor((1 - frac) * value[low] + frac * value[high], dtype=torch.float32)
            for key, value in recorded.items()
        })  # fmt: skip
    return frames


def compare(directory: Path, steps: int, env_factory=None, frames=None, seed: int = 0) -> dict:
    """Step LeRobot's policy and the accelerated copy through the same observations."""
    own, pre, post = load(directory)
    fast = copy.deepcopy(own)
    sampler = accelerate(fast)
    own.reset()
    fast.reset()
    env = obs = None
    if env_factory is not None:
        env = env_factory()
        obs, _ = env.reset(seed=100000 + seed)
    own_ms, fast_ms, differences = [], [], []
    for step in range(steps):
        if env is not None:
            frame = {
                "observation.state": torch.as_tensor(obs[None, -2:], dtype=torch.float32),
                "observation.environment_state": torch.as_tensor(obs[None, :-2],
                                                                 dtype=torch.float32),
            }  # fmt: skip
        else:
            frame = frames[step]
        replan = len(own._queues["action"]) == 0
        actions = []
        for policy, times in ((own, own_ms), (fast, fast_ms)):
            torch.manual_seed(seed * 100003 + step)
            start = time.perf_counter()
            with torch.no_grad():
                action = post(policy.select_action(pre(dict(frame))))
            if replan:
                times.append((time.perf_counter() - start) * 1e3)
            actions.append(action)
        differences.append(float((actions[0] - actions[1]).abs().max()))
        if env is not None:
            obs, _, terminated, truncated, _ = env.step(actions[0][0].numpy())
            if terminated or truncated:
                break
    records = sampler.records
    warm = [r for r in records if r.warm]
    return {
        "steps": step + 1,
        "replans": len(records),
        "lerobot": {
            "rounds_mean": float(own.diffusion.num_inference_steps),
            "latency_ms_p50": float(np.median(own_ms)),
        },  # fmt: skip
        "dropin": {
            "method": sampler.method,
            "rounds_mean": float(np.mean([r.rounds for r in records])),
            "rounds_mean_warm": float(np.mean([r.rounds for r in warm])) if warm else None,
            "rounds_p90": float(np.percentile([r.rounds for r in records], 90)),
            "model_evals_mean": float(np.mean([r.model_evals for r in records])),
            "latency_ms_p50": float(np.median(fast_ms)),
            "converged_fraction": float(np.mean([r.converged for r in records])),
        },
        "latency_ratio_p50": float(np.median(fast_ms) / np.median(own_ms)),
        "max_action_difference": float(max(differences)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96, help="control steps per case")
    parser.add_argument("--threads", type=int, default=1)
    results = ROOT / "benchmarks" / "results"
    parser.add_argument("--output", type=Path, default=results / "lerobot_dropin.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "lerobot_dropin",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": args.threads,
            "device": "cpu",
        },  # fmt: skip
        "cases": {},
    }
    report["cases"]["fixture"] = compare(FIXTURE, args.steps, frames=fixture_frames(args.steps))
    import envs
    from policy_accel.policies.lerobot_export import export_lerobot
    from policy_accel.policies.loading import load_policy

    with tempfile.TemporaryDirectory() as scratch:
        exported = export_lerobot(load_policy(ROOT / "checkpoints" / "pusht_keypoints"),
                                  Path(scratch) / "pusht", state_size=2)  # fmt: skip
        report["cases"]["pusht_export"] = compare(
            exported,
            args.steps,
            env_factory=lambda: envs.make(
                "pusht", obs="keypoints", legacy_seeds=True, max_episode_steps=300
            ),  # fmt: skip
        )
    for name, case in report["cases"].items():
        print(
            f"{name:>13}: LeRobot 100 rounds, p50 {case['lerobot']['latency_ms_p50']:.0f} ms | "
            f"drop-in {case['dropin']['rounds_mean']:.1f} rounds (warm "
            f"{case['dropin']['rounds_mean_warm']}), p50 {case['dropin']['latency_ms_p50']:.0f} "
            f"ms ({case['latency_ratio_p50']:.2f}x) | max |a - a_lerobot| "
            f"{case['max_action_difference']:.4f}"
        )
    report["machine"]["load_average_after"] = os.getloadavg()  # 1, 5, 15 min: was it quiet?
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
