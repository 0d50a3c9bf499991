"""Demonstrations from the scripted experts, written as a DiffusionPolicy replay buffer.

Each episode starts from seed ``first_seed + k``; only successful episodes are kept (as human
demonstrations are), so ``n_episodes`` successes may need a few more seeds. Per step the buffer
holds ``obs`` (the env's low-dim observation, or each key of a dict observation), ``action``, and
the task's own legacy keys (``env.record()``: PushT's ``keypoint`` / ``state`` / ``img``), so
both this package's trainer and DiffusionPolicy's dataset classes read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import envs
from policy_accel.data.replay_buffer import ReplayBuffer


@dataclass
class DemoStats:
    attempted: int
    kept: int
    mean_length: float

    @property
    def expert_success(self) -> float:
        return self.kept / max(self.attempted, 1)


def _as_entries(obs) -> dict[str, np.ndarray]:
    if isinstance(obs, dict):
        entries = {}
        for key, value in obs.items():
            value = np.asarray(value)
            if value.ndim == 3 and value.dtype.kind == "f":  # CHW float image -> HWC uint8
                value = np.round(np.moveaxis(value, 0, -1) * 255).astype(np.uint8)
            entries[key] = value
        return entries
    return {"obs": np.asarray(obs, dtype=np.float32)}


def collect_demos(
    env_name: str,
    n_episodes: int,
    *,
    obs: str | None = None,
    first_seed: int = 0,
    max_attempts: int | None = None,
    expert_seed: int = 0,
    on_episode: Callable[[int, bool, int], None] | None = None,
    **env_kwargs,
) -> tuple[ReplayBuffer, DemoStats]:
    """Run the expert of ``env_name`` until ``n_episodes`` successful episodes are recorded."""
    env = envs.make(env_name, obs=obs, **env_kwargs)
    expert = envs.make_expert(env_name, env, seed=expert_seed)
    buffer = ReplayBuffer()
    max_attempts = max_attempts or 2 * n_episodes + 10
    attempted, lengths = 0, []
    try:
        while buffer.n_episodes < n_episodes:
            if attempted >= max_attempts:
                raise RuntimeError(
                    f"{env_name}: only {buffer.n_episodes} of {n_episodes} expert episodes "
                    f"succeeded in {attempted} attempts; the expert is failing on this task."
                )
            observation, _ = env.reset(seed=first_seed + attempted)
            expert.reset()
            attempted += 1
            steps: list[dict[str, np.ndarray]] = []
            success = False
            while True:
                action = np.asarray(expert(observation), dtype=np.float32)
                record = getattr(env.unwrapped, "record", None)
                entry = {**_as_entries(observation), **(record() if record else {})}
                entry["action"] = action
                steps.append(entry)
                observation, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    success = bool(info.get("is_success", False))
                    break
            if on_episode is not None:
                on_episode(attempted, success, len(steps))
            if success:
                buffer.add_episode({key: np.stack([s[key] for s in steps]) for key in steps[0]})
                lengths.append(len(steps))
    finally:
        env.close()
    stats = DemoStats(attempted, buffer.n_episodes, float(np.mean(lengths)) if lengths else 0.0)
    return buffer, stats
