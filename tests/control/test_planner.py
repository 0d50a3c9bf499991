"""The planning core: every controller plans through one Planner, so a Controller, a one-row
BatchController and an eval row see the same noise and return the same chunks and records."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import envs
from policy_accel.control import BatchController, Controller, SamplerConfig
from policy_accel.control.batch import row_seed
from policy_accel.eval.config import EnvConfig, EvalConfig, EvalSettings, RuntimeConfig
from policy_accel.eval.evaluate import rollout
from policy_accel.sampling import SOLVERS


def _pusht_steps(seed: int, count: int) -> list[np.ndarray]:
    env = envs.make("pusht")
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for t in range(count - 1):
        obs, *_ = env.step(np.array([200.0 + 10 * t, 300.0]))
        out.append(obs)
    env.close()
    return out


def _without_latency(record) -> dict:
    values = dataclasses.asdict(record)
    values.pop("latency_ms")
    return values


@pytest.mark.parametrize("warm", [True, False])
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_a_one_row_batch_controller_is_the_controller(tiny_pusht_policy, method, warm):
    sampler = SamplerConfig(method=method, warm_start=warm)
    controller = Controller(tiny_pusht_policy, sampler, seed=row_seed(0, 11))
    batch = BatchController(tiny_pusht_policy, [11], sampler)
    steps = _pusht_steps(11, 17)
    batch.start_rows(steps[0][None], np.ones(1, dtype=bool))
    planned = 0
    for t, obs in enumerate(steps):
        if t:
            batch.observe(obs[None])
        step = controller.step(obs)
        if step.plan is None:
            continue
        plan = batch.plan(np.array([t == 0]), 8 if t else 0)
        np.testing.assert_array_equal(plan.actions[0], step.plan.chunk)
        assert _without_latency(plan.record) == _without_latency(step.plan.record)
        planned += 1
    assert planned == 3


def test_a_batch_of_rows_equals_one_controller_per_row(tiny_pusht_policy):
    sampler = SamplerConfig(method="picard", options={"tolerance": 1e-6})
    seeds = [21, 22, 23]
    batch = BatchController(tiny_pusht_policy, seeds, sampler)
    singles = [Controller(tiny_pusht_policy, sampler, seed=row_seed(0, s)) for s in seeds]
    streams = [_pusht_steps(s, 17) for s in seeds]
    batch.start_rows(np.stack([s[0] for s in streams]), np.ones(3, dtype=bool))
    for t in range(17):
        if t:
            batch.observe(np.stack([s[t] for s in streams]))
        steps = [c.step(stream[t]) for c, stream in zip(singles, streams, strict=True)]
        if t % 8:
            continue
        plan = batch.plan(np.array([t == 0] * 3), 8 if t else 0)
        for r, step in enumerate(steps):  # the same noise; chunks equal to the tolerance
            np.testing.assert_array_equal(plan.problem.noise[:, r], step.plan.problem.noise[:, 0])
            np.testing.assert_allclose(plan.actions[r], step.plan.chunk, atol=1e-2)


def test_scheduler_and_steps_come_from_the_sampler_config(tiny_pusht_policy):
    obs = _pusht_steps(31, 1)[0]
    ddim = SamplerConfig(
        method="sequential", warm_start=False, scheduler="ddim", num_inference_steps=4
    )
    plan = Controller(tiny_pusht_policy, ddim).plan(obs)
    assert type(plan.problem.rule).__name__ == "DDIMRule" and plan.record.rounds == 4
    parallel = SamplerConfig.from_settings(ddim, method="picard", tolerance=0.0)
    np.testing.assert_allclose(
        Controller(tiny_pusht_policy, parallel).plan(obs).chunk, plan.chunk, atol=1e-4
    )


def test_a_batch_records_each_rows_own_replan_and_its_stats_count_every_row(tiny_pusht_policy):
    sampler = SamplerConfig(method="chord", jacobian_stride=5)
    batch = BatchController(tiny_pusht_policy, [31, 32], sampler)
    streams = [_pusht_steps(seed, 9) for seed in (31, 32)]
    batch.start_rows(np.stack([s[0] for s in streams]), np.ones(2, dtype=bool))
    first = batch.plan(np.ones(2, dtype=bool), 0)
    for row in batch.rows:
        row.pending.result()  # the off-path Jacobian refresh has finished for both rows
    for t in range(1, 9):
        batch.observe(np.stack([s[t] for s in streams]))
    restarted = np.array([False, True])  # row 1's env was reset: a new episode, planned cold
    batch.start_rows(np.stack([streams[0][8], streams[1][0]]), restarted)
    second = batch.plan(restarted, 8)
    assert [r.warm for r in second.records] == [True, False]
    assert [r.jacobians for r in second.records] == [True, False]
    assert [r.shift for r in second.records] == [8, 0]
    shared = {(r.rounds, r.latency_ms, r.converged, r.batch_rows) for r in second.records}
    assert shared == {(second.result.rounds, second.record.latency_ms, second.result.converged, 2)}
    assert batch.records == [first.records, second.records]
    stats = batch.stats()  # 4 row replans: only row 0's second one warm, with Jacobians
    assert stats["n_plans"] == 4 and stats["n_batched_plans"] == 2
    assert stats["warm_fraction"] == stats["jacobians_fraction"] == 0.25


def test_bad_sampler_configs_name_the_setting():
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        SamplerConfig(method="fast")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['windw'\]"):
        SamplerConfig(options={"windw": 3})
    with pytest.raises(ValueError, match="scheduler 'euler' is not supported"):
        SamplerConfig(scheduler="euler")
    with pytest.raises(ValueError, match="budget_ms, not the solver's deadline"):
        SamplerConfig(options={"deadline": 1.0})
    with pytest.raises(ValueError, match=r"unknown sampler setting\(s\) \['methd'\]"):
        SamplerConfig.from_dict({"methd": "picard"})
    assert SamplerConfig.from_settings(method="taa", tolerance=1e-4).options == {"tolerance": 1e-4}


def test_eval_runs_budgets_and_reports_deadline_misses_and_fallbacks(tiny_pusht_policy, tmp_path):
    config = EvalConfig(
        env=EnvConfig(max_episode_steps=17, kwargs={"legacy_seeds": True}),
        runtime=RuntimeConfig(vector="sync"),
        eval=EvalSettings(n_episodes=2, batch_size=2, output_dir=str(tmp_path)),
    )
    tight = SamplerConfig(method="picard", budget_ms=1e-6, fallback_steps=3, name="tight")
    run = rollout(config, tight, policy=tiny_pusht_policy)
    assert all(e["deadline_misses"] == e["fallbacks"] == 3 for e in run["per_episode"])
    # the latency block counts both rows: two rows in each of three batched replans
    assert run["latency"]["deadline_misses"] == run["latency"]["fallbacks"] == 6
    assert run["latency"]["n_plans"] == 6 and run["latency"]["n_batched_plans"] == 3
    assert run["latency"]["rounds_mean"] == 1 + 3  # one round, then the DDIM-3 fallback


def test_importing_the_control_layer_needs_neither_gymnasium_nor_the_tasks():
    code = (
        "import sys, policy_accel.control; print('gymnasium' in sys.modules, 'envs' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
