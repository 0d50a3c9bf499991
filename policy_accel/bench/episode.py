"""The recorded PushT episode the replan benchmarks replay (``bench.gpu``, the cost model's
check): a device machine replays the same replans without the simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from policy_accel.bench.paths import checkpoints_dir
from policy_accel.control import Controller, SamplerConfig
from policy_accel.policies.loading import load_policy

EPISODE = Path(__file__).with_name("data") / "pusht_episode.npz"


def load_episode() -> np.ndarray:
    """``[T, 20]`` consecutive PushT keypoint observations."""
    return np.load(EPISODE)["obs"]


def record_episode(steps: int = 400, seed: int = 100000) -> Path:
    """Record the observations of a PushT episode (the shipped policy, warm chord) into
    :data:`EPISODE`, so that the device replays the same replans without the simulator."""
    import envs  # the simulator: only to record

    policy = load_policy(checkpoints_dir() / "pusht_keypoints")
    controller = Controller(policy, SamplerConfig(), seed=0)
    env = envs.make("pusht", legacy_seeds=True)
    obs, _ = env.reset(seed=seed)
    recorded = []
    for _ in range(steps):
        recorded.append(np.asarray(obs, dtype=np.float32))
        obs, _, terminated, truncated, _ = env.step(controller.act(obs))
        if terminated or truncated:
            obs, _ = env.reset(seed=seed + 1)
            controller.reset()
    EPISODE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(EPISODE, obs=np.stack(recorded), seed=seed)
    return EPISODE


def as_observation(policy, obs: np.ndarray):
    """A recorded PushT step for ``policy``: the flat 20 entries, or LeRobot's split of them
    (``observation.state`` the trailing 2, as ``export_lerobot`` wrote it)."""
    spec = policy.observation_spec
    if len(spec) == 1:
        return obs
    state = spec["observation.state"][0]
    return {"observation.environment_state": obs[:-state], "observation.state": obs[-state:]}
