"""LeRobot's ``DiffusionRgbEncoder`` (``src/lerobot/policies/diffusion/modeling_diffusion.py``).

One camera's images ``[N, 3, H, W]`` (already normalized by the processor) to ``[N, 2K]``, eval::

    resize (resize_shape) -> center crop (crop_shape; top = round((H - h) / 2))
    -> ResNet trunk -> SpatialSoftmax (1x1 conv to K maps, softmax over H*W, @ pos_grid)
    -> flatten -> Linear(2K, 2K) -> ReLU

State-dict keys (the policy prefixes them with ``diffusion.rgb_encoder.`` or, with one encoder
per camera, ``diffusion.rgb_encoder.<index>.``)::

    backbone.{0,1,4..7}.*      torchvision children [:-2]; GroupNorm(C // 16) with use_group_norm
    pool.nets.{weight,bias}    1x1 conv 512 -> K
    pool.pos_grid              buffer (h*w, 2), x then y, numpy linspace/meshgrid
    out.{weight,bias}          Linear(2K, 2K)

Resize is torchvision's bilinear tensor resize with ``antialias=True`` (torchvision >= 0.17, as
LeRobot 0.5+ pins). Checked against the semantics in ``/work/shared/fixtures/lerobot/README.md``
("Image encoder (eval)"); there are no golden fixtures for image policies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policy_accel.policies.networks.resnet import (
    center_crop,
    resize,
    resnet_trunk,
    trunk_output_shape,
)


def _pair(value, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2:
        raise ValueError(f"{what} must be a pair (height, width). Got {value!r}.")
    return int(value[0]), int(value[1])


class SpatialSoftmax(nn.Module):
    """LeRobot's ``SpatialSoftmax``: keypoints ``softmax(nets(x) over H*W) @ pos_grid``,
    ``[B, K, 2]`` with ``(x, y)`` in ``[-1, 1]`` (x along the width)."""

    def __init__(self, input_shape: tuple[int, int, int], num_kp: int | None = 32) -> None:
        super().__init__()
        channels, self.height, self.width = (int(s) for s in input_shape)
        self.nets = nn.Conv2d(channels, num_kp, kernel_size=1) if num_kp is not None else None
        self.out_channels = num_kp if num_kp is not None else channels
        pos_x, pos_y = np.meshgrid(
            np.linspace(-1.0, 1.0, self.width), np.linspace(-1.0, 1.0, self.height)
        )
        pixels = self.height * self.width
        pos_x = torch.from_numpy(pos_x.reshape(pixels, 1)).float()
        pos_y = torch.from_numpy(pos_y.reshape(pixels, 1)).float()
        self.register_buffer("pos_grid", torch.cat([pos_x, pos_y], dim=1))

    def forward(self, features: Tensor) -> Tensor:
        if self.nets is not None:
            features = self.nets(features)
        attention = F.softmax(features.reshape(-1, self.height * self.width), dim=-1)
        return (attention @ self.pos_grid).view(-1, self.out_channels, 2)


class DiffusionRgbEncoder(nn.Module):
    """``image_shape`` ``(3, H, W)`` is the camera's input feature shape; the other arguments are
    the ``DiffusionConfig`` fields of the same names (``num_keypoints`` is
    ``spatial_softmax_num_keypoints``)."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        crop_shape: tuple[int, int] | None = None,
        resize_shape: tuple[int, int] | None = None,
        vision_backbone: str = "resnet18",
        use_group_norm: bool = True,
        num_keypoints: int = 32,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or image_shape[0] != 3:
            raise ValueError(
                f"image feature shape {image_shape} is not (3, H, W); LeRobot's torchvision "
                "backbone takes 3-channel images."
            )
        self.crop_shape = _pair(crop_shape, "crop_shape")
        self.resize_shape = _pair(resize_shape, "resize_shape")
        self.antialias = antialias
        size = self.resize_shape or image_shape[1:]
        if self.crop_shape is not None and (
            self.crop_shape[0] > size[0] or self.crop_shape[1] > size[1]
        ):
            raise ValueError(
                f"crop_shape {self.crop_shape} does not fit inside the {tuple(size)} images "
                "(after resize_shape); set a smaller crop_shape."
            )
        self.backbone = resnet_trunk(vision_backbone, 3, use_group_norm)
        height, width = self.crop_shape or size
        self.pool = SpatialSoftmax(trunk_output_shape(height, width), num_kp=num_keypoints)
        self.feature_dim = num_keypoints * 2
        self.out = nn.Linear(num_keypoints * 2, self.feature_dim)
        self.relu = nn.ReLU()

    @classmethod
    def from_lerobot_config(cls, config: dict, image_shape=None) -> DiffusionRgbEncoder:
        """Build from a LeRobot ``config.json`` dict. ``image_shape`` defaults to the first
        ``VISUAL`` input feature's shape (LeRobot requires all cameras to share it). Applies
        ``DiffusionConfig.__post_init__``'s ``crop_ratio`` rule where ``resize_shape`` is set."""
        if image_shape is None:
            visual = [
                feature["shape"]
                for feature in config.get("input_features", {}).values()
                if feature.get("type") == "VISUAL"
            ]
            if not visual:
                raise ValueError("config.input_features has no VISUAL feature; pass image_shape.")
            image_shape = visual[0]
        resize_shape = config.get("resize_shape")
        crop_shape = config.get("crop_shape")
        if resize_shape is not None:
            ratio = float(config.get("crop_ratio", 1.0))
            crop_shape = (
                (int(resize_shape[0] * ratio), int(resize_shape[1] * ratio))
                if ratio < 1.0
                else None
            )
        return cls(
            image_shape,
            crop_shape=crop_shape,
            resize_shape=resize_shape,
            vision_backbone=config.get("vision_backbone", "resnet18"),
            use_group_norm=bool(config.get("use_group_norm", True)),
            num_keypoints=int(config.get("spatial_softmax_num_keypoints", 32)),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.resize_shape is not None:
            x = resize(x, *self.resize_shape, antialias=self.antialias)
        if self.crop_shape is not None:
            x = center_crop(x, *self.crop_shape)
        x = torch.flatten(self.pool(self.backbone(x)), start_dim=1)
        return self.relu(self.out(x))
