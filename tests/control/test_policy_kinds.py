"""Every kind of policy through every layer that plans: the Controller, the BatchController, the
AsyncController, the server and eval, warm and cold, each chunk exact to its sequential sample.

The kinds (tests/policy_kinds.py): DiffusionPolicy's UNet with global, local and inpainting
conditioning and with pred_action_steps_only, its transformer, its hybrid image policy, and
LeRobot's DiffusionPolicy. A pred_action_steps_only sample is only n_action_steps long, so it
executes half of it per plan here (otherwise nothing is left to warm-start from)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_accel.control import (
    AsyncController,
    BatchController,
    Controller,
    PolicyClient,
    PolicyServer,
    SamplerConfig,
)
from policy_accel.control.batch import row_seed
from policy_accel.control.wire import pack, unpack  # noqa: F401  (the client packs)
from policy_accel.eval.config import EnvConfig, EvalConfig, EvalSettings, RuntimeConfig
from policy_accel.eval.evaluate import rollout
from policy_accel.eval.guard import EpisodeGuard
from tests.policy_kinds import ObservationWalk, steps_of

EXACT = SamplerConfig(method="picard", options={"tolerance": 1e-6}, num_inference_steps=8)


def executed(policy) -> int:
    if getattr(policy, "pred_action_steps_only", False):
        return policy.n_action_steps // 2
    return policy.n_action_steps


def normalized(policy, actions) -> np.ndarray:
    return policy.normalize_action(torch.as_tensor(np.asarray(actions))).cpu().numpy()


def assert_exact(policy, plan, reference) -> None:
    """The plan's chunk equals the sequential sample of its own problem (normalized units)."""
    error = np.abs(normalized(policy, plan.actions) - normalized(policy, reference)).max()
    assert error <= 1e-3, error


@pytest.mark.parametrize("warm", [True, False])
def test_the_controller_drives_every_kind(kind_policy, warm):
    kind, policy = kind_policy
    n = executed(policy)
    controller = Controller(policy, EXACT, n_action_steps=n, warm_start=warm, seed=1)
    plans = []
    for obs in steps_of(policy, seed=2, count=3 * n + 1):
        step = controller.step(obs)
        assert step.action.shape == (policy.action_dim,) and np.all(np.isfinite(step.action))
        if step.plan is not None:
            plans.append(step.plan)
            assert step.plan.chunk.shape == (n, policy.action_dim)
            assert_exact(policy, step.plan, controller.planner.reference(step.plan))
    assert [p.record.warm for p in plans] == [False] + [warm] * 3, kind
    assert [p.record.shift for p in plans] == [0] + [n if warm else 0] * 3


def test_a_batch_controller_row_is_a_controller(kind_policy):
    kind, policy = kind_policy
    n, seeds = executed(policy), [3, 4]
    batch = BatchController(policy, seeds, EXACT, n_action_steps=n)
    singles = [Controller(policy, EXACT, n_action_steps=n, seed=row_seed(0, s)) for s in seeds]
    streams = [steps_of(policy, seed=10 + r, count=2 * n + 1) for r in range(len(seeds))]
    stacked = [
        {k: np.stack([s[t][k] for s in streams]) for k in streams[0][t]} for t in range(2 * n + 1)
    ]
    batch.start_rows(stacked[0], np.ones(2, dtype=bool))
    for t in range(2 * n + 1):
        if t:
            batch.observe(stacked[t])
        steps = [c.step(stream[t]) for c, stream in zip(singles, streams, strict=True)]
        if t % n:
            assert all(step.plan is None for step in steps)
            continue
        plan = batch.plan(np.array([t == 0] * 2), n if t else 0)
        for r, step in enumerate(steps):
            torch.testing.assert_close(plan.problem.x_T[r], step.plan.problem.x_T[0])
            torch.testing.assert_close(plan.problem.noise[:, r], step.plan.problem.noise[:, 0])
            error = np.abs(
                normalized(policy, plan.actions[r]) - normalized(policy, step.plan.chunk)
            )
            assert error.max() <= 1e-3, kind
            assert plan.records[r].warm == step.plan.record.warm == (t > 0)


def test_the_async_controller_drives_every_kind(kind_policy):
    kind, policy = kind_policy
    n = executed(policy)
    runtime = AsyncController(Controller(policy, EXACT, n_action_steps=n, seed=5))
    stats = runtime.run(ObservationWalk(policy, length=3 * n), hz=10.0, seed=6, realtime=False)
    assert stats.steps == 3 * n and stats.plans >= 3 and stats.starved == 0
    assert not stats.records[0].warm and all(r.warm for r in stats.records[1:]), kind
    assert all(0 < r.shift < n + 1 for r in stats.records[1:])


def test_the_server_drives_every_kind(kind_policy):
    kind, policy = kind_policy
    n = executed(policy)
    with PolicyServer(policy, EXACT, port=0, n_action_steps=n, seed=7) as server:
        local = Controller(policy, EXACT, n_action_steps=n, seed=7)
        with PolicyClient("127.0.0.1", server.port, max_message_bytes=2**24) as client:
            assert server.metadata["observation_spec"] == {
                k: list(v) for k, v in policy.observation_spec.items()
            }
            for index, obs in enumerate(steps_of(policy, seed=8, count=3)):
                request = {key: np.asarray(value, np.float32) for key, value in obs.items()}
                reply = client.infer(request)
                np.testing.assert_array_equal(reply["actions"], local.plan(obs).chunk)
                assert reply["policy_timing"]["warm"] == (index > 0)


def test_eval_drives_every_kind(kind_policy, tmp_path):
    kind, policy = kind_policy
    length = 2 * policy.n_action_steps + 1
    config = EvalConfig(
        env=EnvConfig(max_episode_steps=None),
        runtime=RuntimeConfig(vector="sync"),
        eval=EvalSettings(n_episodes=2, batch_size=2, output_dir=str(tmp_path)),
    )
    run = rollout(
        config,
        EXACT,
        policy=policy,
        env_factory=lambda: EpisodeGuard(lambda: ObservationWalk(policy, length=length)),
    )
    episodes = run["per_episode"]
    assert [e["steps"] for e in episodes] == [length, length], kind
    assert all(e["replans"] == 3 and "error" not in e for e in episodes)
    warm = run["latency"]["warm_fraction"]
    assert warm == (
        0.0 if getattr(policy, "pred_action_steps_only", False) else pytest.approx(2 / 3)
    )


@pytest.mark.parametrize("method", ["picard", "chord"])
def test_committed_actions_are_inpainted_for_every_kind(kind_policy, method):
    """Real-time chunking without retraining: the actions executed while a replan is in flight
    are inpainted into the new chunk, whose first entries then equal them, and the parallel
    solver still equals sequential sampling of the same inpainted problem."""
    kind, policy = kind_policy
    sampler = SamplerConfig(method=method, options={"tolerance": 1e-6}, num_inference_steps=8)
    controller = Controller(policy, sampler, n_action_steps=executed(policy), seed=3)
    observations = steps_of(policy, seed=4, count=2)
    controller.observe(observations[0])
    first = controller.replan()
    controller.observe(observations[1])
    delay = 2
    committed = first.future[0, 1 : 1 + delay]  # the old chunk's actions for the next steps
    plan = controller.replan(executed=1, committed=committed)
    assert plan.record.committed == delay
    np.testing.assert_allclose(plan.future[0, :delay], committed, atol=1e-4)
    assert_exact(policy, plan, controller.planner.reference(plan))
    rest = first.future[0, 1 + delay : 1 + delay + 3]  # followed softly (RTC's prefix)
    soft = controller.replan(executed=0, committed=committed, overlap=rest)
    assert soft.problem.guide is not None and soft.record.committed == delay
    np.testing.assert_allclose(soft.future[0, :delay], committed, atol=1e-4)
    assert_exact(policy, soft, controller.planner.reference(soft))
    free = np.full_like(committed, np.nan)
    free[0] = committed[0]  # only one committed action: the rest is sampled
    partial = controller.replan(executed=0, committed=free)
    assert partial.record.committed == 1
    np.testing.assert_allclose(partial.future[0, 0], committed[0], atol=1e-4)


def test_committed_actions_of_the_wrong_shape_are_refused(kind_policy):
    kind, policy = kind_policy
    controller = Controller(policy, EXACT, n_action_steps=executed(policy), seed=3)
    controller.observe(steps_of(policy, seed=4, count=1)[0])
    with pytest.raises(ValueError, match=r"committed actions must have shape \[1, d, "):
        controller.replan(committed=np.zeros((2, policy.action_dim + 1)))
    with pytest.raises(ValueError, match="do not fit the"):
        controller.replan(committed=np.zeros((100, policy.action_dim)))


def test_the_default_sampler_drives_every_kind(kind_policy):
    """The Controller's default (warm chord) takes every kind, inpainting policies' wide events
    (observation channels in the sample) included."""
    kind, policy = kind_policy
    n = executed(policy)
    controller = Controller(policy, SamplerConfig(num_inference_steps=8), n_action_steps=n, seed=1)
    plans = []
    for obs in steps_of(policy, seed=2, count=2 * n + 1):
        step = controller.step(obs)
        plans += [step.plan] if step.plan is not None else []
    assert [p.record.method for p in plans] == ["chord"] * 3
    assert [p.record.warm for p in plans] == [False, True, True]
    for plan in plans:
        reference = controller.planner.reference(plan)
        error = np.abs(normalized(policy, plan.actions) - normalized(policy, reference)).max()
        assert error <= 1e-2, error


def _transition_layers(policy, tmp_path, transition: str, delay: int) -> dict:
    """One episode through eval, one simulated AsyncController run and one server request pair
    with ``transition``, the default sampler (warm chord); what each layer produced."""
    from policy_accel.control.wire import COMMITTED_KEY, EXECUTED_KEY, OVERLAP_KEY

    n = executed(policy)
    sampler = SamplerConfig(num_inference_steps=8)
    length = 2 * policy.n_action_steps + 1
    config = EvalConfig(
        env=EnvConfig(max_episode_steps=None),
        runtime=RuntimeConfig(vector="sync", inference_delay_steps=delay, transition=transition),
        eval=EvalSettings(n_episodes=1, batch_size=1, output_dir=str(tmp_path)),
    )
    run = rollout(
        config,
        sampler,
        policy=policy,
        env_factory=lambda: EpisodeGuard(lambda: ObservationWalk(policy, length=length)),
    )
    runtime = AsyncController(Controller(policy, sampler, n_action_steps=n, seed=5), "latest",
                              transition=transition)  # fmt: skip
    stats = runtime.simulate(ObservationWalk(policy, length=3 * n), hz=10.0, seed=6, delay_steps=1)
    soft = transition == "soft_inpaint"
    with PolicyServer(policy, sampler, port=0, n_action_steps=n, seed=7) as server:
        local = Controller(policy, sampler, n_action_steps=n, seed=7)
        with PolicyClient("127.0.0.1", server.port, max_message_bytes=2**24) as client:
            first, second = steps_of(policy, seed=8, count=2)
            request = lambda obs: {k: np.asarray(v, np.float32) for k, v in obs.items()}  # noqa: E731
            client.infer(request(first))
            timing = {EXECUTED_KEY: 1, COMMITTED_KEY: 1, **({OVERLAP_KEY: True} if soft else {})}
            reply = client.infer({**request(second), **timing})
            local.plan(first)
            last = local.last_plan.future[0]
            expected = local.plan(
                second, executed=1, committed=last[1:2], overlap=last[2:] if soft else None
            )
    return {"episode": run["per_episode"][0], "stats": stats, "reply": reply, "expected": expected}


def test_real_time_transitions_for_every_kind(kind_policy, tmp_path):
    """Inpainted transitions through eval (held actions), the simulated AsyncController and the
    server (a request's executed and committed counts), with the default sampler (warm chord)."""
    kind, policy = kind_policy
    n = executed(policy)
    room = policy.event_shape[policy.horizon_axis] - policy.action_start
    out = _transition_layers(policy, tmp_path, "inpaint", delay=2)
    episode = out["episode"]
    held = min(2, room - policy.n_action_steps)  # what the previous chunk holds past its part
    assert episode["committed_actions"] == 2 * held and "error" not in episode, kind
    assert episode["jerk"] is not None
    stats = out["stats"]
    assert stats.steps == 3 * n and all(r.committed == 1 for r in stats.records[1:]), kind
    np.testing.assert_array_equal(out["reply"]["actions"], out["expected"].chunk)
    assert out["reply"]["policy_timing"]["committed"] == 1


def test_soft_transitions_for_every_kind(kind_policy, tmp_path):
    """Soft inpainting over the rest of the overlap (``soft_inpaint``) through eval, the
    simulated AsyncController and the server (``__overlap__``), with the default sampler."""
    kind, policy = kind_policy
    n = executed(policy)
    out = _transition_layers(policy, tmp_path, "soft_inpaint", delay=1)
    assert "error" not in out["episode"], kind
    stats = out["stats"]
    assert stats.steps == 3 * n and all(r.committed == 1 for r in stats.records[1:]), kind
    assert out["expected"].problem.guide is not None
    np.testing.assert_array_equal(out["reply"]["actions"], out["expected"].chunk)


def test_far_out_of_range_observations_are_refused_for_every_kind(kind_policy):
    """A value a thousand training ranges out (a unit mistake) is refused by the Controller, the
    BatchController and the server's check, naming the key and the bound; within the bound
    around the training range it is served, and ``out_of_range="accept"`` serves it anyway."""
    from policy_accel.control.server import RequestError, check_request
    from policy_accel.policies import ObservationError, observations
    from tests.policy_kinds import _affine

    kind, policy = kind_policy
    step = steps_of(policy, seed=3, count=1)[0]
    key = next(k for k in policy.observation_spec if k not in policy.image_keys)
    scale, offset = _affine(policy, key, policy.observation_spec[key])

    def at(normalized: float) -> dict:
        value = step[key].copy()
        value.flat[0] = (normalized - offset.flat[0]) / scale.flat[0]
        return {**step, key: value}

    known = policy.observation_range(key)
    if known is None:  # no training range recorded (the image kind's random normalizer)
        bound = observations.MAX_NORMALIZED_MAGNITUDE
        far, near = at(1000 * bound), at(bound / 2)
        message = rf"obs\[{key!r}\] reaches .* normalized units"
    else:
        low, high = (float(bound.reshape(-1)[0]) for bound in known)
        width = high - low
        far, near = at(high + 1000 * width), at(high + 2 * width)  # 2 ranges out: served
        message = rf"obs\[{key!r}\]\[0\] = .* of the range this policy was trained on"
    controller = Controller(policy, EXACT, seed=1)
    with pytest.raises(ObservationError, match=message):
        controller.step(far)
    assert controller.step(near).plan is not None
    batch = BatchController(policy, [0], EXACT)
    with pytest.raises(ObservationError, match=message):
        batch.start_rows({k: v[None] for k, v in far.items()}, np.array([True]))
    with pytest.raises(RequestError, match=message):
        check_request(far, policy)
    accepting = Controller(policy, EXACT, seed=1, out_of_range="accept")
    assert np.all(np.isfinite(accepting.step(far).action))
