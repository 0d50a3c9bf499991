"""GPU checks (marked ``gpu``; skipped without CUDA): the same answers on cuda:0, and CUDA-graph
replays equal to eager calls."""

from __future__ import annotations

import pytest
import torch

from policy_accel import sample
from policy_accel.execution import LocalExecutor, MultiDeviceExecutor
from policy_accel.policies.base import ConditionedDenoiser
from policy_accel.policies.networks.unet1d import ConditionalUnet1D
from tests.sampling.helpers import chunk_problem, rms

pytestmark = pytest.mark.gpu


def small_unet(device):
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, global_cond_dim=8, diffusion_step_embed_dim=32, down_dims=(32, 64))
    return net.to(device).eval()


def test_solvers_on_cuda_equal_cpu():
    cpu = chunk_problem("ddpm", 50, batch=2)
    reference = sample(cpu, "sequential")
    from dataclasses import replace

    cuda = replace(cpu, x_T=cpu.x_T.cuda(), noise=cpu.noise.cuda(), rule=cpu.rule.to("cuda"))
    for method in ("picard", "taa", "newton"):
        result = sample(cuda, method, tolerance=0.0)
        assert rms(result.sample.cpu(), reference.sample) <= 1e-4, method


def test_graph_replays_equal_eager():
    net = small_unet("cuda")
    denoiser = ConditionedDenoiser(net, {"global_cond": torch.randn(1, 8, device="cuda")}, 1)
    eager, graphed = LocalExecutor("cuda"), LocalExecutor("cuda", cuda_graphs=True)
    for positions in (1, 8, 32):
        x = torch.randn(positions, 1, 16, 2, device="cuda")
        t = torch.arange(positions, device="cuda")
        expected = eager.evaluate(denoiser, x, t)
        for _ in range(3):  # capture, then replays with the same static buffers
            assert torch.allclose(graphed.evaluate(denoiser, x, t), expected, atol=1e-5)
        x2 = torch.randn_like(x)
        assert torch.allclose(
            graphed.evaluate(denoiser, x2, t), eager.evaluate(denoiser, x2, t), atol=1e-5
        )


def test_multi_device_with_cuda_replicas():
    net = small_unet("cpu")
    denoiser = ConditionedDenoiser(net, {"global_cond": torch.randn(1, 8)}, 1)
    x, t = torch.randn(10, 1, 16, 2), torch.arange(10)
    devices = ["cuda:0", "cpu"] if torch.cuda.device_count() == 1 else ["cuda:0", "cuda:1"]
    split = MultiDeviceExecutor(devices).evaluate(denoiser, x, t)
    assert torch.allclose(split, LocalExecutor().evaluate(denoiser, x, t), atol=1e-5)
