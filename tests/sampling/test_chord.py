"""Chord Newton and its Jacobian estimates: any estimate costs rounds, never correctness."""

from __future__ import annotations

import pytest
import torch

from policy_accel import DenoisingProblem, sample
from policy_accel.execution import LocalExecutor
from policy_accel.sampling import Jacobians, estimate_jacobians
from policy_accel.sampling.solvers.chord import broyden_update
from policy_accel.sampling.solvers.scan import affine_scan, correction_scan, matrix_scan
from tests.sampling.helpers import chunk_problem, rms


@pytest.fixture(scope="module")
def problem():
    return chunk_problem("ddpm", 100)


@pytest.fixture(scope="module")
def nearby(problem):
    """The next replan: every mixture mean moved (a new observation), the same noise."""
    return DenoisingProblem(
        problem.denoiser.shifted(0.05), problem.rule, problem.x_T, problem.noise
    )


def test_a_jacobian_estimate_of_a_different_problem_still_converges_to_the_exact_sample(
    problem, nearby
):
    other = chunk_problem("ddpm", 100, seed=7)  # other noise, other trajectory
    estimate = estimate_jacobians(other, sample(other, "sequential").trajectory, LocalExecutor())
    reference = sample(nearby, "sequential")
    exact = sample(nearby, "chord", jacobians=estimate, tolerance=0.0)
    assert exact.converged and rms(exact.sample, reference.sample) <= 1e-5
    default = sample(nearby, "chord", jacobians=estimate)
    assert default.converged and rms(default.sample, reference.sample) <= 2e-3


def test_a_wildly_wrong_estimate_falls_back_and_stays_exact(problem):
    reference = sample(problem, "sequential")
    n, batch = problem.num_steps, problem.batch_size
    wrong = Jacobians(
        torch.eye(32).expand(n, batch, 32, 32) * 50.0, torch.arange(n), n, (16, 2)
    )  # amplifies every correction 50x
    result = sample(problem, "chord", jacobians=wrong, tolerance=0.0)
    assert result.converged and rms(result.sample, reference.sample) <= 1e-5
    assert torch.isfinite(result.trajectory).all()


def test_the_previous_replans_jacobians_save_rounds_from_a_warm_guess(problem, nearby):
    previous = sample(problem, "sequential")
    estimate = estimate_jacobians(problem, previous.trajectory, LocalExecutor(), stride=4)
    assert estimate.positions.tolist()[-1] == problem.num_steps - 1  # the last step is measured
    assert estimate.evaluations == len(estimate.positions) * problem.batch_size * 32
    plain = sample(nearby, "chord", init=previous.trajectory, secant=False, tolerance=1e-4)
    informed = sample(
        nearby, "chord", init=previous.trajectory, jacobians=estimate, secant=False, tolerance=1e-4
    )
    picard = sample(nearby, "picard", init=previous.trajectory, tolerance=1e-4)
    assert plain.rounds == picard.rounds  # no estimate, no secant: picard's linear part
    assert informed.rounds < plain.rounds
    reference = sample(nearby, "sequential")
    assert rms(informed.sample, reference.sample) <= 1e-4


def test_secant_updates_save_rounds_without_any_estimate(nearby, problem):
    previous = sample(problem, "sequential").trajectory
    plain = sample(nearby, "chord", init=previous, secant=False, tolerance=1e-4)
    secant = sample(nearby, "chord", init=previous, tolerance=1e-4)
    assert secant.rounds < plain.rounds


def test_broyden_update_maps_the_last_step_to_the_change_it_caused():
    generator = torch.Generator().manual_seed(0)
    J = torch.randn(3, 2, 4, 4, generator=generator)
    dx = torch.randn(3, 2, 4, 1, generator=generator)
    dF = torch.randn(3, 2, 4, 1, generator=generator)
    known = torch.tensor([True, True, False])
    before = J.clone()
    broyden_update(J, dx, dF, known)
    assert torch.allclose(J[:2] @ dx[:2], dF[:2], atol=1e-5)
    assert torch.equal(J[2], before[2])  # no previous round there: untouched


def test_shifting_moves_blocks_along_the_horizon_and_fills_the_tail_from_the_end():
    length, channels = 5, 2
    # block (h, g) holds 10 * h + g, so the source of every block can be read back
    h = torch.arange(length).reshape(-1, 1, 1, 1)
    g = torch.arange(length).reshape(1, 1, -1, 1)
    blocks = (10 * h + g).expand(length, channels, length, channels).to(torch.float32)
    model = blocks.reshape(1, 1, length * channels, length * channels)
    estimate = Jacobians(model, torch.tensor([0]), 1, (length, channels))
    shifted = estimate.shifted(2).model.reshape(length, channels, length, channels)
    source = shifted[:, 0, :, 0]
    assert source[0, 0] == 22 and source[1, 2] == 34  # (h + 2, g + 2)
    assert source[4, 4] == 44  # past the end: translated back onto the old end block
    assert source[3, 4] == 34 and source[4, 1] == 41  # tail rows and columns keep their offset
    assert estimate.shifted(0) is estimate
    with pytest.raises(ValueError, match=r"shift must be in \[0, 5\)"):
        estimate.shifted(5)


def test_dense_fills_unmeasured_steps_from_the_nearest_measured_one():
    model = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    estimate = Jacobians(model, torch.tensor([0, 4]), 5, (2,))
    dense = estimate.dense(torch.zeros(5, dtype=torch.float64))
    assert dense[:, 0, 0, 0].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]  # step 2: the first of ties
    with_coefficient = estimate.dense(torch.full((5,), 0.5, dtype=torch.float64))
    assert with_coefficient[0, 0].tolist() == [[1.5, 1.0], [1.0, 1.5]]


def test_bad_chord_options_and_mismatched_estimates_are_refused(problem):
    with pytest.raises(ValueError, match="jacobians must be a policy_accel.sampling.Jacobians"):
        sample(problem, "chord", jacobians=torch.zeros(3))
    with pytest.raises(ValueError, match="secant must be True or False"):
        sample(problem, "chord", secant="yes")
    with pytest.raises(ValueError, match="reset_growth must be > 1"):
        sample(problem, "chord", reset_growth=0.5)
    other = chunk_problem("ddpm", 50, batch=1)
    estimate = estimate_jacobians(
        other, sample(other, "sequential").trajectory, LocalExecutor(), 10
    )
    with pytest.raises(ValueError, match="estimate is for 1 rows of 50 steps"):
        sample(problem, "chord", jacobians=estimate)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        estimate_jacobians(other, other.x_T.expand(51, 1, 16, 2), LocalExecutor(), 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_matrix_scan_and_the_affine_scan_equal_the_loop(batch):
    generator = torch.Generator().manual_seed(2)
    count = 37
    J = torch.randn(count, batch, 6, 6, generator=generator) * 0.3
    F = torch.randn(count, batch, 3, 2, generator=generator)
    old = torch.randn(count, batch, 3, 2, generator=generator)

    def multiply(p, delta):
        return (J[p] @ delta.reshape(batch, -1, 1)).reshape(batch, 3, 2)

    reference = correction_scan(F, old, multiply)
    assert torch.allclose(matrix_scan(F, old, J), reference, atol=1e-5)
    doubled = affine_scan(J, (F - old).reshape(count, batch, -1, 1)).reshape(F.shape) + old
    assert torch.allclose(doubled, reference, atol=1e-5)
