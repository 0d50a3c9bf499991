"""Warm starts: an exact guess converges at once, a nearby one converges faster than cold."""

from __future__ import annotations

import pytest
import torch

from policy_accel import DenoisingProblem, sample
from policy_accel.sampling import SOLVERS
from policy_accel.sampling.warm_start import (
    shift_noise,
    shift_trajectory,
    trajectory_from_predictions,
    warm_start_guess,
)
from tests.sampling.helpers import chunk_problem, rms

PARALLEL = [name for name in SOLVERS if name != "sequential"]
WINDOWED = ["paradigms", "picard", "taa", "newton", "chord"]


@pytest.fixture(scope="module")
def problem():
    return chunk_problem("ddpm", 100)


@pytest.mark.parametrize("method", WINDOWED)
def test_exact_guess_converges_in_one_round(problem, method):
    reference = sample(problem, "sequential")
    result = sample(problem, method, init=reference.trajectory)
    assert result.converged and result.rounds == 1
    assert rms(result.sample, reference.sample) <= 1e-5


def test_srds_exact_guess_converges_in_one_iteration(problem):
    reference = sample(problem, "sequential")
    result = sample(problem, "srds", init=reference.trajectory)
    assert result.converged and result.stats["iterations"] == 1
    assert result.rounds == result.stats["block_size"]


@pytest.mark.parametrize("method", PARALLEL)
def test_nearby_solution_converges_in_fewer_rounds_than_cold(problem, method):
    # A new observation shifts the action distribution a little: here every mixture mean moves.
    nearby = DenoisingProblem(
        problem.denoiser.shifted(0.05), problem.rule, problem.x_T, problem.noise
    )
    previous = sample(problem, method)
    cold = sample(nearby, method)
    warm = sample(nearby, method, init=previous.trajectory)
    reference = sample(nearby, "sequential")
    assert warm.converged and warm.rounds < cold.rounds
    assert rms(warm.sample, reference.sample) <= (1e-5 if method == "newton" else 5e-3)


def test_shift_noise_keeps_the_overlap_and_draws_a_fresh_tail(problem):
    generator = torch.Generator().manual_seed(5)
    x_T, noise = shift_noise(problem.x_T, problem.noise, 4, axis=0, generator=generator)
    assert x_T.shape == problem.x_T.shape and noise.shape == problem.noise.shape
    assert torch.equal(x_T[:, :12], problem.x_T[:, 4:])
    assert torch.equal(noise[:, :, :12], problem.noise[:, :, 4:])
    assert not torch.equal(x_T[:, 12:], problem.x_T[:, :4])
    again = shift_noise(problem.x_T, problem.noise, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], x_T) and torch.equal(again[1], noise)


def test_shift_trajectory_pads_with_the_last_entry(problem):
    trajectory = torch.arange(101 * 2 * 16 * 2, dtype=torch.float32).reshape(101, 2, 16, 2)
    shifted = shift_trajectory(trajectory, 3)
    assert torch.equal(shifted[:, :, :13], trajectory[:, :, 3:])
    assert torch.equal(shifted[:, :, 13:], trajectory[:, :, 15:16].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="shift"):
        shift_trajectory(trajectory, 17)


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 30), ("dpm", 20)])
def test_trajectory_from_exact_predictions_is_the_sequential_trajectory(kind, steps):
    problem = chunk_problem(kind, steps, **({} if kind == "dpm" else {"clip_sample": False}))
    reference = sample(problem, "sequential")
    rebuilt = trajectory_from_predictions(problem, reference.x0_predictions)
    assert rms(rebuilt, reference.trajectory) <= 1e-5


@pytest.mark.parametrize("method", WINDOWED)
def test_prediction_space_guess_beats_a_shifted_trajectory(problem, method):
    """The receding-horizon case: 8 actions executed, the distribution moves along the horizon
    (here the second half of the new chunk is new, so neither guess beats a cold start by much;
    the guess built in prediction space is the better of the two)."""
    from policy_accel.sampling.analytic import GaussianMixtureDenoiser, action_chunk_means

    means = action_chunk_means(4, 24)
    acp = problem.denoiser.alphas_cumprod
    first = DenoisingProblem(
        GaussianMixtureDenoiser(means[:, :16], 0.1, acp), problem.rule, problem.x_T, problem.noise
    )
    previous = sample(first, method)
    x_T, noise = shift_noise(first.x_T, first.noise, 8, generator=torch.Generator().manual_seed(1))
    following = DenoisingProblem(
        GaussianMixtureDenoiser(means[:, 8:24], 0.1, acp), problem.rule, x_T, noise
    )
    guess = warm_start_guess(following, previous, 8, space="prediction")
    assert torch.equal(guess[0], x_T)
    by_prediction = sample(following, method, init=guess)
    by_trajectory = sample(
        following, method, init=warm_start_guess(following, previous, 8, space="trajectory")
    )
    assert by_prediction.rounds < by_trajectory.rounds
    reference = sample(following, "sequential")
    assert rms(by_prediction.sample, reference.sample) <= (1e-5 if method == "newton" else 5e-3)
    with pytest.raises(ValueError, match="space"):
        warm_start_guess(following, previous, 8, space="latent")


def _looped_trajectory(problem, x0_predictions):
    """The step-by-step definition of trajectory_from_predictions (the reference): the step
    map's own convention, inpainted entries holding the next position's known value."""
    rule = problem.rule
    x = torch.empty(problem.trajectory_shape, dtype=problem.x_T.dtype)
    x[0] = problem.x_T
    previous = None
    for i in range(problem.num_steps):
        position = torch.tensor([i])
        x_in = problem.prepare(x[i : i + 1], position)
        output = rule.model_output_from_x0(position, x_in, x0_predictions[i : i + 1])
        converted = rule.convert(position, x_in, output)
        prev = (previous if previous is not None else converted) if rule.history else None
        moved = rule.step(position, x_in, converted, prev)
        x[i + 1] = problem.prepare(moved + problem.noise_term(position, moved), position + 1)[0]
        previous = converted
    return x


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_vectorised_trajectory_equals_the_step_by_step_one(kind, masked):
    problem = chunk_problem(kind, 30)
    if masked:
        mask = torch.zeros_like(problem.x_T, dtype=torch.bool)
        mask[:, :2] = True
        problem = DenoisingProblem(
            problem.denoiser, problem.rule, problem.x_T, problem.noise, mask, 0.3 * mask
        )
    predictions = sample(problem, "sequential").x0_predictions
    expected = _looped_trajectory(problem, predictions)
    got = trajectory_from_predictions(problem, predictions)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
