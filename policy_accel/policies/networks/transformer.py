"""DiffusionPolicy's ``TransformerForDiffusion`` (the minGPT-style time-series diffusion
transformer), key names as upstream writes them.

Tokens are the noisy actions; the diffusion time (and, with ``obs_as_cond``, the observations)
form the condition sequence, encoded by an MLP (``n_cond_layers=0``) or a transformer encoder and
attended to by a transformer decoder. With ``causal_attn`` an action token sees only earlier
action tokens and the time token plus the observations up to its own step. Without any condition
tokens (``time_as_cond=False`` and no observations) it is encoder-only with time as a first token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policy_accel.policies.networks.unet1d import SinusoidalPosEmb


def _additive_mask(allowed: Tensor) -> Tensor:
    return allowed.float().masked_fill(~allowed, float("-inf")).masked_fill(allowed, 0.0)


class TransformerForDiffusion(nn.Module):
    """``forward(sample [B, T, input_dim], timestep, cond [B, n_obs_steps, cond_dim] | None)``."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        horizon: int,
        n_obs_steps: int | None = None,
        cond_dim: int = 0,
        n_layer: int = 12,
        n_head: int = 12,
        n_emb: int = 768,
        p_drop_emb: float = 0.1,
        p_drop_attn: float = 0.1,
        causal_attn: bool = False,
        time_as_cond: bool = True,
        obs_as_cond: bool = False,
        n_cond_layers: int = 0,
    ) -> None:
        super().__init__()
        n_obs_steps = horizon if n_obs_steps is None else n_obs_steps
        tokens, cond_tokens = horizon, 1
        if not time_as_cond:
            tokens, cond_tokens = tokens + 1, cond_tokens - 1
        obs_as_cond = cond_dim > 0
        if obs_as_cond:
            if not time_as_cond:
                raise ValueError("obs_as_cond needs time_as_cond=True (upstream asserts it).")
            cond_tokens += n_obs_steps
        self.time_as_cond, self.obs_as_cond = time_as_cond, obs_as_cond
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, tokens, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb) if obs_as_cond else None
        self.cond_pos_emb = None
        self.decoder = None

        def layer(kind):
            return kind(
                d_model=n_emb,
                nhead=n_head,
                dim_feedforward=4 * n_emb,
                dropout=p_drop_attn,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )

        self.encoder_only = cond_tokens == 0
        if not self.encoder_only:
            self.cond_pos_emb = nn.Parameter(torch.zeros(1, cond_tokens, n_emb))
            if n_cond_layers > 0:
                self.encoder = nn.TransformerEncoder(
                    layer(nn.TransformerEncoderLayer), n_cond_layers, enable_nested_tensor=False
                )
            else:
                self.encoder = nn.Sequential(
                    nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb)
                )
            self.decoder = nn.TransformerDecoder(layer(nn.TransformerDecoderLayer), n_layer)
        else:
            self.encoder = nn.TransformerEncoder(
                layer(nn.TransformerEncoderLayer), n_layer, enable_nested_tensor=False
            )
        if causal_attn:
            steps = torch.arange(tokens)
            self.register_buffer("mask", _additive_mask(steps[:, None] >= steps[None, :]))
            if time_as_cond and obs_as_cond:
                t, s = torch.meshgrid(
                    torch.arange(tokens), torch.arange(cond_tokens), indexing="ij"
                )
                self.register_buffer("memory_mask", _additive_mask(t >= (s - 1)))
            else:
                self.memory_mask = None
        else:
            self.mask = None
            self.memory_mask = None
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)

    def forward(self, sample: Tensor, timestep: Tensor | int, cond: Tensor | None = None) -> Tensor:
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        time_emb = self.time_emb(timesteps).unsqueeze(1)
        input_emb = self.input_emb(sample)
        if self.encoder_only:
            tokens = torch.cat([time_emb, input_emb], dim=1)
            x = self.drop(tokens + self.pos_emb[:, : tokens.shape[1]])
            x = self.encoder(src=x, mask=self.mask)[:, 1:]
        else:
            cond_emb = time_emb
            if self.obs_as_cond:
                cond_emb = torch.cat([cond_emb, self.cond_obs_emb(cond)], dim=1)
            memory = self.encoder(self.drop(cond_emb + self.cond_pos_emb[:, : cond_emb.shape[1]]))
            x = self.drop(input_emb + self.pos_emb[:, : input_emb.shape[1]])
            x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
        return self.head(self.ln_f(x))
