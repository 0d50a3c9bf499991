"""A real-size Stable Diffusion UNet (random weights, fp16) on a GPU: the parallel sample equals
the sequential one. Marked ``gpu``; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from policy_accel.adapters import generate
from tests.adapters.conftest import relative_rms

pytestmark = pytest.mark.gpu


def test_real_size_unet_parallel_equals_sequential(sd_pipe):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=sd_pipe.text_encoder.config.hidden_size,
        attention_head_dim=8,
    )
    sd_pipe.unet = unet.half()
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    sd_pipe.to("cuda")
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    kwargs = dict(
        num_inference_steps=20, latents=latents, output_type="latent", height=512, width=512
    )
    sequential, _ = generate(sd_pipe, ["a red cube"], "sequential", **kwargs)
    parallel, result = generate(sd_pipe, ["a red cube"], "picard", tolerance=0.0, **kwargs)
    assert relative_rms(parallel, sequential) <= 1e-2  # fp16 model, fp32 solver state
    assert result.converged
