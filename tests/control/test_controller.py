"""The Controller: receding horizon bookkeeping, exact warm starts, deadlines, stats."""

import numpy as np
import pytest
import torch

import envs
from policy_accel.control import Controller
from policy_accel.sampling import sample


@pytest.fixture()
def env():
    env = envs.make("pusht")
    yield env
    env.close()


def test_queue_executes_exactly_n_action_steps_per_plan(tiny_pusht_policy, env):
    controller = Controller(tiny_pusht_policy, method="sequential", n_action_steps=5)
    obs, _ = env.reset(seed=0)
    for step in range(11):
        action = controller.act(obs)
        assert action.shape == (2,)
        assert len(controller.records) == step // 5 + 1
        obs, *_ = env.step(action)
    assert [r.shift for r in controller.records] == [0, 5, 5]


def test_history_repeats_the_first_observation_and_never_mutates_the_callers(
    tiny_pusht_policy, env
):
    controller = Controller(tiny_pusht_policy, method="sequential")
    obs, _ = env.reset(seed=1)
    original = obs.copy()
    controller.act(obs)
    np.testing.assert_array_equal(obs, original)
    np.testing.assert_array_equal(controller.history.stacked()["obs"], np.stack([original] * 2))
    obs[:] = 0.0  # the caller reuses its buffer: the history keeps its own copy
    assert np.all(controller.history.stacked()["obs"] == original)


def _sequential_chunk(policy, plan):
    """The chunk sequential sampling gives for a plan's observation and noise, computed here
    independently of ``Controller.reference``."""
    problem = policy.problem(plan.observations, x_T=plan.problem.x_T, noise=plan.problem.noise)
    return policy.decode(sample(problem, "sequential").sample)["action"][0].numpy()


def test_reference_is_the_sequential_sample_of_the_plan(tiny_pusht_policy, env):
    controller = Controller(tiny_pusht_policy, method="picard", tolerance=1e-6)
    obs, _ = env.reset(seed=7)
    plan = controller.plan(obs)
    expected = _sequential_chunk(tiny_pusht_policy, plan)
    np.testing.assert_allclose(controller.reference(plan), expected, atol=1e-6)
    np.testing.assert_allclose(plan.chunk, expected, atol=1e-3)
    assert plan.record.method == "picard" and plan.result.converged


@pytest.mark.parametrize("warm_noise", ["fresh", "shifted"])
@pytest.mark.parametrize("method", ["picard", "newton", "paradigms", "chord"])
def test_warm_started_chunks_equal_the_sequential_sample_of_their_noise(
    tiny_pusht_policy, env, method, warm_noise
):
    controller = Controller(tiny_pusht_policy, method=method, tolerance=1e-6, warm_noise=warm_noise)
    obs, _ = env.reset(seed=2)
    controller.observe(obs)
    plans = []
    for _ in range(3):  # three replans: one cold, two warm
        plans.append(controller.replan(executed=8 if plans else 0))
        expected = _sequential_chunk(tiny_pusht_policy, plans[-1])
        np.testing.assert_allclose(plans[-1].chunk, expected, atol=1e-3)
        for action in plans[-1].chunk:
            obs, *_ = env.step(action)
            controller.observe(obs)
    assert [p.record.warm for p in plans] == [False, True, True]
    assert [p.record.shift for p in plans] == [0, 8, 8]


@pytest.mark.parametrize("method", ["picard", "chord"])
def test_with_fresh_noise_a_warm_controller_plans_what_the_sequential_one_plans(
    tiny_pusht_policy, method
):
    """The default warm start draws every replan's noise as a cold sampler does, so the same
    seed gives the sequential Controller's chunks, step by step, to the solver's tolerance."""
    runs = {}
    for name in ("sequential", method):
        env = envs.make("pusht")
        controller = Controller(tiny_pusht_policy, method=name, seed=11, n_action_steps=4)
        if name != "sequential":
            controller = Controller(
                tiny_pusht_policy, method=name, seed=11, n_action_steps=4, tolerance=1e-6
            )
        obs, _ = env.reset(seed=5)
        actions, warm = [], []
        for _ in range(16):
            step = controller.step(obs)
            if step.plan is not None:
                warm.append(step.plan.record.warm)
            actions.append(step.action)
            obs, *_ = env.step(step.action)
        env.close()
        runs[name] = (np.array(actions), warm)
    np.testing.assert_allclose(runs[method][0], runs["sequential"][0], atol=1e-2)
    assert runs[method][1] == [False, True, True, True]


def test_with_shifted_noise_consecutive_warm_plans_share_noise_on_their_overlap(
    tiny_pusht_policy, env
):
    controller = Controller(tiny_pusht_policy, method="picard", warm_noise="shifted")
    obs, _ = env.reset(seed=3)
    steps = []
    for _ in range(9):  # replans at the first step and after 8 executed actions
        steps.append(controller.step(obs))
        obs, *_ = env.step(steps[-1].action)
    first, second = steps[0].plan.problem, steps[8].plan.problem
    assert all(step.plan is None for step in steps[1:8])
    torch.testing.assert_close(second.x_T[:, :8], first.x_T[:, 8:])
    torch.testing.assert_close(second.noise[:, :, :8], first.noise[:, :, 8:])
    cold = Controller(tiny_pusht_policy, method="picard", warm_start=False)
    obs, _ = env.reset(seed=3)
    plans = []
    for _ in range(9):
        step = cold.step(obs)
        plans += [step.plan] if step.plan is not None else []
        obs, *_ = env.step(step.action)
    assert not torch.allclose(plans[1].problem.x_T[:, :8], first.x_T[:, 8:])
    assert [p.record.warm for p in plans] == [False, False]


def test_warm_start_needs_fewer_rounds(tiny_pusht_policy, env):
    rounds = {}
    for warm in (False, True):
        controller = Controller(tiny_pusht_policy, method="picard", warm_start=warm)
        obs, _ = env.reset(seed=4)
        for _ in range(40):
            obs, *_ = env.step(controller.act(obs))
        rounds[warm] = controller.stats()["rounds_mean"]
    assert rounds[True] < rounds[False]


def test_deadline_returns_the_best_chunk_flagged_and_can_fall_back(tiny_pusht_policy, env):
    obs, _ = env.reset(seed=5)
    late = Controller(tiny_pusht_policy, method="picard", budget_ms=1e-6, tolerance=0.0)
    plan = late.plan(obs)
    assert plan.chunk.shape == (8, 2) and np.all(np.isfinite(plan.chunk))
    assert plan.record.deadline_hit and not plan.record.converged and plan.record.rounds == 1
    rescued = Controller(
        tiny_pusht_policy, method="picard", budget_ms=1e-6, fallback_steps=3, tolerance=0.0
    )
    plan = rescued.plan(obs)
    assert plan.record.fallback and rescued.stats()["fallbacks"] == 1
    assert plan.record.rounds == 1 + 3  # the stopped round and the fallback's steps


def test_stats_report_latency_percentiles_and_rounds(tiny_pusht_policy, env):
    controller = Controller(tiny_pusht_policy, method="picard")
    obs, _ = env.reset(seed=6)
    for _ in range(17):
        obs, *_ = env.step(controller.act(obs))
    stats = controller.stats()
    assert stats["n_plans"] == 3
    assert stats["latency_ms_p50"] <= stats["latency_ms_p95"] <= stats["latency_ms_p99"]
    assert 1 <= stats["rounds_mean"] <= 10 and stats["warm_fraction"] == pytest.approx(2 / 3)
    controller.reset()
    assert len(controller.history) == 0 and not controller.queue
    assert controller.stats()["n_plans"] == 3  # records survive a reset


def test_bad_settings_are_refused_with_clear_messages(tiny_pusht_policy):
    with pytest.raises(ValueError, match="unknown method"):
        Controller(tiny_pusht_policy, method="fast")
    with pytest.raises(ValueError, match="between 1 and"):
        Controller(tiny_pusht_policy, n_action_steps=9)
    with pytest.raises(ValueError, match="cannot stop early"):
        Controller(tiny_pusht_policy, method="sequential", budget_ms=10)
    with pytest.raises(ValueError, match="only applies"):
        Controller(tiny_pusht_policy, fallback_steps=4)


def test_a_misspelled_setting_names_both_kinds_of_setting_and_the_close_match(tiny_pusht_policy):
    with pytest.raises(TypeError) as refused:
        Controller(tiny_pusht_policy, budget_msec=50)
    message = str(refused.value)
    assert "['budget_msec']" in message and "did you mean 'budget_ms'?" in message
    assert "neither SamplerConfig fields nor options of method 'chord'" in message
    assert "'fallback_steps'" in message and "'jacobian_stride'" in message  # the fields
    assert "'max_rounds'" in message and "'secant'" in message  # chord's options
    # the options listed are the chosen method's: sequential takes no tolerance
    only_callback = r"\['tolerance'\].*options of 'sequential': \['callback'\]"
    with pytest.raises(TypeError, match=only_callback):
        Controller(tiny_pusht_policy, method="sequential", tolerance=1e-3)
    with pytest.raises(TypeError, match="did you mean 'window'"):
        Controller(tiny_pusht_policy, method="picard", windw=4)


def test_a_refused_observation_changes_nothing(tiny_pusht_policy, env):
    """A bad observation is refused before it enters the history, and the next good one plans
    exactly as if the bad one had never been sent."""
    from policy_accel.policies import ObservationError

    obs, _ = env.reset(seed=5)
    steps = [obs]
    for _ in range(3):
        obs, *_ = env.step(np.array([250.0, 250.0]))
        steps.append(obs)
    clean = Controller(tiny_pusht_policy, method="picard", seed=9)
    poisoned = Controller(tiny_pusht_policy, method="picard", seed=9)
    bad = [
        (np.full(20, np.nan), "NaN or Inf"),
        (np.full(20, 1e30), "range this policy was trained on"),
        (steps[0][:19], r"shape \(19,\), expected \(20,\)"),
        ({"state": steps[0]}, r"missing key\(s\) \['obs'\]"),
        (np.array(["a"] * 20), "real number array"),
    ]
    for step in steps:
        for value, message in bad:
            with pytest.raises(ObservationError, match=message):
                poisoned.plan(value)
        np.testing.assert_array_equal(poisoned.plan(step).chunk, clean.plan(step).chunk)
    assert len(poisoned.records) == len(clean.records) == len(steps)


def test_a_failed_plan_leaves_history_and_noise_as_they_were(tiny_pusht_policy, env, monkeypatch):
    obs, _ = env.reset(seed=6)
    clean = Controller(tiny_pusht_policy, method="picard", seed=4)
    failing = Controller(tiny_pusht_policy, method="picard", seed=4)
    np.testing.assert_array_equal(failing.plan(obs).chunk, clean.plan(obs).chunk)
    original = type(failing.policy).decode

    def broken(self, x0):
        raise FloatingPointError("the model overflowed")

    monkeypatch.setattr(type(failing.policy), "decode", broken)
    with pytest.raises(FloatingPointError):
        failing.plan(obs + 1.0)  # noise drawn and history appended, then the plan fails
    monkeypatch.setattr(type(failing.policy), "decode", original)
    obs2, *_ = env.step(np.array([240.0, 260.0]))
    np.testing.assert_array_equal(failing.plan(obs2).chunk, clean.plan(obs2).chunk)


def test_chord_replans_never_wait_for_the_off_path_jacobian_refresh(
    tiny_pusht_policy, env, monkeypatch
):
    import threading
    import time

    from policy_accel.control.planner import Planner

    release = threading.Event()
    measure = Planner.refresh

    def held(self, problem, trajectory):
        release.wait(30)  # the robot's idle time is over before the refresh is
        return measure(self, problem, trajectory)

    monkeypatch.setattr(Planner, "refresh", held)
    controller = Controller(
        tiny_pusht_policy, method="chord", jacobian_stride=10, n_action_steps=4, seed=1
    )
    obs, _ = env.reset(seed=2)
    plans = []
    while len(plans) < 2:
        step = controller.step(obs)
        if step.plan is not None:
            plans.append(step.plan)
        obs, *_ = env.step(step.action)
    started = time.perf_counter()
    assert [p.record.jacobians for p in plans] == [False, False]  # the refresh was dropped
    release.set()
    controller.row.pending.result(timeout=30)  # now the robot idles long enough
    while len(plans) < 3:
        step = controller.step(obs)
        if step.plan is not None:
            plans.append(step.plan)
        obs, *_ = env.step(step.action)
    assert time.perf_counter() - started < 30
    assert plans[-1].record.jacobians and plans[-1].record.warm
    reference = controller.reference(plans[-1])
    assert np.abs(plans[-1].chunk - reference).max() < 1.0  # env units (pixels of 512)
    controller.planner.close()


def test_jacobian_stride_is_for_chord_only(tiny_pusht_policy):
    with pytest.raises(ValueError, match="jacobian_stride applies to method='chord' only"):
        Controller(tiny_pusht_policy, method="picard", jacobian_stride=4)


def test_bad_warm_noise_settings_are_refused(tiny_pusht_policy):
    with pytest.raises(ValueError, match=r"warm_noise must be one of \['fresh', 'shifted'\]"):
        Controller(tiny_pusht_policy, warm_noise="old")
    with pytest.raises(ValueError, match="use warm_noise='shifted' with it"):
        Controller(tiny_pusht_policy, warm_space="trajectory")
    Controller(tiny_pusht_policy, warm_space="trajectory", warm_noise="shifted")
