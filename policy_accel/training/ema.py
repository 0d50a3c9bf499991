"""DiffusionPolicy's EMA of the weights: decay ``1 - (1 + step / inv_gamma) ** -power``, clipped to
``[min_value, max_value]`` and 0 for the first step; non-trainable tensors and batch norms are
copied, not averaged."""

from __future__ import annotations

import torch
from torch import nn


class EMAModel:
    def __init__(
        self,
        model: nn.Module,
        update_after_step: int = 0,
        inv_gamma: float = 1.0,
        power: float = 0.75,
        min_value: float = 0.0,
        max_value: float = 0.9999,
    ) -> None:
        self.averaged_model = model.eval().requires_grad_(False)
        self.update_after_step = update_after_step
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_value = min_value
        self.max_value = max_value
        self.optimization_step = 0
        self.decay = 0.0

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        value = 1 - (1 + step / self.inv_gamma) ** -self.power
        return max(self.min_value, min(value, self.max_value))

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        self.decay = self.get_decay(self.optimization_step)
        for module, ema_module in zip(model.modules(), self.averaged_model.modules(), strict=True):
            pairs = zip(
                module.parameters(recurse=False), ema_module.parameters(recurse=False), strict=True
            )
            for param, ema_param in pairs:
                if isinstance(module, nn.modules.batchnorm._BatchNorm) or not param.requires_grad:
                    ema_param.copy_(param.detach())
                else:
                    ema_param.mul_(self.decay).add_(param.detach(), alpha=1 - self.decay)
        self.optimization_step += 1
