"""The solvers on a CUDA device give the CPU answer (run where a GPU is lent; skipped here)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from policy_accel import DenoisingProblem, sample
from policy_accel.sampling import SOLVERS
from tests.sampling.helpers import mixture, rms


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(SOLVERS))
def test_solver_on_cuda_matches_cpu_sequential(method):
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    generator = torch.Generator().manual_seed(0)
    cpu = DenoisingProblem.from_scheduler(
        scheduler, mixture(scheduler), 100, (2, 16, 2), generator=generator
    )
    reference = sample(cpu, "sequential")
    denoiser = mixture(scheduler)
    denoiser.means = denoiser.means.cuda()
    cuda = DenoisingProblem.from_scheduler(
        scheduler, denoiser, 100, (2, 16, 2), x_T=cpu.x_T.cuda(), noise=cpu.noise.cuda()
    )
    result = sample(cuda, method, tolerance=0.0)
    assert result.sample.device.type == "cuda"
    assert rms(result.sample.cpu(), reference.sample) <= 1e-4
