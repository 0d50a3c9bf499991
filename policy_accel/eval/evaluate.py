"""Batched closed-loop evaluation: ``policy-accel eval`` runs :func:`evaluate`.

``eval.batch_size`` envs (a gymnasium vector env; ``async`` runs each in its own process started
with ``spawn``, which MuJoCo needs) step in lockstep; each replan is one batched policy call by a
:class:`~policy_accel.control.batch.BatchController`, with per-episode noise streams so samplers
compare on the same seeds and noise. A finished env starts the next seed at the next replan.

Latency-aware simulation: with ``runtime.inference_delay_steps = k`` the robot keeps executing
the previous chunk for ``k`` steps while the replan is "in flight", as it would on hardware: each
cycle executes the previous plan's actions ``n .. n+k-1`` and then the new plan's actions
``k .. n-1`` (``n`` = n_action_steps; the first plan of an episode has nothing to hold and runs
undelayed). ``"auto"`` sets ``k = ceil(latency * control_hz)`` from each replan's measured latency
(the batched call's: use ``eval.batch_size=1`` for a single robot's latency). With
``runtime.transition="inpaint"`` the held actions are inpainted into the replan (committed-prefix
inpainting, real-time chunking without retraining), so the new chunk continues them; with
``"soft_inpaint"`` the rest of the old chunk's overlap is followed softly too (RTC's decaying
prefix schedule, :meth:`~policy_accel.policies.base.Policy.problem`); with
``runtime.merge="average"`` the new chunk's actions that the old chunk also planned become
``(1 - w) old + w new`` (temporal ensembling, ``w = runtime.merge_weight``); with
``"auto"`` the replan inpaints as many as a :class:`~policy_accel.control.delay.DelayEstimator`
of the latencies so far expects (a slower plan than expected holds old actions beyond them). A
delay beyond what the previous chunk holds counts its excess as ``starved_steps`` (a robot would
have had no fresh action; the engine executes the chunk's last ones).

Outputs: ``<output_dir>/<date>/<time>_<name>/eval_info.json`` (aggregates with DiffusionPolicy /
LeRobot names, ``per_episode``, and ``latency``: latency percentiles, rounds, model evaluations,
warm and Jacobian fractions over every live row of every replan, ``n_plans`` row replans in
``n_batched_plans`` batched calls; per episode the action jump where each new chunk takes over and
the jerk, see :func:`~policy_accel.eval.smoothness.action_smoothness`), written after every
finished episode so an interrupted run keeps its results, and up to ``n_videos`` mp4 files. The
policy is recorded as ``policy.path`` was given. An env that raises ends only its own episode,
recorded with its ``error``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

import envs
from policy_accel.control.batch import BatchController
from policy_accel.control.delay import DelayEstimator
from policy_accel.control.records import batch_stats
from policy_accel.eval.config import EvalConfig, SamplerConfig
from policy_accel.eval.guard import EpisodeGuard
from policy_accel.eval.smoothness import action_smoothness
from policy_accel.json_files import write_json
from policy_accel.policies.loading import load_policy


def _make_guarded(name: str, obs: str | None, kwargs: dict) -> EpisodeGuard:
    return EpisodeGuard(functools.partial(envs.make, name, obs=obs, **kwargs))


def make_vector_env(config: EvalConfig, size: int, env_factory=None) -> gym.vector.VectorEnv:
    kwargs = dict(config.env.kwargs)
    if config.env.max_episode_steps is not None:
        kwargs["max_episode_steps"] = config.env.max_episode_steps
    factory = env_factory or functools.partial(
        _make_guarded, config.env.name, config.env.obs, kwargs
    )
    fns = [factory] * size
    if config.runtime.vector == "sync" or size == 1:
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    return AsyncVectorEnv(fns, context="spawn", autoreset_mode=AutoresetMode.DISABLED)


def _set_rows(target: Any, source: Any, rows: np.ndarray) -> Any:
    if isinstance(target, dict):
        for key in target:
            target[key][rows] = source[key][rows]
        return target
    target[rows] = source[rows]
    return target


def _info_value(info: dict, key: str, row: int, default=None):
    if key not in info:
        return default
    mask = info.get(f"_{key}")  # gymnasium's per-row "this env reported the key" flags
    return info[key][row] if mask is None or mask[row] else default


class _Episode:
    def __init__(self, seed: int, record: bool) -> None:
        self.seed = seed
        self.record = record
        self.sum_reward = 0.0
        self.max_reward = 0.0
        self.coverage: float | None = None
        self.success = False
        self.steps = 0
        self.error: str | None = None
        self.records: list = []  # this episode's row record of every replan
        self.starved = 0  # steps a replan was still in flight after the previous chunk ran out
        self.actions: list[np.ndarray] = []  # as executed
        self.boundaries: list[int] = []  # indices into `actions` where a new chunk took over

    def result(self) -> dict:
        mine = self.records
        out = {
            "seed": self.seed,
            "sum_reward": self.sum_reward,
            "max_reward": self.max_reward,
            "success": self.success,
            "steps": self.steps,
            "replans": len(mine),
            "rounds_mean": float(np.mean([r.rounds for r in mine])) if mine else 0.0,
            "latency_ms_p50": float(np.median([r.latency_ms for r in mine])) if mine else 0.0,
            "deadline_misses": int(sum(r.deadline_hit for r in mine)),
            "fallbacks": int(sum(r.fallback for r in mine)),
            "committed_actions": int(sum(r.committed for r in mine)),
            "starved_steps": self.starved,
        }
        if self.actions:
            out.update(action_smoothness(np.stack(self.actions), self.boundaries))
        if self.coverage is not None:
            out["coverage"] = self.coverage
        if self.error is not None:
            out["error"] = self.error
        return out


def aggregate(per_episode: list[dict]) -> dict[str, float]:
    """``pc_success``, ``avg_sum_reward``, ``avg_max_reward``, DP's ``mean_score`` (errored
    episodes excluded and counted)."""
    done = [e for e in per_episode if "error" not in e]
    if not done:
        return {"n_episodes": 0, "n_errors": len(per_episode)}

    def mean_of(key: str, reduce=np.mean) -> float | None:
        values = [e[key] for e in done if e.get(key) is not None]
        return float(reduce(values)) if values else None

    return {
        "n_episodes": len(done),
        "n_errors": len(per_episode) - len(done),
        "pc_success": 100.0 * float(np.mean([e["success"] for e in done])),
        "avg_sum_reward": float(np.mean([e["sum_reward"] for e in done])),
        "avg_max_reward": float(np.mean([e["max_reward"] for e in done])),
        "mean_score": float(np.mean([e["max_reward"] for e in done])),
        "boundary_jump_mean": mean_of("boundary_jump_mean"),
        "boundary_jump_max": mean_of("boundary_jump_max", np.max),
        "step_mean": mean_of("step_mean"),
        "jerk_mean": mean_of("jerk"),
    }


def rollout(
    config: EvalConfig,
    sampler: SamplerConfig,
    policy=None,
    video_dir: Path | None = None,
    on_episode=None,
    env_factory=None,
) -> dict:
    """Run ``eval.n_episodes`` episodes with ``sampler``; returns eval_info (no files but
    videos). ``on_episode(finished)`` is called with the list of finished episodes after each
    one (progress, partial saves)."""
    policy = policy or load_policy(config.policy.path, device=config.policy.device)
    seeds = [config.env.first_seed + i for i in range(config.eval.n_episodes)]
    size = min(config.eval.batch_size, len(seeds))
    vector = make_vector_env(config, size, env_factory)
    controller = BatchController(
        policy,
        seeds[:size],
        sampler,
        n_action_steps=config.runtime.n_action_steps,
        noise_seed=config.eval.noise_seed,
    )
    n_act = controller.n_action_steps
    delay_setting = config.runtime.inference_delay_steps
    inpaint = config.runtime.transition in ("inpaint", "soft_inpaint")
    soft = config.runtime.transition == "soft_inpaint"
    delays = DelayEstimator(1.0 / config.runtime.control_hz)
    pending = list(seeds)
    episodes: list[_Episode | None] = [None] * size
    finished: list[dict] = []
    plans: list[tuple] = []  # the live rows' records of every replan: the latency block's
    videos_left = config.eval.n_videos

    def start(rows: np.ndarray) -> Any:
        nonlocal videos_left
        seeds_now = [None] * size
        for row in np.flatnonzero(rows):
            seed = pending.pop(0)
            record = videos_left > 0 and video_dir is not None
            videos_left -= int(record)
            episodes[row] = _Episode(seed, record)
            controller.reseed(row, seed)
            seeds_now[row] = seed
        for row in np.flatnonzero(rows):
            _call_one(vector, row, "set_recording", episodes[row].record)
        obs, info = vector.reset(seed=seeds_now, options={"reset_mask": rows})
        for row in np.flatnonzero(rows):
            error = _info_value(info, "error", row)
            if error is not None:
                episodes[row].error = str(error)
        return obs

    def finish(row: int) -> None:
        episode = episodes[row]
        if episode.record and video_dir is not None:
            frames = _call_one(vector, row, "take_frames")
            if frames:
                write_video(video_dir / f"episode_{episode.seed}.mp4", frames, config)
        finished.append(episode.result())
        episodes[row] = None
        if on_episode is not None:
            on_episode(finished)

    try:
        first = np.zeros(size, dtype=bool)
        first[: min(size, len(pending))] = True
        obs = start(first)
        new_episode = first.copy()
        previous_future: np.ndarray | None = None
        executed = 0
        while any(e is not None for e in episodes):
            for row in range(size):  # episodes whose reset failed end at once
                if episodes[row] is not None and episodes[row].error is not None:
                    finish(row)
            live = np.array([e is not None for e in episodes])
            if not live.any():
                if not pending:
                    break
                obs = start(np.ones(size, dtype=bool) & (np.arange(size) < len(pending)))
                new_episode = np.array([e is not None for e in episodes])
                continue
            if new_episode.any():
                controller.start_rows(obs, new_episode)
            committed = overlap = None
            if inpaint and previous_future is not None:
                # what the robot will execute while this replan is in flight: the delay
                # expected before the plan (measured latencies so far, or the fixed setting)
                expected = delays.steps if delay_setting == "auto" else int(delay_setting)
                expected = min(expected, previous_future.shape[1] - n_act)
                if expected > 0:
                    committed = previous_future[:, n_act : n_act + expected].copy()
                    committed[new_episode] = np.nan
                if soft and previous_future.shape[1] > n_act + expected:
                    overlap = previous_future[:, n_act + expected :].copy()  # the old plan's rest
                    overlap[new_episode] = np.nan
            plan = controller.plan(new_episode, executed, committed=committed, overlap=overlap)
            future = plan.future
            live_records = tuple(plan.records[row] for row in np.flatnonzero(live))
            for row, record in zip(np.flatnonzero(live), live_records, strict=True):
                episodes[row].records.append(record)
            plans.append(live_records)
            latency_s = plan.record.latency_ms / 1e3
            delays.record(latency_s)
            if delay_setting == "auto":
                delay = math.ceil(latency_s * config.runtime.control_hz)
            else:
                delay = int(delay_setting)
            available = future.shape[1] - n_act  # what the previous chunk holds beyond its part
            if delay > available and previous_future is not None:
                for row in np.flatnonzero(live & ~new_episode):
                    episodes[row].starved += delay - available  # nothing fresh to execute
            delay = min(delay, available)
            actions = future[:, :n_act].copy()
            first_new = np.zeros(size, dtype=int)  # the cycle step where the new chunk starts
            if delay > 0 and previous_future is not None:
                held, hold = ~new_episode, min(delay, n_act)
                actions[held, :hold] = previous_future[held, n_act : n_act + hold]
                # a delay of a whole cycle or more runs only the previous plan's actions: its
                # takeover from the plan before it is at the cycle's first step
                first_new[held] = hold if hold < n_act else 0
            if config.runtime.merge == "average" and previous_future is not None:
                # temporal ensembling: where the old chunk also planned a step, the two average
                held, w = ~new_episode, config.runtime.merge_weight
                overlap = slice(delay, min(n_act, previous_future.shape[1] - n_act))
                old = previous_future[:, n_act:][:, overlap]
                actions[held, overlap] = (1 - w) * old[held] + w * actions[held, overlap]
            previous_future = future
            done_rows = np.zeros(size, dtype=bool)
            for k in range(n_act):
                obs_k, reward, _, _, info = vector.step(actions[:, k])
                for row in np.flatnonzero(live & ~done_rows):
                    episode = episodes[row]
                    if k == first_new[row] and episode.actions:
                        episode.boundaries.append(len(episode.actions))
                    episode.actions.append(np.asarray(actions[row, k]))
                    episode.steps += 1
                    episode.sum_reward += float(reward[row])
                    score = _info_value(info, "score", row, reward[row])
                    episode.max_reward = max(episode.max_reward, float(score))
                    coverage = _info_value(info, "coverage", row)
                    if coverage is not None:
                        episode.coverage = max(episode.coverage or 0.0, float(coverage))
                    error = _info_value(info, "error", row)
                    if error is not None:
                        episode.error = str(error)
                    if _info_value(info, "done", row, False):
                        episode.success = bool(_info_value(info, "is_success", row, False))
                        done_rows[row] = True
                obs = obs_k  # rows whose episode ended repeat their last observation
                # the history holds consecutive steps, as in training; live rows are validated
                controller.observe(obs, live & ~done_rows)
                if (done_rows | ~live).all():
                    break
            executed = n_act
            for row in np.flatnonzero(done_rows):
                finish(row)
            restart = np.zeros(size, dtype=bool)
            for row in np.flatnonzero(done_rows)[: len(pending)]:
                restart[row] = True
            new_episode = restart
            if restart.any():
                obs = _set_rows(obs, start(restart), restart)
    finally:
        vector.close()
    finished.sort(key=lambda e: e["seed"])
    return {
        "label": sampler.label,
        "sampler": sampler.to_dict(),
        "aggregated": aggregate(finished),
        "latency": batch_stats(plans),
        "per_episode": finished,
    }


def _call_one(vector: gym.vector.VectorEnv, row: int, name: str, *args):
    """Call a method of one sub-env (gymnasium's ``call`` addresses all of them)."""
    if isinstance(vector, SyncVectorEnv):
        return getattr(vector.envs[row], name)(*args)
    pipe = vector.parent_pipes[row]
    pipe.send(("_call", (name, args, {})))
    result, success = pipe.recv()
    if not success:
        raise RuntimeError(f"env {row}: {name} failed: {result}")
    return result


def write_video(path: Path, frames: list[np.ndarray], config: EvalConfig) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    fps = max(int(round(config.runtime.control_hz)), 1)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))


def paired_difference(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Success of ``a`` minus ``b`` on the seeds both finished, with a 95% normal-approximation
    confidence interval of the paired mean difference."""
    by_seed = {e["seed"]: e for e in b if "error" not in e}
    pairs = [
        (float(e["success"]), float(by_seed[e["seed"]]["success"]))
        for e in a
        if "error" not in e and e["seed"] in by_seed
    ]
    if not pairs:
        return {"n": 0}
    d = np.array([x - y for x, y in pairs])
    mean = float(d.mean())
    if len(d) < 2:  # no interval from one pair: undefined, written as null
        return {"n": len(d), "diff": mean, "ci95_low": None, "ci95_high": None}
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    return {"n": len(d), "diff": mean, "ci95_low": mean - half, "ci95_high": mean + half}


def output_directory(config: EvalConfig, name: str) -> Path:
    """A new directory ``<output_dir>/<date>/<time>_<name>`` (``_2``, ``_3``, ... appended when
    another eval took that name in the same second), created here so two runs never share it."""
    now = datetime.now()
    parent = Path(config.eval.output_dir) / now.strftime("%Y-%m-%d")
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{now:%H-%M-%S}_{name}"
    for attempt in range(1, 10_000):
        directory = parent / (base if attempt == 1 else f"{base}_{attempt}")
        try:
            directory.mkdir()
            return directory
        except FileExistsError:
            continue
    raise FileExistsError(f"no free output directory for {base} in {parent}.")


def evaluate(config: EvalConfig, on_progress=None, env_factory=None) -> tuple[dict, Path]:
    """The whole ``policy-accel eval`` run: one sampler, or several in compare mode.
    ``on_progress(label, finished, total)`` reports each finished episode (the CLI draws a bar).
    The torch thread count is the entry point's to set (``runtime.threads`` in the CLI)."""
    policy = load_policy(config.policy.path, device=config.policy.device)
    samplers = [config.sampler, *config.compare_samplers]
    name = config.eval.name or f"{config.env.name.replace('/', '_')}_{config.sampler.label}"
    directory = output_directory(config, name)
    info: dict[str, Any] = {
        "name": name,
        "policy": config.policy.path,
        "env": asdict(config.env),
        "runtime": asdict(config.runtime),
        "eval": asdict(config.eval),
        "torch_threads": config.runtime.threads,
    }
    runs = []

    def save(partial: list[dict] | None = None, label: str | None = None) -> None:
        snapshot = dict(info)
        snapshot["runs"] = runs + (
            [{"sampler": label, "partial": True, "per_episode": partial}] if partial else []
        )
        write_json(directory / "eval_info.json", snapshot)

    for sampler in samplers:
        run = rollout(
            config,
            sampler,
            policy=policy,
            video_dir=directory / "videos" / sampler.label if config.eval.n_videos else None,
            on_episode=lambda done, label=sampler.label: (
                save(done, label),
                on_progress and on_progress(label, len(done), config.eval.n_episodes),
            ),
            env_factory=env_factory,
        )
        runs.append(run)
        save()
    first = runs[0]
    info["aggregated"] = first["aggregated"]
    info["latency"] = first["latency"]
    info["per_episode"] = first["per_episode"]
    info["runs"] = runs
    if len(runs) > 1:
        info["compare"] = [
            {
                "sampler": run["label"],
                **run["aggregated"],
                "rounds_mean": run["latency"].get("rounds_mean"),
                "latency_ms_p50": run["latency"].get("latency_ms_p50"),
                "deadline_misses": run["latency"].get("deadline_misses"),
                "fallbacks": run["latency"].get("fallbacks"),
                "success_diff_vs_first": paired_difference(
                    run["per_episode"], first["per_episode"]
                ),
            }
            for run in runs
        ]
    write_json(directory / "eval_info.json", info)
    return info, directory
