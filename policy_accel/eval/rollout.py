"""Episodes in lockstep: every live env replans in one batched policy call.

Noise is drawn per episode and per replan from a generator seeded by ``(noise_seed, env seed)``,
so two samplers evaluated on the same seeds see the same noise whatever the batch composition:
differences in reward come from the sampler, not from the draw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import envs
from envs.receding_horizon import RecedingHorizonWrapper
from policy_accel.policies.base import Policy


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    sum_reward: float
    max_reward: float
    steps: int
    coverage: float | None = None
    rounds: list[int] = field(default_factory=list)
    model_evals: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)


def replan_noise(policy: Policy, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_T`` ``[1, H, Da]`` and the per-step noise ``[N, 1, H, Da]`` of one replan."""
    shape = (1, policy.horizon, policy.action_dim)
    x_T = torch.randn(shape, generator=generator)
    noise = torch.randn((policy.num_inference_steps, *shape), generator=generator)
    return x_T, noise


def _policy_obs(policy: Policy, histories: list[Any]) -> dict[str, np.ndarray]:
    if isinstance(histories[0], dict):
        return {key: np.stack([h[key] for h in histories]) for key in histories[0]}
    (key,) = policy.observation_spec
    return {key: np.stack(histories)}


def run_episodes(
    policy: Policy,
    env_name: str,
    seeds: list[int],
    *,
    method: str = "sequential",
    obs: str | None = None,
    noise_seed: int = 0,
    record_actions: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    **solver_options,
) -> list[EpisodeResult]:
    """Run one episode per seed with ``policy`` sampling by ``method`` (cold start each replan)."""
    env_kwargs = env_kwargs or {}
    wrapped = [
        RecedingHorizonWrapper(
            envs.make(env_name, obs=obs, **env_kwargs), policy.n_obs_steps, policy.n_action_steps
        )
        for _ in seeds
    ]
    results = [EpisodeResult(seed, False, 0.0, 0.0, 0) for seed in seeds]
    histories = []
    generators = []
    for env, seed in zip(wrapped, seeds, strict=True):
        history, _ = env.reset(seed=seed)
        histories.append(history)
        generators.append(torch.Generator().manual_seed(noise_seed * 1_000_003 + seed))
    live = list(range(len(seeds)))
    try:
        while live:
            draws = [replan_noise(policy, generators[i]) for i in live]
            x_T = torch.cat([d[0] for d in draws]).to(policy.device)
            noise = torch.cat([d[1] for d in draws], dim=1).to(policy.device)
            start = time.perf_counter()
            out = policy.predict_action(
                _policy_obs(policy, [histories[i] for i in live]),
                method=method,
                x_T=x_T,
                noise=noise,
                **solver_options,
            )
            latency = (time.perf_counter() - start) * 1e3
            chunks = out["action"].cpu().numpy()
            sample = out["result"]
            still = []
            for row, i in enumerate(live):
                result = results[i]
                result.rounds.append(int(sample.rounds))
                result.model_evals.append(int(sample.model_evals))
                result.converged.append(bool(sample.converged))
                result.latency_ms.append(latency)
                if record_actions:
                    result.actions.append(chunks[row])
                history, reward, terminated, truncated, info = wrapped[i].step(chunks[row])
                histories[i] = history
                result.steps += info["executed"]
                result.sum_reward += reward
                result.max_reward = max(result.max_reward, float(info.get("score", reward)))
                if "coverage" in info:
                    result.coverage = max(result.coverage or 0.0, float(info["coverage"]))
                if terminated or truncated:
                    result.success = bool(info.get("is_success", False))
                else:
                    still.append(i)
            live = still
    finally:
        for env in wrapped:
            env.close()
    return results


def summarize(results: list[EpisodeResult]) -> dict[str, float]:
    """DiffusionPolicy / LeRobot names: ``pc_success``, ``avg_sum_reward``, ``avg_max_reward``
    and DiffusionPolicy's ``mean_score`` (mean of per-episode max reward)."""
    rounds = [r for result in results for r in result.rounds]
    return {
        "n_episodes": len(results),
        "pc_success": 100.0 * float(np.mean([r.success for r in results])),
        "avg_sum_reward": float(np.mean([r.sum_reward for r in results])),
        "avg_max_reward": float(np.mean([r.max_reward for r in results])),
        "mean_score": float(np.mean([r.max_reward for r in results])),
        "rounds_mean": float(np.mean(rounds)) if rounds else 0.0,
        "rounds_p90": float(np.percentile(rounds, 90)) if rounds else 0.0,
    }
