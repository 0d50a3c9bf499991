"""Plans in many threads of one process are exact: forward-mode AD state is process-global in
torch, so JVPs are serialised (policy_accel.execution.autodiff) and the step rules' derived data
is computed once, under a lock."""

from __future__ import annotations

import threading

import numpy as np
import torch
from diffusers import DDPMScheduler

from policy_accel.control import Controller
from policy_accel.sampling.rules import _CACHE, rule_from_scheduler


def _observations(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(150.0, 350.0, 20).astype(np.float32) for _ in range(n)]


def _run_threads(count: int, target) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            target(index)
        except BaseException as error:  # re-raised by the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def test_the_linear_coefficient_is_exact_from_many_threads():
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    reference = rule_from_scheduler(scheduler, 50).linear_coefficient().clone()
    wrong = []

    def work(_: int) -> None:
        for _ in range(50):
            rule = rule_from_scheduler(scheduler, 50)
            rule.__dict__.pop("_derived", None)  # force the JVP every time
            if not torch.equal(rule.linear_coefficient(), reference):
                wrong.append(1)

    errors = _run_threads(4, work)
    assert not errors, errors[:3]  # before the lock: most calls raised "forward AD" errors
    assert not wrong


def test_concurrent_first_plans_and_newton_plans_equal_a_single_thread(tiny_pusht_policy):
    _CACHE.clear()  # every thread's first plan builds the rule, as on a fresh server
    settings = [
        {"method": "picard", "tolerance": 1e-4, "seed": 1},
        {"method": "newton", "tolerance": 1e-4, "seed": 2},
        {"method": "taa", "tolerance": 1e-4, "seed": 3},
    ]
    streams = {i: _observations(i, 3) for i in range(6)}
    chunks: dict[int, list[np.ndarray]] = {}

    def work(index: int) -> None:
        controller = Controller(tiny_pusht_policy, **settings[index % len(settings)])
        chunks[index] = [controller.plan(obs).chunk for obs in streams[index]]

    errors = _run_threads(len(streams), work)
    assert not errors, errors[:3]
    for index, stream in streams.items():
        alone = Controller(tiny_pusht_policy, **settings[index % len(settings)])
        for chunk, obs in zip(chunks[index], stream, strict=True):
            np.testing.assert_array_equal(chunk, alone.plan(obs).chunk)
