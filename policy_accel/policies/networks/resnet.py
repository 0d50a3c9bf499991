"""torchvision's BasicBlock ResNets in plain torch, with torchvision's state-dict key names.

torchvision does not import next to the CPU torch this project installs, so the ResNet trunks that
DiffusionPolicy (robomimic's ``ResNet18Conv``, ``get_resnet``) and LeRobot (``DiffusionRgbEncoder``)
build from ``torchvision.models.resnet18`` are rebuilt here. The layout is torchvision's::

    conv1, bn1, (relu, maxpool: no weights), layer1..layer4, (avgpool: no weights), fc
    layerN.i.{conv1, bn1, conv2, bn2}            every BasicBlock
    layerN.0.downsample.{0, 1}                   1x1 conv + norm where the block changes shape

``group_norm=True`` puts ``GroupNorm(C // 16, C)`` under the same attribute names: exactly what
DiffusionPolicy's ``replace_submodules(BatchNorm2d -> GroupNorm(num_groups=C // 16))`` and LeRobot's
``use_group_norm`` produce (so the keys are ``bn1.weight`` / ``bn1.bias`` with no running stats).

The module also holds the image preprocessing all three encoders share: torchvision's center crop
(``top = round((H - h) / 2)``, Python's round) and bilinear resize.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
"""BasicBlock counts per stage of the torchvision ResNets rebuilt here."""
TRUNK_CHANNELS = 512
"""Channels of the last stage (layer4) of every BasicBlock ResNet."""


def norm_layer(channels: int, group_norm: bool) -> nn.Module:
    """``BatchNorm2d(C)`` or DiffusionPolicy's / LeRobot's replacement ``GroupNorm(C // 16, C)``."""
    if group_norm:
        return nn.GroupNorm(num_groups=channels // 16, num_channels=channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convs with a residual (``downsample`` when the shape
    changes); the stride sits on ``conv1``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, group_norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(channels, group_norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(channels, group_norm)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                norm_layer(channels, group_norm),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with ``fc`` replaced by ``Identity`` (DiffusionPolicy's ``get_resnet``):
    ``forward`` returns the average-pooled ``[B, 512]`` features of ``[B, C, H, W]`` images."""

    def __init__(
        self,
        layers: tuple[int, int, int, int] = RESNET_LAYERS["resnet18"],
        in_channels: int = 3,
        group_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64, group_norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, channels = [], 64
        for index, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(channels, width, stride, group_norm)]
            stage += [BasicBlock(width, width, 1, group_norm) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(name: str = "resnet18", in_channels: int = 3, group_norm: bool = False) -> ResNet:
    """A torchvision ResNet by name (``resnet18`` or ``resnet34``), ``fc`` = Identity."""
    if name not in RESNET_LAYERS:
        raise ValueError(
            f"vision backbone {name!r} is not supported; expected one of {sorted(RESNET_LAYERS)} "
            "(the BasicBlock ResNets; resnet50 and larger use Bottleneck blocks)."
        )
    return ResNet(RESNET_LAYERS[name], in_channels, group_norm)


def resnet_trunk(
    name: str = "resnet18", in_channels: int = 3, group_norm: bool = False
) -> nn.Sequential:
    """``nn.Sequential(*list(resnet.children())[:-2])``: the ResNet without avgpool and fc, as
    robomimic's ``ResNet18Conv.nets`` and LeRobot's ``backbone`` hold it. Keys are the child
    indices ``0`` (conv1), ``1`` (bn1) and ``4..7`` (layer1..layer4); 2 and 3 have no weights."""
    return nn.Sequential(*list(resnet(name, in_channels, group_norm).children())[:-2])


def trunk_output_shape(height: int, width: int) -> tuple[int, int, int]:
    """``(512, ceil(H / 32), ceil(W / 32))``: the trunk's feature map (each of its five stride-2
    layers maps a size ``n`` to ``ceil(n / 2)``)."""
    return TRUNK_CHANNELS, math.ceil(height / 32), math.ceil(width / 32)


# --- preprocessing shared by the image encoders ------------------------------------------------


def center_crop_offsets(height: int, width: int, crop_height: int, crop_width: int):
    """``(top, left)`` of torchvision's ``center_crop``: ``int(round((H - h) / 2))`` with Python's
    round (halves go to the even integer)."""
    return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))


def center_crop(images: Tensor, crop_height: int, crop_width: int) -> Tensor:
    """Center crop of ``[..., H, W]`` images (torchvision's rule; the crop must fit)."""
    height, width = images.shape[-2:]
    if crop_height > height or crop_width > width:
        raise ValueError(
            f"cannot crop {crop_height}x{crop_width} out of {height}x{width} images; the crop "
            "must fit inside the image (check crop_shape against the observation shape)."
        )
    top, left = center_crop_offsets(height, width, crop_height, crop_width)
    return images[..., top : top + crop_height, left : left + crop_width]


def resize(images: Tensor, height: int, width: int, antialias: bool) -> Tensor:
    """torchvision ``Resize((h, w))`` on float ``[N, C, H, W]`` tensors: bilinear,
    ``align_corners=False``; ``antialias`` as the torchvision version that trained the policy
    applied it (off by default for tensors before torchvision 0.17, on from 0.17)."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(
        images, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias
    )
