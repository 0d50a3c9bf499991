"""Every registered solver converges to the sequential sample with the same noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from policy_accel import DenoisingProblem, sample
from policy_accel.sampling import SOLVERS
from tests.sampling.helpers import chunk_problem, make_scheduler, mixture, rms

PARALLEL = [name for name in SOLVERS if name != "sequential"]
# (scheduler kind, steps, extra scheduler config): a stochastic sampler with clipping, an ODE
# sampler, DDIM with noise and a multistep ODE solver.
CASES = [
    ("ddpm", 100, {}),
    ("ddim", 50, {"clip_sample": False}),
    ("dpm", 20, {}),
]
# What each solver's docstring promises at its default tolerance (RMS error vs sequential, data
# in [-1, 1]); measured values are several times smaller.
DEFAULT_TOLERANCE_ERROR = {
    "paradigms": 5e-3,
    "picard": 2e-3,
    "taa": 2e-3,
    "srds": 5e-3,
    "newton": 1e-5,
    "chord": 2e-3,
}


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def case(request):
    kind, steps, config = request.param
    problem = chunk_problem(kind, steps, **config)
    return problem, sample(problem, "sequential")


@pytest.mark.parametrize("method", PARALLEL)
def test_zero_tolerance_reproduces_sequential(case, method):
    problem, reference = case
    result = sample(problem, method, tolerance=0.0)
    assert result.converged
    assert rms(result.sample, reference.sample) <= 1e-5
    assert rms(result.trajectory, reference.trajectory) <= 1e-5


@pytest.mark.parametrize("method", PARALLEL)
def test_default_tolerance_error_within_promise_in_fewer_rounds(case, method):
    problem, reference = case
    # srds' latency advantage is its pipelined schedule (the sample is the same either way)
    result = sample(problem, method, **({"pipelined": True} if method == "srds" else {}))
    assert result.converged
    assert rms(result.sample, reference.sample) <= DEFAULT_TOLERANCE_ERROR[method]
    assert result.rounds < problem.num_steps
    assert result.model_evals >= problem.num_steps * problem.batch_size


def test_sequential_counts_one_round_per_step(case):
    problem, reference = case
    assert reference.rounds == problem.num_steps
    assert reference.model_evals == problem.num_steps * problem.batch_size
    assert torch.equal(reference.trajectory[0], problem.x_T)


def test_ddim_with_noise_reproduces_sequential():
    scheduler = make_scheduler("ddim", clip_sample=False)
    generator = torch.Generator().manual_seed(3)
    problem = DenoisingProblem.from_scheduler(
        scheduler, mixture(scheduler), 40, (2, 16, 2), generator=generator, eta=1.0
    )
    assert problem.noise.abs().sum() > 0
    reference = sample(problem, "sequential")
    for method in PARALLEL:
        assert rms(sample(problem, method, tolerance=0.0).sample, reference.sample) <= 1e-5, method


@pytest.mark.parametrize("method", ["paradigms", "picard", "taa", "newton", "chord"])
def test_small_window_slides_to_the_same_answer(method):
    problem = chunk_problem("ddpm", 60)
    reference = sample(problem, "sequential")
    result = sample(problem, method, window=8, tolerance=0.0)
    assert result.converged and rms(result.sample, reference.sample) <= 1e-5
    assert result.model_evals <= 8 * problem.batch_size * result.rounds * (
        32 if method == "newton" else 1
    )


def test_inpainting_mask_is_respected_by_every_solver():
    scheduler = make_scheduler("ddpm")
    mask = torch.zeros(16, 2, dtype=torch.bool)
    mask[:2] = True  # the first two actions are known (DiffusionPolicy's inpainting policies)
    cond = torch.full((16, 2), 0.25)
    generator = torch.Generator().manual_seed(1)
    problem = DenoisingProblem.from_scheduler(
        scheduler,
        mixture(scheduler),
        100,
        (2, 16, 2),
        generator=generator,
        mask=mask,
        cond_data=cond,
    )
    reference = sample(problem, "sequential")
    assert torch.equal(reference.sample[:, :2], cond[:2].expand(2, 2, 2))
    for method in PARALLEL:
        result = sample(problem, method, tolerance=0.0)
        assert torch.equal(result.sample[:, :2], reference.sample[:, :2]), method
        assert rms(result.sample, reference.sample) <= 1e-5, method


def test_srds_pipelined_reports_a_shorter_critical_path():
    problem = chunk_problem("ddim", 49, clip_sample=False)
    plain = sample(problem, "srds")
    pipelined = sample(problem, "srds", pipelined=True)
    assert torch.equal(plain.sample, pipelined.sample)
    assert pipelined.rounds < plain.rounds == plain.stats["rounds_executed"]


@pytest.mark.parametrize("method", ["newton", "chord"])
def test_matrix_solvers_are_refused_for_large_events(method):
    scheduler = make_scheduler("ddim")
    means = torch.zeros(2, 4, 16, 16)
    from policy_accel.sampling.analytic import GaussianMixtureDenoiser

    denoiser = GaussianMixtureDenoiser(means, 0.5, scheduler.alphas_cumprod)
    problem = DenoisingProblem.from_scheduler(scheduler, denoiser, 10, (1, 4, 16, 16))
    with pytest.raises(ValueError, match="max_event_size"):
        sample(problem, method)


@pytest.mark.parametrize("method", PARALLEL)
def test_max_rounds_reports_non_convergence_with_an_exact_prefix(method):
    problem = chunk_problem("ddpm", 100)
    reference = sample(problem, "sequential")
    # srds: 9 rounds of coarse sweep, then it checks between iterations of 10 fine rounds
    limit = 20 if method == "srds" else 3
    result = sample(problem, method, tolerance=0.0, max_rounds=limit)
    assert not result.converged
    assert result.rounds <= limit + (8 if method == "srds" else 0)
    prefix = result.converged_steps
    assert 0 < prefix < problem.num_steps
    assert rms(result.trajectory[: prefix + 1], reference.trajectory[: prefix + 1]) <= 1e-5


@pytest.mark.parametrize("method", PARALLEL)
def test_finish_sequentially_makes_a_stopped_solver_exact(method):
    problem = chunk_problem("ddpm", 100)
    reference = sample(problem, "sequential")
    result = sample(problem, method, tolerance=0.0, max_rounds=3, finish_sequentially=True)
    assert not result.converged
    assert result.converged_steps == problem.num_steps
    assert rms(result.sample, reference.sample) <= 1e-5


class SlowDenoiser:
    """Wraps a denoiser so each call takes at least ``seconds``: rounds cost real time."""

    def __init__(self, denoiser, seconds):
        self.denoiser, self.seconds = denoiser, seconds

    def __call__(self, x, t):
        import time

        time.sleep(self.seconds)
        return self.denoiser(x, t)


@pytest.mark.parametrize("method", PARALLEL)
def test_deadline_stops_within_one_round_and_flags_it(method):
    import time

    fast = chunk_problem("ddpm", 100)
    problem = DenoisingProblem(**{**fast.__dict__, "denoiser": SlowDenoiser(fast.denoiser, 0.01)})
    untimed = sample(fast, method, deadline=time.perf_counter() + 60)  # also warms memoised rules
    assert untimed.converged and "deadline_hit" not in untimed.stats
    start = time.perf_counter()
    result = sample(problem, method, tolerance=0.0, deadline=start + 0.05)
    elapsed = time.perf_counter() - start
    assert not result.converged and result.stats["deadline_hit"]
    assert result.rounds >= 1
    # srds stops between iterations of block_size (10) rounds; the others between rounds
    allowed = 0.05 + (10 if method == "srds" else 1) * 0.01 + 0.1
    assert elapsed < allowed


def test_float64_problem_stays_float64():
    scheduler = make_scheduler("ddpm")
    problem = DenoisingProblem.from_scheduler(
        scheduler,
        mixture(scheduler),
        20,
        (1, 16, 2),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    for method in SOLVERS:
        assert sample(problem, method).sample.dtype == torch.float64, method


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_every_solver_reports_each_round_to_its_callback(method):
    problem = chunk_problem("ddpm", 20)
    seen = []
    result = sample(problem, method, callback=lambda info: seen.append(dict(info)))
    assert seen, method
    assert [info["round"] for info in seen] == sorted(info["round"] for info in seen)
    assert seen[-1]["round"] == result.rounds or method == "srds"  # srds reports iterations
    assert seen[-1]["converged_steps"] == problem.num_steps or not result.converged
    assert all(info["x"].shape == result.trajectory.shape for info in seen)


def test_forward_noised_inpainting_is_exact_for_every_solver():
    """Committed actions (real-time chunking): known values forward-noised to each step's level
    before it, exact in the final sample; every solver equals sequential sampling of it."""
    scheduler = make_scheduler("ddpm")
    mask = torch.zeros(2, 16, 2, dtype=torch.bool)
    mask[:, 1:4] = True  # three committed actions after the first
    cond = torch.full((2, 16, 2), -0.4)
    generator = torch.Generator().manual_seed(2)
    problem = DenoisingProblem.from_scheduler(
        scheduler, mixture(scheduler), 100, (2, 16, 2), generator=generator,
        mask=mask, cond_data=cond, noised=mask,
    )  # fmt: skip
    reference = sample(problem, "sequential")
    assert torch.equal(reference.sample[:, 1:4], cond[:, 1:4])
    level = problem.prepare(
        problem.x_T.unsqueeze(0).expand(3, -1, -1, -1), torch.tensor([0, 50, 99])
    )
    alphas, sigmas = problem.rule.alphas.float(), problem.rule.sigmas.float()
    for row, position in enumerate((0, 50, 99)):
        expected = alphas[position] * -0.4 + sigmas[position] * problem.x_T[:, 1:4]
        torch.testing.assert_close(level[row][:, 1:4], expected)
    for method in PARALLEL:
        result = sample(problem, method, tolerance=0.0)
        assert torch.equal(result.sample[:, 1:4], reference.sample[:, 1:4]), method
        assert rms(result.sample, reference.sample) <= 1e-5, method
    with pytest.raises(ValueError, match="noised must be a part of mask"):
        DenoisingProblem(problem.denoiser, problem.rule, problem.x_T, problem.noise, mask,
                         cond, noised=~mask)  # fmt: skip


def guided_problem(steps: int = 100) -> DenoisingProblem:
    """Two committed actions and a soft-guided overlap after them (blend weights that end at
    different steps, one fractional)."""
    scheduler = make_scheduler("ddpm")
    mask = torch.zeros(2, 16, 2, dtype=torch.bool)
    mask[:, 1:3] = True
    cond = torch.full((2, 16, 2), -0.4)
    cond[:, 3:6] = 0.3
    guide = torch.zeros(steps, 2, 16, 2)
    for k, until in enumerate((60, 30, 10)):
        guide[:until, :, 3 + k] = 1.0
    guide[:, 1, 6] = 0.25  # row 1 also blends one entry by a constant fraction
    generator = torch.Generator().manual_seed(3)
    return DenoisingProblem.from_scheduler(
        scheduler, mixture(scheduler), steps, (2, 16, 2), generator=generator,
        mask=mask, cond_data=cond, noised=mask, guide=guide,
    )  # fmt: skip


def test_guided_inpainting_is_exact_for_every_solver():
    """Soft inpainting over a chunk overlap (RTC's decaying prefix) is part of the step map:
    the committed entries stay exact, the guided ones are pulled toward their values but stay
    the model's own, and every solver equals sequential sampling of the guided problem."""
    problem = guided_problem()
    reference = sample(problem, "sequential")
    assert torch.equal(reference.sample[:, 1:3], problem.cond_data[:, 1:3])
    unguided = sample(dataclasses.replace(problem, guide=None), "sequential")
    pull = (reference.sample[:, 3] - 0.3).abs().mean(), (unguided.sample[:, 3] - 0.3).abs().mean()
    assert pull[0] < pull[1]  # the longest-guided entry ends nearer its old value
    assert not torch.allclose(reference.sample[:, 3:6], problem.cond_data[:, 3:6])
    for method in PARALLEL:
        result = sample(problem, method, tolerance=0.0)
        assert rms(result.sample, reference.sample) <= 1e-5, method


def test_guided_entries_follow_the_blend_in_the_warm_start_recurrence_and_jacobian():
    """The model-free trajectory of fixed predictions and the step map's linearization both
    see a guided entry's input as ``(1 - g) x + g k``."""
    from policy_accel.execution import LocalExecutor
    from policy_accel.sampling.step_map import StepMap
    from policy_accel.sampling.warm_start import trajectory_from_predictions

    problem = guided_problem(20)
    reference = sample(problem, "sequential")
    rebuilt = trajectory_from_predictions(problem, reference.x0_predictions)
    torch.testing.assert_close(rebuilt, reference.trajectory, atol=1e-5, rtol=1e-5)
    problem = dataclasses.replace(
        problem,
        x_T=problem.x_T.double(),
        noise=problem.noise.double(),
        cond_data=problem.cond_data.double(),
        guide=problem.guide.double(),
    )
    step_map = StepMap(problem, LocalExecutor())
    positions = torch.tensor([2, 15])
    x = reference.trajectory[positions].double()
    _, J, _ = step_map.linearize(0, x, positions=positions)
    size, eps = x[0, 0].numel(), 1e-6
    for p, position in enumerate(positions.tolist()):
        for k in range(size):  # central differences, every row at once
            bump = torch.zeros_like(x[p]).reshape(2, size)
            bump[:, k] = eps
            bump = bump.reshape(x[p].shape)
            at = torch.tensor([position])
            up = step_map(at, (x[p] + bump).unsqueeze(0))[0]
            down = step_map(at, (x[p] - bump).unsqueeze(0))[0]
            column = ((up - down) / (2 * eps)).reshape(2, size)
            torch.testing.assert_close(J[p, :, :, k], column, atol=1e-5, rtol=1e-5)
