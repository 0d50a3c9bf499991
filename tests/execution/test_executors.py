"""Executors give the same answers, wherever the windows run."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from policy_accel import sample
from policy_accel.execution import (
    DeviceExecutionError,
    ExecutorConfig,
    LocalExecutor,
    MultiDeviceExecutor,
    make_executor,
)
from policy_accel.execution.multi_device import split_sizes
from tests.sampling.helpers import chunk_problem, rms


class ReplicableMixture:
    """The analytic denoiser with a ``to(device)`` (as policy denoisers have), counting calls;
    ``fail_on`` makes that replica raise."""

    def __init__(self, inner, fail_on: int | None = None, index: int = -1, log=None):
        self.inner, self.fail_on, self.index = inner, fail_on, index
        self.log = [] if log is None else log
        self.replicas = 0

    def to(self, device):
        replica = ReplicableMixture(self.inner, self.fail_on, self.replicas, self.log)
        self.replicas += 1
        return replica

    def __call__(self, x, t):
        if self.index == self.fail_on:
            raise RuntimeError("out of memory")
        self.log.append((self.index, x.shape[0]))
        return self.inner(x, t)


@pytest.fixture(scope="module")
def problem():
    return chunk_problem("ddpm", 60, batch=2)


def test_split_sizes_are_proportional_and_complete():
    assert split_sizes(10, [1, 1, 1]) == [4, 3, 3]
    assert split_sizes(7, [1, 2, 4]) == [1, 2, 4]
    assert sum(split_sizes(101, [0.3, 1.7, 2.2])) == 101


@pytest.mark.parametrize("method", ["picard", "newton", "taa"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0]])
def test_multi_device_equals_local(problem, method, weights):
    from dataclasses import replace

    replicable = replace(problem, denoiser=ReplicableMixture(problem.denoiser))
    local = sample(problem, method, executor=LocalExecutor(), tolerance=0.0, max_rounds=8)
    executor = MultiDeviceExecutor(["cpu", "cpu", "cpu"], weights=weights)
    split = sample(replicable, method, executor=executor, tolerance=0.0, max_rounds=8)
    assert rms(split.trajectory, local.trajectory) <= 1e-6
    assert split.rounds == local.rounds and split.model_evals == local.model_evals
    used = {index for index, _ in replicable.denoiser.log}
    assert used == {0, 1, 2}


def test_small_windows_stay_on_the_first_device(problem):
    from dataclasses import replace

    replicable = replace(problem, denoiser=ReplicableMixture(problem.denoiser))
    executor = MultiDeviceExecutor(["cpu", "cpu"], min_positions=4)
    sample(replicable, "sequential", executor=executor)  # windows of 1 position
    assert {index for index, _ in replicable.denoiser.log} == {0}


def test_a_failing_device_is_named(problem):
    from dataclasses import replace

    failing = replace(problem, denoiser=ReplicableMixture(problem.denoiser, fail_on=1))
    with pytest.raises(
        DeviceExecutionError, match=r"failed on cpu \(device 1 of 3\): RuntimeError: out of memory"
    ):
        sample(failing, "picard", executor=MultiDeviceExecutor(["cpu", "cpu", "cpu"]))


def test_threads_per_device_give_the_same_answer(problem):
    from dataclasses import replace

    replicable = replace(problem, denoiser=ReplicableMixture(problem.denoiser))
    local = sample(problem, "picard", tolerance=0.0, max_rounds=5)
    threaded = sample(
        replicable,
        "picard",
        executor=MultiDeviceExecutor(["cpu", "cpu"], threads=True),
        tolerance=0.0,
        max_rounds=5,
    )
    assert rms(threaded.trajectory, local.trajectory) <= 1e-6


def test_local_executor_runs_the_model_in_another_dtype(problem):
    executor = LocalExecutor(dtype=torch.float64)
    result = sample(problem, "picard", executor=executor, tolerance=0.0)
    assert result.sample.dtype == torch.float32
    assert rms(result.sample, sample(problem, "sequential").sample) <= 1e-5


def test_executor_configuration_and_records():
    assert isinstance(make_executor(), LocalExecutor)
    assert isinstance(make_executor(devices=["cpu", "cpu"]), MultiDeviceExecutor)
    with pytest.raises(ValueError, match="choose one of device, devices and distributed"):
        make_executor(device="cpu", devices=["cpu"])
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda"):
        LocalExecutor(cuda_graphs=True)
    before = torch.get_num_threads()
    LocalExecutor(device="cpu")
    assert torch.get_num_threads() == before  # thread settings belong to the entry points
    assert LocalExecutor().describe()["torch_threads"] == before
    assert isinstance(ExecutorConfig(devices=["cpu", "cpu"]).build(), MultiDeviceExecutor)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ExecutorConfig(dtype="float8")


def _distributed_worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from policy_accel.execution.distributed import DistributedExecutor, serve
    from policy_accel.sampling.analytic import GaussianMixtureDenoiser
    from tests.sampling.helpers import make_scheduler

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    scheduler = make_scheduler("ddpm")

    def make_denoiser(payload):
        return GaussianMixtureDenoiser(payload["means"], 0.1, scheduler.alphas_cumprod)

    try:
        if rank:
            serve(make_denoiser)
            return
        problem = chunk_problem("ddpm", 60, batch=2)
        executor = DistributedExecutor()
        denoiser = executor.bind({"means": problem.denoiser.means}, make_denoiser)
        from dataclasses import replace

        bound = replace(problem, denoiser=denoiser)
        errors = []
        for method in ("picard", "newton"):
            local = sample(problem, method, tolerance=0.0, max_rounds=6)
            remote = sample(bound, method, executor=executor, tolerance=0.0, max_rounds=6)
            errors.append(rms(remote.trajectory, local.trajectory))
        executor.close()
        with open(out_path, "w") as f:
            f.write(" ".join(str(e) for e in errors))
    finally:
        dist.destroy_process_group()


def test_distributed_executor_with_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "errors.txt"
    mp.spawn(_distributed_worker, args=(2, port, str(out)), nprocs=2, join=True)
    errors = [float(e) for e in out.read_text().split()]
    assert len(errors) == 2 and max(errors) <= 1e-6


@pytest.mark.slow
def test_compiled_denoiser_matches_eager():
    """torch.compile on CPU (about 50 s of compilation here)."""
    from policy_accel.policies.base import ConditionedDenoiser
    from policy_accel.policies.networks.unet1d import ConditionalUnet1D

    torch.manual_seed(0)
    net = ConditionalUnet1D(2, global_cond_dim=8, diffusion_step_embed_dim=32, down_dims=(32, 64))
    denoiser = ConditionedDenoiser(net.eval(), {"global_cond": torch.randn(1, 8)}, 1)
    x, t = torch.randn(8, 1, 16, 2), torch.arange(8)
    compiled = LocalExecutor(compile=True)
    assert torch.allclose(
        compiled.evaluate(denoiser, x, t), LocalExecutor().evaluate(denoiser, x, t), atol=1e-5
    )
    assert compiled.describe()["compile"] is True
