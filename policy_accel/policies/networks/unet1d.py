"""DiffusionPolicy's ``ConditionalUnet1D`` (Chi et al. 2023), key names as upstream writes them.

Temporal 1-D UNet over ``[B, T, C]`` action trajectories, conditioned by FiLM on a diffusion-step
embedding concatenated with an optional global condition, with optional local (per-timestep)
conditioning. Kept faithful to upstream, quirks included, because checkpoints depend on them:

* every up level has an upsampling layer (upstream's ``is_last`` test never fires there);
* the local-condition encoder has two residual blocks, and the second one is never used in
  ``forward`` (upstream tests ``idx == len(self.up_modules)``, which never holds);
* the final ``Conv1dBlock`` uses 8 GroupNorm groups whatever ``n_groups`` is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalPosEmb(nn.Module):
    """``cat(sin(t w), cos(t w))`` with ``w_i = exp(-log(1e4) i / (half - 1))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        half_dim = self.dim // 2
        scale = math.log(10000) / (half_dim - 1)
        frequencies = torch.exp(torch.arange(half_dim, device=x.device) * -scale)
        angles = x[:, None] * frequencies[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish (keys ``block.0``, ``block.1``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class Downsample1d(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two conv blocks with FiLM in between: ``scale * h + bias`` (``cond_predict_scale``, the
    first ``C`` channels of the projection are the scale) or ``h + bias``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(in_channels, out_channels, kernel_size, n_groups=n_groups),
                Conv1dBlock(out_channels, out_channels, kernel_size, n_groups=n_groups),
            ]
        )
        self.out_channels = out_channels
        self.cond_predict_scale = cond_predict_scale
        channels = out_channels * 2 if cond_predict_scale else out_channels
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, channels))
        self.residual_conv = (
            nn.Conv1d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        out = self.blocks[0](x)
        embed = self.cond_encoder(cond).unsqueeze(-1)
        if self.cond_predict_scale:
            embed = embed.reshape(embed.shape[0], 2, self.out_channels, 1)
            out = embed[:, 0] * out + embed[:, 1]
        else:
            out = out + embed
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """``forward(sample [B, T, input_dim], timestep, local_cond=None, global_cond=None)``."""

    def __init__(
        self,
        input_dim: int,
        local_cond_dim: int | None = None,
        global_cond_dim: int | None = None,
        diffusion_step_embed_dim: int = 256,
        down_dims: tuple[int, ...] = (256, 512, 1024),
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ) -> None:
        super().__init__()
        all_dims = [input_dim, *down_dims]
        start_dim = down_dims[0]
        dsed = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        cond_dim = dsed + (global_cond_dim or 0)
        in_out = list(zip(all_dims[:-1], all_dims[1:], strict=True))

        def block(dim_in: int, dim_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                dim_in, dim_out, cond_dim, kernel_size, n_groups, cond_predict_scale
            )

        self.local_cond_encoder = None
        if local_cond_dim is not None:
            dim_out = in_out[0][1]
            self.local_cond_encoder = nn.ModuleList(
                [block(local_cond_dim, dim_out), block(local_cond_dim, dim_out)]
            )
        mid_dim = all_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid_dim, mid_dim), block(mid_dim, mid_dim)])
        self.down_modules = nn.ModuleList(
            nn.ModuleList(
                [
                    block(dim_in, dim_out),
                    block(dim_out, dim_out),
                    Downsample1d(dim_out) if index < len(in_out) - 1 else nn.Identity(),
                ]
            )
            for index, (dim_in, dim_out) in enumerate(in_out)
        )
        self.up_modules = nn.ModuleList(
            nn.ModuleList([block(dim_out * 2, dim_in), block(dim_in, dim_in), Upsample1d(dim_in)])
            for dim_in, dim_out in reversed(in_out[1:])
        )
        self.final_conv = nn.Sequential(
            Conv1dBlock(start_dim, start_dim, kernel_size), nn.Conv1d(start_dim, input_dim, 1)
        )

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | int,
        local_cond: Tensor | None = None,
        global_cond: Tensor | None = None,
    ) -> Tensor:
        x = sample.transpose(1, 2)  # [B, C, T]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(sample.shape[0])
        feature = self.diffusion_step_encoder(timesteps)
        if global_cond is not None:
            feature = torch.cat([feature, global_cond], dim=-1)
        local = []
        if local_cond is not None:
            if self.local_cond_encoder is None:
                raise ValueError(
                    "this ConditionalUnet1D has no local_cond_dim; pass no local_cond."
                )
            local_in = local_cond.transpose(1, 2)
            local = [encoder(local_in, feature) for encoder in self.local_cond_encoder]
        skips = []
        for index, (resnet, resnet2, downsample) in enumerate(self.down_modules):
            x = resnet(x, feature)
            if index == 0 and local:
                x = x + local[0]
            x = resnet2(x, feature)
            skips.append(x)
            x = downsample(x)
        for module in self.mid_modules:
            x = module(x, feature)
        for resnet, resnet2, upsample in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)
            x = resnet(
                x, feature
            )  # upstream's second local branch would be added here; it never is
            x = resnet2(x, feature)
            x = upsample(x)
        return self.final_conv(x).transpose(1, 2)
