"""The observation encoder of DiffusionPolicy's ``DiffusionUnetHybridImagePolicy``.

Upstream (``diffusion_policy/policy/diffusion_unet_hybrid_image_policy.py``) builds a robomimic
0.2.0 BC-RNN policy from ``get_robomimic_config(algo_name='bc_rnn', hdf5_type='image', ...)`` and
keeps ``policy.nets['policy'].nets['encoder'].nets['obs']``: robomimic's ``ObservationEncoder``
(``robomimic/models/obs_nets.py``) with, per ``rgb`` key, a ``VisualCore``
(``robomimic/models/base_nets.py``)::

    VisualCore(backbone=ResNet18Conv, pool=SpatialSoftmax(num_kp=32, temperature=1, fixed),
               flatten, Linear(64 -> feature_dimension=64))

and a ``CropRandomizer`` to ``crop_shape``; ``low_dim`` keys have no network. With
``obs_encoder_group_norm`` every BatchNorm2d became ``GroupNorm(C // 16, C)``. The forward pass,
per key in ``shape_meta['obs']`` order (robomimic keeps the order of ``obs_key_shapes``)::

    rgb:      crop -> VisualCore -> ReLU (the encoder's feature_activation) -> flatten
    low_dim:  flatten

and the features are concatenated. State-dict keys, as upstream writes them (``VisualCore``
registers its backbone and pool both by name and inside ``nets``, so every trunk tensor is
stored twice)::

    obs_nets.<key>.backbone.nets.{0,1,4..7}.*     ResNet18Conv (torchvision children [:-2])
    obs_nets.<key>.pool.nets.{weight,bias}        1x1 conv 512 -> 32 keypoints
    obs_nets.<key>.pool.{temperature,pos_x,pos_y} buffers: (1,), (1, h*w), (1, h*w)
    obs_nets.<key>.nets.0.* / nets.1.*            the same backbone and pool again
    obs_nets.<key>.nets.3.{weight,bias}           Linear(2 * 32, 64)

Eval-time crop: ``eval_fixed_crop=True`` (every shipped config) swaps in DiffusionPolicy's own
``CropRandomizer``, which center-crops in eval; robomimic 0.2.0's ``CropRandomizer`` takes a
*random* crop even in eval, so checkpoints with ``eval_fixed_crop=False`` are run here with the
center crop (a deterministic stand-in; upstream's eval output is random there).

There are no golden fixtures for image policies: this module is checked against key sets derived
from the upstream source and against the semantics above, not against upstream outputs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policy_accel.policies.networks.resnet import center_crop, resnet_trunk, trunk_output_shape

FEATURE_DIMENSION = 64
NUM_KEYPOINTS = 32


class ResNet18Conv(nn.Module):
    """robomimic's ``ResNet18Conv``: torchvision resnet18's children without avgpool and fc,
    under ``nets`` (``input_channel != 3`` rebuilds ``conv1`` for that many channels)."""

    def __init__(self, input_channel: int = 3, group_norm: bool = False) -> None:
        super().__init__()
        self.nets = resnet_trunk("resnet18", input_channel, group_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.nets(x)


class SpatialSoftmax(nn.Module):
    """robomimic's ``SpatialSoftmax`` (Finn et al., Deep Spatial Autoencoders): a 1x1 conv to
    ``num_kp`` maps, a softmax over the ``H*W`` pixels of each, and the expected ``(x, y)`` of
    that distribution on a grid spanning ``[-1, 1]`` (x along the width). Returns ``[B, K, 2]``."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_kp: int = NUM_KEYPOINTS, temperature=1.0
    ) -> None:
        super().__init__()
        channels, self.height, self.width = (int(s) for s in input_shape)
        self.num_kp = num_kp
        self.nets = nn.Conv2d(channels, num_kp, kernel_size=1)
        self.register_buffer("temperature", torch.ones(1) * temperature)
        pos_x, pos_y = np.meshgrid(
            np.linspace(-1.0, 1.0, self.width), np.linspace(-1.0, 1.0, self.height)
        )
        pixels = self.height * self.width
        self.register_buffer("pos_x", torch.from_numpy(pos_x.reshape(1, pixels)).float())
        self.register_buffer("pos_y", torch.from_numpy(pos_y.reshape(1, pixels)).float())

    def forward(self, feature: Tensor) -> Tensor:
        feature = self.nets(feature).reshape(-1, self.height * self.width)
        attention = F.softmax(feature / self.temperature, dim=-1)
        expected_x = torch.sum(self.pos_x * attention, dim=1, keepdim=True)
        expected_y = torch.sum(self.pos_y * attention, dim=1, keepdim=True)
        return torch.cat([expected_x, expected_y], 1).view(-1, self.num_kp, 2)


class VisualCore(nn.Module):
    """robomimic's ``VisualCore``: ResNet18Conv -> SpatialSoftmax -> Flatten -> Linear, held in
    ``nets`` and, for the first two, also as ``backbone`` and ``pool``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        feature_dimension: int = FEATURE_DIMENSION,
        num_kp: int = NUM_KEYPOINTS,
        group_norm: bool = False,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.backbone = ResNet18Conv(channels, group_norm)
        self.pool = SpatialSoftmax(trunk_output_shape(height, width), num_kp)
        self.nets = nn.Sequential(
            self.backbone, self.pool, nn.Flatten(1), nn.Linear(num_kp * 2, feature_dimension)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.nets(x)


class RobomimicObsEncoder(nn.Module):
    """robomimic's ``ObservationEncoder`` as ``DiffusionUnetHybridImagePolicy`` builds it.

    ``obs_meta`` maps each observation key, in ``shape_meta['obs']`` order, to its
    ``(shape, type)`` with type ``"rgb"`` (shape ``(C, H, W)``) or ``"low_dim"``. ``crop_shape``
    ``(h, w)`` or None; ``group_norm`` is the policy's ``obs_encoder_group_norm``.
    ``forward({key: [N, *shape]}) -> [N, output_dim]``; images are already normalized.
    """

    def __init__(
        self,
        obs_meta: dict[str, tuple[tuple[int, ...], str]],
        crop_shape: tuple[int, int] | None = (76, 76),
        group_norm: bool = False,
        feature_dimension: int = FEATURE_DIMENSION,
        num_kp: int = NUM_KEYPOINTS,
    ) -> None:
        super().__init__()
        self.obs_meta = {key: (tuple(shape), kind) for key, (shape, kind) in obs_meta.items()}
        self.crop_shape = None if crop_shape is None else tuple(int(s) for s in crop_shape)
        self.obs_nets = nn.ModuleDict()
        self.output_dim = 0
        for key, (shape, kind) in self.obs_meta.items():
            if kind == "rgb":
                self.obs_nets[key] = VisualCore(
                    self._cropped_shape(key, shape), feature_dimension, num_kp, group_norm
                )
                self.output_dim += feature_dimension
            elif kind == "low_dim":
                self.obs_nets[key] = None
                self.output_dim += int(np.prod(shape))
            else:
                raise ValueError(
                    f"shape_meta.obs.{key} has type {kind!r}; expected 'rgb' or 'low_dim'."
                )

    def _cropped_shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
        if len(shape) != 3:
            raise ValueError(f"shape_meta.obs.{key} is rgb with shape {shape}; expected (C, H, W).")
        if self.crop_shape is None:
            return shape
        crop_height, crop_width = self.crop_shape
        if not (crop_height < shape[1] and crop_width < shape[2]):
            raise ValueError(
                f"crop_shape {self.crop_shape} does not fit strictly inside shape_meta.obs.{key} "
                f"{shape} (robomimic's CropRandomizer requires crop < image); set crop_shape "
                "smaller or null."
            )
        return shape[0], crop_height, crop_width

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        features = []
        for key, (_, kind) in self.obs_meta.items():
            x = obs[key]
            if kind == "rgb":
                if self.crop_shape is not None:
                    x = center_crop(x, *self.crop_shape)
                x = F.relu(self.obs_nets[key](x))
            features.append(x.flatten(1))
        return torch.cat(features, dim=-1)
