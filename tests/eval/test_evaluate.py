"""policy-accel eval's engine: JSON layout, videos, compare mode, delays, failing envs."""

import json
from pathlib import Path

import numpy as np
import pytest

import envs
from policy_accel.control import Controller
from policy_accel.eval.config import (
    EnvConfig,
    EvalConfig,
    EvalSettings,
    PolicyConfig,
    RuntimeConfig,
    SamplerConfig,
    eval_config_from_dict,
)
from policy_accel.eval.evaluate import evaluate, paired_difference, rollout
from policy_accel.eval.guard import EpisodeGuard


def _config(policy, tmp_path, **eval_kwargs):
    settings = {"n_episodes": 2, "batch_size": 2, "output_dir": str(tmp_path), **eval_kwargs}
    return EvalConfig(
        policy=PolicyConfig(path=policy.source),
        env=EnvConfig(max_episode_steps=12, kwargs={"legacy_seeds": True}),
        sampler=SamplerConfig(method="picard"),
        runtime=RuntimeConfig(vector="sync"),
        eval=EvalSettings(**settings),
    )


def test_two_episodes_write_eval_info_and_a_video(tiny_pusht_policy, tmp_path):
    info, directory = evaluate(_config(tiny_pusht_policy, tmp_path, n_videos=1))
    saved = json.loads((directory / "eval_info.json").read_text())
    assert directory.parent.parent == tmp_path  # outputs/eval/<date>/<time>_<name>
    assert {"aggregated", "latency", "per_episode", "runs"} <= set(saved)
    assert {"pc_success", "avg_sum_reward", "avg_max_reward", "mean_score"} <= set(
        saved["aggregated"]
    )
    assert {"latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "rounds_mean"} <= set(
        saved["latency"]
    )
    episodes = saved["per_episode"]
    assert [e["seed"] for e in episodes] == [100000, 100001]
    for episode in episodes:
        assert {"sum_reward", "max_reward", "success", "coverage", "steps"} <= set(episode)
        assert episode["steps"] == 12
    videos = list((directory / "videos").rglob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 1000


def test_async_vector_env_gives_the_same_episodes_as_sync(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path)
    sync = rollout(config, config.sampler, policy=tiny_pusht_policy)
    config.runtime.vector = "async"
    spawned = rollout(config, config.sampler, policy=tiny_pusht_policy)
    for a, b in zip(sync["per_episode"], spawned["per_episode"], strict=True):
        assert a["seed"] == b["seed"]
        assert a["sum_reward"] == pytest.approx(b["sum_reward"], abs=1e-6)


def test_an_episode_sees_the_same_noise_alone_or_in_a_batch(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    config.env.first_seed = 100001
    alone = rollout(config, config.sampler, policy=tiny_pusht_policy)
    config = _config(tiny_pusht_policy, tmp_path)  # seeds 100000 and 100001 together
    together = rollout(config, config.sampler, policy=tiny_pusht_policy)
    a, b = alone["per_episode"][0], together["per_episode"][1]
    assert a["seed"] == b["seed"] == 100001
    assert a["sum_reward"] == pytest.approx(b["sum_reward"], abs=1e-6)
    config.eval.noise_seed = 7
    other = rollout(config, config.sampler, policy=tiny_pusht_policy)
    assert other["per_episode"][1]["sum_reward"] != pytest.approx(b["sum_reward"], abs=1e-9)


class FailsOnSeed(EpisodeGuard):
    """A PushT env whose episode with seed 100001 raises at its 5th step."""

    def __init__(self):
        super().__init__(lambda: envs.make("pusht", max_episode_steps=12, legacy_seeds=True))

    def reset(self, *, seed=None, options=None):
        self.seed, self.count = seed, 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self.count += 1
        if self.seed == 100001 and self.count == 5:
            self.env.step = lambda _: (_ for _ in ()).throw(RuntimeError("simulator exploded"))
        return super().step(action)


def test_eval_info_records_the_policy_path_as_given(tiny_pusht_policy, tmp_path, monkeypatch):
    checkpoint = Path(tiny_pusht_policy.source)
    monkeypatch.chdir(checkpoint.parent.parent)
    given = f"{checkpoint.parent.name}/{checkpoint.name}"  # relative to the working directory
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    config.policy.path = given
    config.env.max_episode_steps = 1
    info, directory = evaluate(config)
    assert json.loads((directory / "eval_info.json").read_text())["policy"] == given
    assert info["policy"] == given


def test_an_env_that_raises_keeps_the_other_episodes(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=3)
    info, directory = evaluate(config, env_factory=FailsOnSeed)
    episodes = {e["seed"]: e for e in info["per_episode"]}
    assert set(episodes) == {100000, 100001, 100002}
    assert "simulator exploded" in episodes[100001]["error"]
    assert "error" not in episodes[100000] and episodes[100000]["steps"] == 12
    assert episodes[100002]["steps"] == 12  # the row was reused after the failure
    assert info["aggregated"]["n_errors"] == 1 and info["aggregated"]["n_episodes"] == 2


class LengthBySeed(EpisodeGuard):
    """PushT episodes of 8 steps (seeds 100000 and 100002) and 24 steps (100001)."""

    LENGTHS = {100000: 8, 100001: 24, 100002: 8}

    def __init__(self):
        super().__init__(lambda: envs.make("pusht", legacy_seeds=True))

    def reset(self, *, seed=None, options=None):
        self.length, self.count = self.LENGTHS.get(seed, 24), 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        finished = self._done
        obs, reward, terminated, truncated, info = super().step(action)
        self.count += 1
        if not finished and self.count == self.length:
            self._done, info = True, {**info, "done": True, "truncated": True}
        return obs, reward, terminated, truncated, info


def test_the_latency_block_counts_every_live_row_of_the_batch(tiny_pusht_policy, tmp_path):
    # row 0 runs 100000 (1 replan, cold) then 100002 (1 replan, cold, while row 1 is warm) and
    # idles at the third replan; row 1 runs 100001 (3 replans: cold, warm, warm)
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=3)
    run = rollout(config, config.sampler, policy=tiny_pusht_policy, env_factory=LengthBySeed)
    episodes = {e["seed"]: e for e in run["per_episode"]}
    assert {seed: e["replans"] for seed, e in episodes.items()} == {100000: 1, 100001: 3, 100002: 1}
    latency = run["latency"]
    assert latency["n_batched_plans"] == 3
    assert latency["n_plans"] == 5  # the idle row's third replan is not counted
    # row 0's records alone (its idle replan included) said 1/3
    assert latency["warm_fraction"] == pytest.approx(2 / 5)


def test_compare_mode_reports_paired_success_differences(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path)
    config.compare_samplers = [SamplerConfig(method="sequential", warm_start=False, name="seq")]
    info, _ = evaluate(config)
    rows = info["compare"]
    assert [r["sampler"] for r in rows] == ["picard_warm", "seq"]
    assert rows[1]["success_diff_vs_first"]["n"] == 2
    assert rows[1]["rounds_mean"] == 10  # the tiny policy's 10-step DDPM


class RecordsActions(EpisodeGuard):
    actions: list = []

    def __init__(self):
        super().__init__(lambda: envs.make("pusht", max_episode_steps=12, legacy_seeds=True))

    def step(self, action):
        RecordsActions.actions.append(np.array(action))
        return super().step(action)


def _executed(config, policy, delay):
    config.runtime.inference_delay_steps = delay
    RecordsActions.actions = []
    rollout(config, config.sampler, policy=policy, env_factory=RecordsActions)
    return np.array(RecordsActions.actions)


def test_rollout_acts_exactly_as_a_controller_with_the_same_noise(tiny_pusht_policy, tmp_path):
    # the batched engine must keep the same consecutive-step history as the Controller
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    config.sampler = SamplerConfig(method="sequential", warm_start=False)
    executed = _executed(config, tiny_pusht_policy, 0)
    controller = Controller(
        tiny_pusht_policy, method="sequential", warm_start=False, seed=100000
    )  # noise_seed 0: the row's stream is seeded by its seed
    env = envs.make("pusht", max_episode_steps=12, legacy_seeds=True)
    obs, _ = env.reset(seed=100000)
    expected = []
    for _ in range(12):
        expected.append(controller.act(obs))
        obs, *_ = env.step(expected[-1])
    np.testing.assert_allclose(executed, np.array(expected), atol=1e-5)


def test_inference_delay_holds_the_previous_chunk(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    plain = _executed(config, tiny_pusht_policy, 0)
    delayed = _executed(config, tiny_pusht_policy, 3)
    assert len(plain) == len(delayed) == 12
    np.testing.assert_array_equal(plain[:8], delayed[:8])  # the first plan has nothing to hold
    assert not np.allclose(plain[8:11], delayed[8:11])  # held: the first plan's actions 8..10
    assert len(_executed(config, tiny_pusht_policy, "auto")) == 12


def test_paired_difference_confidence_interval():
    a = [{"seed": i, "success": i % 2 == 0} for i in range(10)]
    b = [{"seed": i, "success": False} for i in range(10)]
    result = paired_difference(a, b)
    assert result["n"] == 10 and result["diff"] == pytest.approx(0.5)
    assert result["ci95_low"] < 0.5 < result["ci95_high"]


def test_config_errors_name_the_bad_key():
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['n_episode'\\] in eval"):
        eval_config_from_dict({"eval": {"n_episode": 3}})
    with pytest.raises(ValueError, match="inference_delay_steps"):
        eval_config_from_dict({"runtime": {"inference_delay_steps": -1}})
    with pytest.raises(ValueError, match="has no config"):
        eval_config_from_dict({"eval": {"compare": ["warp"]}}, samplers={})
    config = eval_config_from_dict(
        {"sampler": {"method": "newton", "options": {"tolerance": 1e-4}}}
    )
    assert config.sampler.options == {"tolerance": 1e-4} and np.isclose(config.env.first_seed, 1e5)


def test_evals_started_in_the_same_second_get_their_own_directories(tiny_pusht_policy, tmp_path):
    from policy_accel.eval.evaluate import output_directory

    config = _config(tiny_pusht_policy, tmp_path)
    directories = {output_directory(config, "same") for _ in range(5)}
    assert len(directories) == 5 and all(d.is_dir() for d in directories)


def test_eval_info_is_strict_json_when_a_statistic_is_undefined(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    config.compare_samplers = [SamplerConfig(method="sequential", warm_start=False, name="seq")]
    _, directory = evaluate(config)
    text = (directory / "eval_info.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads(text, parse_constant=refuse)  # NaN / Infinity would raise here
    diff = saved["compare"][1]["success_diff_vs_first"]
    assert diff["n"] == 1 and diff["ci95_low"] is None and diff["ci95_high"] is None


def test_action_smoothness_measures_boundary_jumps_and_jerk():
    from policy_accel.eval.smoothness import action_smoothness

    actions = np.array([[0.0, 0], [1, 0], [2, 0], [5, 4], [6, 4], [7, 4]])
    smooth = action_smoothness(actions, [3])
    assert smooth["boundary_jump_mean"] == smooth["boundary_jump_max"] == 5.0  # |(3, 4)|
    # third differences: (2, 4) - ... : a3 - 3a2 + 3a1 - a0 = (5-6+3-0, 4) = (2, 4), then (-4, -8)
    # and (2, 4): squared norms 20, 80, 20
    assert smooth["jerk"] == pytest.approx(40.0)
    assert action_smoothness(actions[:3], [0])["boundary_jump_mean"] is None
    assert action_smoothness(actions[:3], [])["jerk"] is None


def test_eval_reports_boundary_jumps_where_each_new_chunk_takes_over(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)  # 12 steps
    for delay in (0, 3):
        executed = _executed(config, tiny_pusht_policy, delay)
        run = rollout(config, config.sampler, policy=tiny_pusht_policy)
        episode = run["per_episode"][0]
        boundaries = [8 + delay]  # 8-action chunks: the second one takes over after the delay
        jumps = [np.linalg.norm(executed[b] - executed[b - 1]) for b in boundaries]
        assert episode["boundary_jump_mean"] == pytest.approx(np.mean(jumps), rel=1e-5)
        assert episode["boundary_jump_max"] == pytest.approx(np.max(jumps), rel=1e-5)
        assert episode["jerk"] > 0
        assert run["aggregated"]["boundary_jump_mean"] == pytest.approx(np.mean(jumps), rel=1e-5)


def test_inpainted_transitions_continue_the_held_actions(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    naive = _executed(config, tiny_pusht_policy, 3)
    config.runtime.transition = "inpaint"
    inpainted = _executed(config, tiny_pusht_policy, 3)
    np.testing.assert_array_equal(naive[:11], inpainted[:11])  # the same held actions 8..10
    assert not np.allclose(naive[11:], inpainted[11:])  # the replan continued them
    run = rollout(config, config.sampler, policy=tiny_pusht_policy)
    assert run["per_episode"][0]["committed_actions"] == 3
    config.runtime.transition = "naive"
    assert (
        rollout(config, config.sampler, policy=tiny_pusht_policy)["per_episode"][0][
            "committed_actions"
        ]
        == 0
    )
    with pytest.raises(ValueError, match="runtime.transition must be one of"):
        eval_config_from_dict({"runtime": {"transition": "smooth"}})


def test_a_delay_longer_than_the_held_chunk_counts_starved_steps(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    policy = tiny_pusht_policy
    held = policy.event_shape[0] - policy.action_start - policy.n_action_steps  # 16 - 1 - 8
    config.runtime.inference_delay_steps = 12
    run = rollout(config, config.sampler, policy=tiny_pusht_policy)
    assert run["per_episode"][0]["starved_steps"] == 12 - held  # one replan after the first
    config.runtime.inference_delay_steps = 3
    assert (
        rollout(config, config.sampler, policy=tiny_pusht_policy)["per_episode"][0]["starved_steps"]
        == 0
    )


def test_average_merge_blends_the_old_and_new_chunk_where_both_planned(tiny_pusht_policy, tmp_path):
    """Temporal ensembling in eval: after the held actions the executed action is ``(1 - w)
    old + w new``, so its offset from the naive switch scales with ``1 - w``."""
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)  # 12 steps
    naive = _executed(config, tiny_pusht_policy, 3)
    config.runtime.merge = "average"
    offsets = {}
    for weight in (1.0, 0.5, 0.25):
        config.runtime.merge_weight = weight
        merged = _executed(config, tiny_pusht_policy, 3)
        np.testing.assert_array_equal(merged[:11], naive[:11])  # held actions 8..10 as before
        offsets[weight] = merged[11] - naive[11]
    np.testing.assert_array_equal(offsets[1.0], 0.0)  # only the new chunk: the naive switch
    assert np.abs(offsets[0.5]).max() > 1e-3
    np.testing.assert_allclose(offsets[0.25], 1.5 * offsets[0.5], rtol=1e-4, atol=1e-5)


def test_n_action_steps_override_and_soft_transition(tiny_pusht_policy, tmp_path):
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)
    config.runtime.n_action_steps = 4
    run = rollout(config, config.sampler, policy=tiny_pusht_policy)
    assert run["per_episode"][0]["replans"] == 3  # 12 steps, 4 per replan
    config.runtime.n_action_steps = None
    config.runtime.transition = "inpaint"
    hard = _executed(config, tiny_pusht_policy, 3)
    config.runtime.transition = "soft_inpaint"
    soft = _executed(config, tiny_pusht_policy, 3)
    np.testing.assert_array_equal(hard[:11], soft[:11])  # the same held actions
    assert not np.allclose(hard[11], soft[11])  # the rest of the overlap guided the replan


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("merge", "median", "runtime.merge must be one of"),
        ("merge_weight", 0.0, r"runtime.merge_weight must be in \(0, 1\]"),
        ("n_action_steps", 0, "runtime.n_action_steps must be a positive int"),
        ("transition", "rtc", "runtime.transition must be one of"),
    ],
)
def test_runtime_keys_are_validated(key, value, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(runtime=RuntimeConfig(**{key: value}))


def test_a_delay_of_a_whole_chunk_holds_the_previous_plan_and_records_its_takeover(
    tiny_pusht_policy, tmp_path
):
    """With a delay of n_action_steps or more each cycle runs only the previous plan's later
    actions; the boundary is where they take over, and a longer delay does not break the engine."""
    config = _config(tiny_pusht_policy, tmp_path, n_episodes=1, batch_size=1)  # 12 steps
    config.runtime.n_action_steps = 4
    for delay in (4, 6):
        config.runtime.inference_delay_steps = delay
        run = rollout(config, config.sampler, policy=tiny_pusht_policy)
        episode = run["per_episode"][0]
        assert episode["steps"] == 12 and episode["boundary_jump_mean"] is not None, delay
