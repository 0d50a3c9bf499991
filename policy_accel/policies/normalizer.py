"""DiffusionPolicy's ``LinearNormalizer``: ``y = x * scale + offset`` per field.

State-dict layout as upstream: ``params_dict.<field>.{scale, offset}`` plus
``params_dict.<field>.input_stats.{min, max, mean, std}`` (the training data's statistics: at
inference only the observation range check reads them). Parameters are flat over the last
dimension of the field.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearNormalizer(nn.Module):
    """Per-field affine normalization; ``fields`` maps a name to its last-dimension size."""

    def __init__(self, fields: dict[str, int]) -> None:
        super().__init__()
        self.params_dict = nn.ModuleDict()
        for name, size in fields.items():
            field = nn.ParameterDict(
                {
                    "scale": nn.Parameter(torch.ones(size), requires_grad=False),
                    "offset": nn.Parameter(torch.zeros(size), requires_grad=False),
                    "input_stats": nn.ParameterDict(
                        {
                            stat: nn.Parameter(torch.zeros(size), requires_grad=False)
                            for stat in ("max", "mean", "min", "std")
                        }
                    ),
                }
            )
            self.params_dict[name] = field

    @staticmethod
    def fields_of(state_dict: dict[str, Tensor], prefix: str = "normalizer.") -> dict[str, int]:
        """Field sizes found in a policy state dict."""
        start, end = prefix + "params_dict.", ".scale"
        return {
            key[len(start) : -len(end)]: int(value.shape[0])
            for key, value in state_dict.items()
            if key.startswith(start)
            and key.endswith(end)
            and key.count(".") == start.count(".") + 1
        }

    def normalize(self, name: str, x: Tensor) -> Tensor:
        field = self.params_dict[name]
        return self._affine(x, lambda flat: flat * field["scale"] + field["offset"], field)

    def normalized_range(self, name: str) -> tuple[Tensor, Tensor] | None:
        """The training data's per-dimension ``(low, high)`` in normalized units, from the
        field's ``input_stats`` (None where they were never fitted: all zero)."""
        stats = self.params_dict[name]["input_stats"]
        low, high = stats["min"], stats["max"]
        if not (low.any() or high.any()):
            return None
        with torch.no_grad():
            low, high = self.normalize(name, low), self.normalize(name, high)
        return torch.minimum(low, high), torch.maximum(low, high)

    def unnormalize(self, name: str, x: Tensor) -> Tensor:
        field = self.params_dict[name]
        return self._affine(x, lambda flat: (flat - field["offset"]) / field["scale"], field)

    @staticmethod
    def _affine(x: Tensor, function, field) -> Tensor:
        shape = x.shape
        size = field["scale"].shape[0]
        return function(x.reshape(-1, size)).reshape(shape)
