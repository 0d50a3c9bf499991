"""DiffusionPolicy's ``MultiImageObsEncoder`` (``DiffusionUnetImagePolicy``'s obs encoder).

Upstream: ``diffusion_policy/model/vision/multi_image_obs_encoder.py`` with
``rgb_model = get_resnet('resnet18')`` (``diffusion_policy/model/vision/model_getter.py``: a
torchvision ResNet whose ``fc`` is ``Identity``, so each image gives 512 average-pooled features).
Per ``rgb`` key, in eval::

    resize (resize_shape) -> center crop (crop_shape; both random_crop modes center-crop in eval)
    -> ImageNet normalize (imagenet_norm) -> ResNet -> [N, 512]

then the ``low_dim`` keys as they are. Features are concatenated with the rgb keys **sorted** by
name first, then the low_dim keys sorted. ``share_rgb_model`` runs one ResNet (key ``rgb``) on
all cameras; upstream applies ``use_group_norm`` only to the per-key copies, so the shared
ResNet keeps its BatchNorm. State-dict keys as upstream::

    _dummy_variable                          ModuleAttrMixin's empty parameter
    key_model_map.<key>.conv1.weight, .bn1.*, .layer1.0.conv1.weight, ...   (or key_model_map.rgb)

``key_transform_map.<key>`` (Resize / CropRandomizer / CenterCrop / Normalize) holds no tensors,
so it has no keys; the transforms are plain functions here. Resize is torchvision's bilinear
tensor resize; ``antialias=False`` matches the torchvision (< 0.17) that DiffusionPolicy pins.

There are no golden fixtures for image policies: this module is checked against key sets derived
from the upstream source and against the semantics above, not against upstream outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policy_accel.policies.networks.resnet import center_crop, resize, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_FEATURES = 512


def _per_key(value, key: str, what: str) -> tuple[int, int] | None:
    """``resize_shape`` / ``crop_shape`` for one key: one ``(h, w)`` for all, or a dict by key."""
    if value is None:
        return None
    if isinstance(value, dict):
        if key not in value:
            raise ValueError(f"{what} is a dict without an entry for rgb key {key!r}.")
        value = value[key]
    if value is None:
        return None
    height, width = (int(s) for s in value)
    return height, width


class MultiImageObsEncoder(nn.Module):
    """``obs_meta`` maps each key to ``(shape, type)`` (``"rgb"``: ``(3, H, W)``; ``"low_dim"``:
    ``(D,)``). ``forward({key: [N, *shape]}) -> [N, output_dim]``; images already normalized by
    the policy's normalizer."""

    def __init__(
        self,
        obs_meta: dict[str, tuple[tuple[int, ...], str]],
        backbone: str = "resnet18",
        resize_shape=None,
        crop_shape=None,
        random_crop: bool = True,
        use_group_norm: bool = False,
        share_rgb_model: bool = False,
        imagenet_norm: bool = False,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        del random_crop  # both of upstream's crop modules center-crop in eval
        self._dummy_variable = nn.Parameter(torch.empty(0))
        self.share_rgb_model = share_rgb_model
        self.imagenet_norm = imagenet_norm
        self.antialias = antialias
        self.key_model_map = nn.ModuleDict()
        if share_rgb_model:  # upstream's group-norm swap only touches per-key copies
            self.key_model_map["rgb"] = resnet(backbone, 3, group_norm=False)
        self.resize_shapes: dict[str, tuple[int, int] | None] = {}
        self.crop_shapes: dict[str, tuple[int, int] | None] = {}
        rgb_keys, low_dim_keys = [], []
        for key, (shape, kind) in obs_meta.items():
            shape = tuple(int(s) for s in shape)
            if kind == "rgb":
                if len(shape) != 3 or shape[0] != 3:
                    raise ValueError(
                        f"shape_meta.obs.{key} is rgb with shape {shape}; the torchvision ResNet "
                        "expects (3, H, W)."
                    )
                rgb_keys.append(key)
                if not share_rgb_model:
                    self.key_model_map[key] = resnet(backbone, 3, use_group_norm)
                self.resize_shapes[key] = _per_key(resize_shape, key, "resize_shape")
                self.crop_shapes[key] = _per_key(crop_shape, key, "crop_shape")
                height, width = self.resize_shapes[key] or shape[1:]
                crop = self.crop_shapes[key]
                if crop is not None and (crop[0] > height or crop[1] > width):
                    raise ValueError(
                        f"crop_shape {crop} does not fit inside rgb key {key!r} of size "
                        f"{(height, width)} (after resize_shape); set a smaller crop_shape."
                    )
            elif kind == "low_dim":
                if len(shape) != 1:
                    raise ValueError(
                        f"shape_meta.obs.{key} is low_dim with shape {shape}; MultiImageObsEncoder "
                        "concatenates low_dim keys as they are, so they must be 1-D."
                    )
                low_dim_keys.append(key)
            else:
                raise ValueError(
                    f"shape_meta.obs.{key} has type {kind!r}; expected 'rgb' or 'low_dim'."
                )
        self.rgb_keys = sorted(rgb_keys)
        self.low_dim_keys = sorted(low_dim_keys)
        self.output_dim = RESNET_FEATURES * len(self.rgb_keys) + sum(
            int(obs_meta[key][0][0]) for key in self.low_dim_keys
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def transform(self, key: str, images: Tensor) -> Tensor:
        """``key_transform_map[key]`` in eval: resize, center crop, ImageNet normalization."""
        if self.resize_shapes[key] is not None:
            images = resize(images, *self.resize_shapes[key], antialias=self.antialias)
        if self.crop_shapes[key] is not None:
            images = center_crop(images, *self.crop_shapes[key])
        if self.imagenet_norm:
            images = (images - self.mean) / self.std
        return images

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        features = []
        if self.share_rgb_model and self.rgb_keys:
            images = torch.cat([self.transform(key, obs[key]) for key in self.rgb_keys], dim=0)
            feature = self.key_model_map["rgb"](images)  # [cameras * N, D]
            batch = obs[self.rgb_keys[0]].shape[0]
            feature = feature.reshape(-1, batch, feature.shape[-1]).moveaxis(0, 1)
            features.append(feature.reshape(batch, -1))
        else:
            for key in self.rgb_keys:
                features.append(self.key_model_map[key](self.transform(key, obs[key])))
        features.extend(obs[key] for key in self.low_dim_keys)
        return torch.cat(features, dim=-1)
