"""Bad input gets an error that names it and says what to do."""

from __future__ import annotations

import pytest
import torch

from policy_accel import DenoisingProblem, sample
from policy_accel.execution import DenoiserOutputError
from policy_accel.sampling import NonFiniteDenoiserOutput, SolverOptionError
from tests.sampling.helpers import chunk_problem, make_scheduler, mixture


@pytest.fixture(scope="module")
def problem():
    return chunk_problem("ddim", 20, clip_sample=False)


def test_unknown_method_lists_the_valid_ones(problem):
    with pytest.raises(
        SolverOptionError, match=r"unknown method 'fast'.*newton.*paradigms.*picard"
    ):
        sample(problem, "fast")


def test_unknown_option_lists_the_valid_ones(problem):
    with pytest.raises(
        SolverOptionError, match=r"\['windw'\].*Valid options: \['window', 'tolerance'"
    ):
        sample(problem, "picard", windw=4)
    with pytest.raises(SolverOptionError, match=r"Valid options: \[.callback.\]"):
        sample(problem, "sequential", tolerance=0.1)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"window": 0}, "window"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"max_rounds": 0}, "max_rounds"),
    ],
)
def test_bad_option_values_are_refused(problem, options, message):
    with pytest.raises(ValueError, match=message):
        sample(problem, "picard", **options)


def test_init_of_the_wrong_shape_is_refused(problem):
    with pytest.raises(
        ValueError, match=r"init has shape \(20, 2, 16, 2\), expected \(21, 2, 16, 2\)"
    ):
        sample(problem, "picard", init=torch.zeros(20, 2, 16, 2))
    with pytest.raises(ValueError, match="init contains NaN"):
        sample(problem, "picard", init=torch.full((21, 2, 16, 2), float("nan")))


def test_noise_of_the_wrong_shape_is_refused():
    scheduler = make_scheduler("ddpm")
    with pytest.raises(
        ValueError, match=r"noise has shape \(10, 2, 16, 2\), expected \(100, 2, 16, 2\)"
    ):
        DenoisingProblem.from_scheduler(
            scheduler, mixture(scheduler), 100, (2, 16, 2), noise=torch.zeros(10, 2, 16, 2)
        )
    with pytest.raises(ValueError, match=r"x_T has shape \(3, 16, 2\), expected \(2, 16, 2\)"):
        DenoisingProblem.from_scheduler(
            scheduler, mixture(scheduler), 100, (2, 16, 2), x_T=torch.zeros(3, 16, 2)
        )


@pytest.mark.parametrize(
    "method", ["sequential", "paradigms", "picard", "taa", "srds", "newton", "chord"]
)
def test_nan_from_the_denoiser_names_round_and_step(problem, method):
    def broken(x, t):
        out = problem.denoiser(x, t)
        return torch.where((t == int(problem.timesteps[5])).reshape(-1, 1, 1), torch.nan, out)

    bad = DenoisingProblem(broken, problem.rule, problem.x_T, problem.noise)
    with pytest.raises(NonFiniteDenoiserOutput, match=r"round \d+ at step 5 \(t=\d+\)") as info:
        sample(bad, method)
    assert info.value.step == 5


def test_denoiser_output_of_the_wrong_shape_is_named(problem):
    bad = DenoisingProblem(lambda x, t: x[:, :3], problem.rule, problem.x_T, problem.noise)
    with pytest.raises(
        DenoiserOutputError, match=r"returned shape \(2, 3, 2\), expected \(2, 16, 2\)"
    ):
        sample(bad, "sequential")


def test_mask_without_cond_data_is_refused(problem):
    with pytest.raises(ValueError, match="mask and cond_data go together"):
        DenoisingProblem(
            problem.denoiser,
            problem.rule,
            problem.x_T,
            problem.noise,
            mask=torch.ones(16, 2, dtype=torch.bool),
        )
