"""Test-suite settings: one torch thread (see the README) and GPU tests skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)
# transformers warns at import that torchvision (which has no CPU wheel here) is missing
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pusht_policy(tmp_path_factory):
    """A barely trained PushT keypoint policy (10-step DDPM): real networks, loading and
    normalisation, fast enough to roll out in tests; not good enough to succeed."""
    from policy_accel.data.demos import collect_demos
    from policy_accel.policies import load_policy
    from policy_accel.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_pusht")
    buffer, _ = collect_demos("pusht", 1, first_seed=2000)
    buffer.save(root / "demos.zarr")
    config = TrainConfig(
        dataset=str(root / "demos.zarr"),
        output=str(root / "run"),
        down_dims=(16, 32),
        diffusion_step_embed_dim=16,
        batch_size=16,
        max_steps=5,
        lr_warmup_steps=1,
        num_train_timesteps=10,
    )
    return load_policy(train(config, log=lambda _: None).policy_dir)


@pytest.fixture(scope="session", params=["global", "local", "inpainting",
                                         "pred_action_steps_only", "transformer", "image",
                                         "lerobot"])  # fmt: skip
def kind_policy(request):
    """``(kind, policy)`` for every kind of policy the loaders accept (tests/policy_kinds.py)."""
    from tests.policy_kinds import DP, LEROBOT, make_policy
    from tests.shared_fixtures import require

    require(DP)
    require(LEROBOT)
    return request.param, make_policy(request.param)
