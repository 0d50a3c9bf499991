"""AsyncController: background plans, stale actions dropped, chunk merges, fixed-rate loop."""

import numpy as np
import pytest

import envs
from policy_accel.control import AsyncController, Controller
from policy_accel.policies import ObservationError


def _async(policy, **kwargs):
    return AsyncController(Controller(policy, method="picard"), **kwargs)


def test_merge_latest_replaces_and_stale_actions_are_dropped(tiny_pusht_policy):
    runtime = _async(tiny_pusht_policy)
    runtime.slot = 3
    runtime._merge(np.full((4, 2), 1.0), slot=1)  # planned from slot 1, arrives at slot 3
    assert runtime.stats.stale_dropped == 2 and sorted(runtime.timeline) == [3, 4]
    runtime._merge(np.full((4, 2), 5.0), slot=4)
    assert runtime.timeline[3][0] == 1.0 and runtime.timeline[4][0] == 5.0
    assert sorted(runtime.timeline) == [3, 4, 5, 6, 7]


def test_merge_average_blends_overlapping_actions(tiny_pusht_policy):
    runtime = _async(tiny_pusht_policy, merge="average", merge_weight=0.25)
    runtime._merge(np.full((4, 2), 4.0), slot=0)
    runtime._merge(np.full((4, 2), 8.0), slot=2)
    assert runtime.timeline[1][0] == 4.0
    assert runtime.timeline[2][0] == pytest.approx(0.75 * 4.0 + 0.25 * 8.0)
    assert runtime.timeline[5][0] == 8.0


def test_holding_the_last_action_when_the_timeline_runs_dry(tiny_pusht_policy):
    runtime = _async(tiny_pusht_policy)
    with pytest.raises(RuntimeError, match="wait for the first plan"):
        runtime.next_action()
    runtime._merge(np.array([[1.0, 2.0]]), slot=0)
    first = runtime.next_action()
    held = runtime.next_action()
    np.testing.assert_array_equal(first, held)
    assert runtime.stats.starved == 1


def test_simulated_time_plans_ahead_warm_starts_and_never_starves(tiny_pusht_policy):
    env = envs.make("pusht", max_episode_steps=40)
    runtime = _async(tiny_pusht_policy)  # replans when 4 of 8 actions are left
    stats = runtime.run(env, hz=10.0, seed=0, realtime=False)
    assert stats.steps == 40 and stats.starved == 0
    records = stats.records
    assert stats.plans == len(records) >= 40 // 8
    assert all(r.warm for r in records[1:])
    # each warm start is shifted by the slots between the two plans' observations
    assert all(0 < r.shift <= 8 for r in records[1:])
    env.close()


def test_realtime_loop_keeps_the_slot_count(tiny_pusht_policy):
    env = envs.make("pusht", max_episode_steps=20)
    runtime = _async(tiny_pusht_policy)
    stats = runtime.run(env, hz=50.0, seed=1)
    assert stats.steps == 20 and runtime.slot == 20 and stats.plans >= 1
    assert stats.max_period_error_ms >= 0.0
    # every plan's latency reached the delay estimator, and the estimate is in control steps
    assert runtime.delay.measured == stats.plans
    last = max(1, -(-stats.records[-1].latency_ms // 20))  # 50 Hz: 20 ms per step
    assert stats.delay_steps == runtime.delay.steps >= last
    env.close()


def test_planner_errors_reach_the_control_thread(tiny_pusht_policy, monkeypatch):
    runtime = _async(tiny_pusht_policy)
    with pytest.raises(ObservationError, match="missing key"):  # refused before planning
        runtime.observe({"wrong": np.zeros(3)})
    runtime.observe(np.zeros(20, np.float32) + 200.0)

    def fail(**_):
        raise ValueError("the model failed")

    monkeypatch.setattr(runtime.controller, "replan", fail)
    runtime.submit()
    with pytest.raises(RuntimeError, match="background planner failed.*the model failed"):
        runtime.wait_for_plan()


def test_bad_merge_settings_are_refused(tiny_pusht_policy):
    with pytest.raises(ValueError, match="merge must be"):
        _async(tiny_pusht_policy, merge="median")
    with pytest.raises(ValueError, match="merge_weight"):
        _async(tiny_pusht_policy, merge="average", merge_weight=0.0)


def test_inpainted_transitions_continue_the_queued_actions(tiny_pusht_policy):
    from policy_accel.control import DelayEstimator

    runtime = _async(tiny_pusht_policy, transition="inpaint")
    env = envs.make("pusht")
    obs, _ = env.reset(seed=0)
    runtime.observe(obs)
    queued = np.array([[100.0, 200.0], [110.0, 210.0], [120.0, 220.0]])
    runtime._merge(queued, slot=0)  # what the robot executes next
    runtime.delay = DelayEstimator(0.1, initial_steps=2)  # the plan will take two steps
    assert runtime.submit()
    runtime.wait_for_plan()
    record = runtime.stats.records[-1]
    assert record.committed == 2
    np.testing.assert_allclose(runtime.timeline[0], queued[0], atol=1e-3)
    np.testing.assert_allclose(runtime.timeline[1], queued[1], atol=1e-3)
    assert not np.allclose(runtime.timeline[2], queued[2])  # the new chunk takes over here
    env.close()
    with pytest.raises(ValueError, match="transition must be one of"):
        _async(tiny_pusht_policy, transition="blend")


@pytest.mark.parametrize("transition", ["naive", "inpaint"])
def test_simulated_real_time_keeps_the_env_moving_while_a_replan_is_in_flight(
    tiny_pusht_policy, transition
):
    env = envs.make("pusht", max_episode_steps=40)
    runtime = _async(tiny_pusht_policy, transition=transition)  # replans when 4 of 8 are left
    stats = runtime.simulate(env, hz=10.0, seed=0, delay_steps=2)
    assert stats.steps == 40 == len(stats.actions) and stats.starved == 0
    # every later plan starts with 4 actions queued and takes over 2 steps later: the chunk
    # planned at slot 4 runs from slot 6 (its first two entries were executed from the old one)
    assert stats.boundaries[0] == 4 + 2 and np.all(np.diff(stats.boundaries) == 4)
    later = stats.records[1:]
    assert all(r.warm and r.shift == 4 for r in later)
    assert all(r.committed == (2 if transition == "inpaint" else 0) for r in later)
    slow = runtime.simulate(env, hz=10.0, seed=0, delay_steps=6)  # longer than the queue
    assert slow.starved > 0  # the queue ran dry: the last action was held
    again = _async(tiny_pusht_policy, transition=transition).simulate(
        env, hz=10.0, seed=0, delay_steps=2
    )
    np.testing.assert_allclose(np.stack(again.actions), np.stack(stats.actions), atol=1e-4)
    with pytest.raises(ValueError, match="delay_steps must be a non-negative int"):
        runtime.simulate(env, hz=10.0, delay_steps=-1)
    env.close()
