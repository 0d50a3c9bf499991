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


def _pusht_on_cuda():
    from policy_accel import load_policy
    from tests.shared_fixtures import ROOT

    return load_policy(ROOT / "checkpoints/pusht_keypoints", device="cuda")


def test_captured_replans_keep_their_graphs_and_equal_eager():
    """Closed-loop replans through real CUDA graphs: the captured sequential loop is bit for bit
    the eager loop, captured chord rounds equal eager chord, and no replan after the first
    captures anything new (the conditioning is copied into static buffers)."""
    import numpy as np

    from policy_accel.control import Controller, SamplerConfig

    policy = _pusht_on_cuda()
    rng = np.random.default_rng(0)
    stream = [rng.uniform(100, 400, 20).astype(np.float32) for _ in range(4)]
    for method in ("sequential", "chord"):
        sampler = SamplerConfig(method=method)
        captured_executor = LocalExecutor("cuda", cuda_graphs=True)
        eager = Controller(policy, sampler, seed=2, executor=LocalExecutor("cuda"))
        captured = Controller(policy, sampler, seed=2, executor=captured_executor)
        counts = []
        for obs in stream:
            expected, got = eager.plan(obs, executed=8), captured.plan(obs, executed=8)
            counts.append(captured_executor.captures)
            if method == "sequential":
                assert np.array_equal(expected.chunk, got.chunk)
            else:
                assert got.result.stats.get("captured_rounds")
                np.testing.assert_allclose(got.chunk, expected.chunk, atol=0.05)  # px of 512
        assert counts[-1] == counts[1], counts
