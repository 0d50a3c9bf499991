"""Network structure and semantics that the fixtures do not pin down (variants of the configs)."""

from __future__ import annotations

import math

import pytest
import torch

from policy_accel.policies.networks.transformer import TransformerForDiffusion
from policy_accel.policies.networks.unet1d import ConditionalUnet1D, SinusoidalPosEmb


def test_sinusoidal_embedding_formula():
    emb = SinusoidalPosEmb(8)(torch.tensor([3]))
    frequencies = torch.exp(-math.log(1e4) * torch.arange(4) / 3)
    assert torch.allclose(emb[0], torch.cat([(3 * frequencies).sin(), (3 * frequencies).cos()]))


@pytest.mark.parametrize("scale", [True, False])
def test_unet_film_variants_and_final_group_norm(scale):
    torch.manual_seed(0)
    net = ConditionalUnet1D(
        2,
        global_cond_dim=6,
        diffusion_step_embed_dim=16,
        down_dims=(16, 32),
        kernel_size=3,
        n_groups=4,
        cond_predict_scale=scale,
    )
    assert net.final_conv[0].block[1].num_groups == 8  # upstream's final block ignores n_groups
    assert net.down_modules[0][0].blocks[0].block[1].num_groups == 4
    linear = net.down_modules[0][0].cond_encoder[1]
    assert linear.out_features == (32 if scale else 16)
    out = net(torch.randn(3, 8, 2), torch.tensor([1, 5, 9]), global_cond=torch.randn(3, 6))
    assert out.shape == (3, 8, 2)
    # the condition matters
    other = net(torch.randn(3, 8, 2), torch.tensor([1, 5, 9]), global_cond=torch.randn(3, 6))
    assert not torch.allclose(out, other)


def test_unet_local_condition_uses_only_the_first_branch():
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, local_cond_dim=3, diffusion_step_embed_dim=16, down_dims=(16, 32))
    x, t, local = torch.randn(2, 8, 2), torch.tensor([3, 4]), torch.randn(2, 8, 3)
    out = net(x, t, local_cond=local)
    with torch.no_grad():  # upstream never adds the second branch: changing it changes nothing
        for p in net.local_cond_encoder[1].parameters():
            p.add_(1.0)
    assert torch.equal(net(x, t, local_cond=local), out)
    with pytest.raises(ValueError, match="no local_cond_dim"):
        ConditionalUnet1D(2, down_dims=(16, 32))(x, t, local_cond=local)


def test_transformer_causal_attention_hides_later_actions():
    torch.manual_seed(0)
    net = TransformerForDiffusion(
        2,
        2,
        horizon=8,
        n_obs_steps=2,
        cond_dim=5,
        n_layer=2,
        n_head=2,
        n_emb=16,
        p_drop_emb=0,
        p_drop_attn=0,
        causal_attn=True,
        obs_as_cond=True,
    ).eval()
    x, t, cond = torch.randn(1, 8, 2), torch.tensor([7]), torch.randn(1, 2, 5)
    changed = x.clone()
    changed[:, 5:] += 1.0
    with torch.no_grad():
        a, b = net(x, t, cond), net(changed, t, cond)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert net.memory_mask.shape == (8, 3)


@pytest.mark.parametrize(
    "kwargs,keys",
    [
        (
            {"cond_dim": 5, "n_cond_layers": 1, "causal_attn": False},
            "encoder.layers.0.self_attn.in_proj_weight",
        ),
        ({"cond_dim": 0, "time_as_cond": False}, "encoder.layers.1.linear1.weight"),
        ({"cond_dim": 0}, "decoder.layers.0.multihead_attn.in_proj_weight"),
    ],
)
def test_transformer_variants(kwargs, keys):
    torch.manual_seed(0)
    net = TransformerForDiffusion(
        2, 3, horizon=8, n_obs_steps=2, n_layer=2, n_head=2, n_emb=16, **kwargs
    ).eval()
    assert keys in net.state_dict()
    cond = torch.randn(2, 2, 5) if kwargs.get("cond_dim") else None
    with torch.no_grad():
        out = net(torch.randn(2, 8, 2), torch.tensor(4), cond)
    assert out.shape == (2, 8, 3)
    if not kwargs.get("time_as_cond", True):
        assert net.encoder_only and net.pos_emb.shape[1] == 9
