"""Image encoders (ResNet trunk, robomimic, MultiImageObsEncoder, LeRobot) and DiffusionPolicyImage.

There are no golden fixtures for image policies (no outputs of the original code to compare
against): these tests pin the state-dict key sets derived from reading the upstream source
(torchvision resnet18, robomimic 0.2.0 ``VisualCore`` / ``ObservationEncoder``, DiffusionPolicy's
``MultiImageObsEncoder``, LeRobot's ``DiffusionRgbEncoder``), shapes and semantics that follow from
the code (spatial softmax, center crop, feature order), with random weights. No reference numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from policy_accel.policies.base import ObservationError
from policy_accel.policies.diffusion_policy import CheckpointContentError
from policy_accel.policies.diffusion_policy_image import DiffusionPolicyImage
from policy_accel.policies.networks import lerobot_rgb_encoder, robomimic_encoder
from policy_accel.policies.networks.lerobot_rgb_encoder import DiffusionRgbEncoder
from policy_accel.policies.networks.multi_image_encoder import MultiImageObsEncoder
from policy_accel.policies.networks.resnet import (
    center_crop,
    center_crop_offsets,
    resnet,
    resnet_trunk,
    trunk_output_shape,
)
from policy_accel.policies.networks.robomimic_encoder import RobomimicObsEncoder
from tests.policy_kinds import hybrid_cfg, image_cfg, random_state

# torchvision.models.resnet18().state_dict() parameter keys without fc, BatchNorm running stats
# left out (they are the keys after DiffusionPolicy's / LeRobot's GroupNorm swap).
TORCHVISION_RESNET18_GN = """
    conv1.weight bn1.weight bn1.bias
    layer1.0.conv1.weight layer1.0.bn1.weight layer1.0.bn1.bias
    layer1.0.conv2.weight layer1.0.bn2.weight layer1.0.bn2.bias
    layer1.1.conv1.weight layer1.1.bn1.weight layer1.1.bn1.bias
    layer1.1.conv2.weight layer1.1.bn2.weight layer1.1.bn2.bias
    layer2.0.conv1.weight layer2.0.bn1.weight layer2.0.bn1.bias
    layer2.0.conv2.weight layer2.0.bn2.weight layer2.0.bn2.bias
    layer2.0.downsample.0.weight layer2.0.downsample.1.weight layer2.0.downsample.1.bias
    layer2.1.conv1.weight layer2.1.bn1.weight layer2.1.bn1.bias
    layer2.1.conv2.weight layer2.1.bn2.weight layer2.1.bn2.bias
    layer3.0.conv1.weight layer3.0.bn1.weight layer3.0.bn1.bias
    layer3.0.conv2.weight layer3.0.bn2.weight layer3.0.bn2.bias
    layer3.0.downsample.0.weight layer3.0.downsample.1.weight layer3.0.downsample.1.bias
    layer3.1.conv1.weight layer3.1.bn1.weight layer3.1.bn1.bias
    layer3.1.conv2.weight layer3.1.bn2.weight layer3.1.bn2.bias
    layer4.0.conv1.weight layer4.0.bn1.weight layer4.0.bn1.bias
    layer4.0.conv2.weight layer4.0.bn2.weight layer4.0.bn2.bias
    layer4.0.downsample.0.weight layer4.0.downsample.1.weight layer4.0.downsample.1.bias
    layer4.1.conv1.weight layer4.1.bn1.weight layer4.1.bn1.bias
    layer4.1.conv2.weight layer4.1.bn2.weight layer4.1.bn2.bias
""".split()
# torchvision resnet18 without fc has 11,689,512 - (512 * 1000 + 1000) parameters
RESNET18_TRUNK_PARAMETERS = 11_176_512


def with_running_stats(keys: list[str]) -> set[str]:
    """The BatchNorm variant: every norm's ``weight`` gains its three buffers."""
    out = set(keys)
    for key in keys:
        is_norm = ".bn" in f".{key}" or ".downsample.1." in key
        if is_norm and key.endswith(".weight"):
            stem = key[: -len("weight")]
            out |= {stem + "running_mean", stem + "running_var", stem + "num_batches_tracked"}
    return out


def as_children(keys) -> set[str]:
    """``nn.Sequential(*list(resnet.children())[:-2])`` indices: conv1 0, bn1 1, layerN N+3."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {index[key.split(".", 1)[0]] + "." + key.split(".", 1)[1] for key in keys}


def prefixed(prefix: str, keys) -> set[str]:
    return {prefix + key for key in keys}


# --- ResNet trunk ----------------------------------------------------------------------------


def test_resnet18_trunk_has_torchvision_parameter_count():
    assert sum(p.numel() for p in resnet_trunk().parameters()) == RESNET18_TRUNK_PARAMETERS
    assert sum(p.numel() for p in resnet("resnet18").parameters()) == RESNET18_TRUNK_PARAMETERS


def test_resnet_keys_are_torchvision_keys():
    assert set(resnet(group_norm=True).state_dict()) == set(TORCHVISION_RESNET18_GN)
    assert set(resnet().state_dict()) == with_running_stats(TORCHVISION_RESNET18_GN)
    assert set(resnet_trunk(group_norm=True).state_dict()) == as_children(TORCHVISION_RESNET18_GN)
    model = resnet(group_norm=True)
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 4  # 64 // 16
    assert model.layer4[0].downsample[1].num_groups == 32  # 512 // 16
    with pytest.raises(ValueError, match="resnet50"):
        resnet("resnet50")


def test_trunk_feature_map_is_ceil_of_a_32nd():
    trunk = resnet_trunk(group_norm=True).eval()
    with torch.no_grad():
        out = trunk(torch.rand(1, 3, 76, 97))
    assert tuple(out.shape[1:]) == trunk_output_shape(76, 97) == (512, 3, 4)


def test_center_crop_follows_torchvision_rounding():
    assert center_crop_offsets(84, 84, 76, 76) == (4, 4)
    assert center_crop_offsets(85, 87, 84, 84) == (0, 2)  # round(0.5) = 0, round(1.5) = 2
    image = torch.arange(9 * 10, dtype=torch.float32).reshape(1, 1, 9, 10)
    crop = center_crop(image, 4, 5)
    top, left = center_crop_offsets(9, 10, 4, 5)
    assert (top, left) == (2, 2)  # round(2.5) = 2, round(2.5) = 2
    assert torch.equal(crop, image[..., 2:6, 2:7])
    with pytest.raises(ValueError, match="must fit"):
        center_crop(image, 10, 5)


@pytest.mark.parametrize("module", [robomimic_encoder, lerobot_rgb_encoder])
def test_spatial_softmax_puts_a_hot_spot_at_its_pixel(module):
    height, width, row, col = 5, 7, 1, 4
    pool = module.SpatialSoftmax((1, height, width), num_kp=1)
    with torch.no_grad():
        pool.nets.weight.fill_(1.0)
        pool.nets.bias.zero_()
        feature = torch.zeros(2, 1, height, width)
        feature[:, 0, row, col] = 60.0  # softmax mass ~1 on that pixel
        keypoints = pool(feature)
    expected = torch.tensor([-1 + 2 * col / (width - 1), -1 + 2 * row / (height - 1)])
    assert keypoints.shape == (2, 1, 2)
    torch.testing.assert_close(keypoints[0, 0], expected, atol=1e-6, rtol=0)


# --- robomimic encoder (DiffusionUnetHybridImagePolicy) -----------------------------------------

SPATIAL_SOFTMAX = ["nets.weight", "nets.bias", "temperature", "pos_x", "pos_y"]


def robomimic_keys(key: str) -> set[str]:
    """``obs_nets.<key>`` of robomimic's VisualCore (GroupNorm trunk): backbone and pool under
    their names and again as ``nets.0`` / ``nets.1``; ``nets.3`` the Linear (2 = Flatten)."""
    trunk = as_children(TORCHVISION_RESNET18_GN)
    base = f"obs_nets.{key}."
    return (
        prefixed(base + "backbone.nets.", trunk)
        | prefixed(base + "nets.0.nets.", trunk)
        | prefixed(base + "pool.", SPATIAL_SOFTMAX)
        | prefixed(base + "nets.1.", SPATIAL_SOFTMAX)
        | {base + "nets.3.weight", base + "nets.3.bias"}
    )


def test_robomimic_encoder_keys_shapes_and_order():
    meta = {"agent_pos": ((2,), "low_dim"), "image": ((3, 40, 40), "rgb")}
    encoder = RobomimicObsEncoder(meta, crop_shape=(32, 32), group_norm=True).eval()
    state = encoder.state_dict()
    assert set(state) == robomimic_keys("image")
    assert state["obs_nets.image.pool.pos_x"].shape == (1, 1)  # 32x32 crop -> 1x1 map
    assert state["obs_nets.image.nets.3.weight"].shape == (64, 64)
    assert encoder.output_dim == 2 + 64
    obs = {"agent_pos": torch.randn(3, 2), "image": torch.rand(3, 3, 40, 40)}
    with torch.no_grad():
        features = encoder(obs)
    assert features.shape == (3, 66)
    assert torch.equal(features[:, :2], obs["agent_pos"])  # shape_meta order, passed through
    assert (features[:, 2:] >= 0).all()  # the encoder's ReLU after VisualCore
    with pytest.raises(ValueError, match="crop < image"):
        RobomimicObsEncoder({"image": ((3, 32, 32), "rgb")}, crop_shape=(32, 32))


def test_robomimic_encoder_with_batchnorm_has_running_stats():
    encoder = RobomimicObsEncoder({"rgb": ((3, 24, 24), "rgb")}, crop_shape=None)
    assert "obs_nets.rgb.backbone.nets.1.running_mean" in encoder.state_dict()
    assert encoder.state_dict()["obs_nets.rgb.pool.pos_y"].shape == (1, 1)


# --- MultiImageObsEncoder (DiffusionUnetImagePolicy) --------------------------------------------


def test_multi_image_encoder_keys_and_feature_order():
    meta = {
        "wrist": ((3, 36, 36), "rgb"),
        "b_pos": ((3,), "low_dim"),
        "agent": ((3, 36, 36), "rgb"),
        "a_pos": ((2,), "low_dim"),
    }
    encoder = MultiImageObsEncoder(
        meta, crop_shape=(32, 32), use_group_norm=True, imagenet_norm=True
    ).eval()
    expected = {"_dummy_variable"} | prefixed("key_model_map.agent.", TORCHVISION_RESNET18_GN)
    expected |= prefixed("key_model_map.wrist.", TORCHVISION_RESNET18_GN)
    assert set(encoder.state_dict()) == expected
    assert encoder.rgb_keys == ["agent", "wrist"] and encoder.low_dim_keys == ["a_pos", "b_pos"]
    obs = {key: torch.rand(2, *shape) for key, (shape, _) in meta.items()}
    with torch.no_grad():
        features = encoder(obs)
        agent = encoder.key_model_map["agent"](encoder.transform("agent", obs["agent"]))
    assert features.shape == (2, 2 * 512 + 5) == (2, encoder.output_dim)
    torch.testing.assert_close(features[:, :512], agent)  # sorted rgb keys first
    assert torch.equal(features[:, -5:], torch.cat([obs["a_pos"], obs["b_pos"]], -1))


def test_multi_image_encoder_shared_model_keeps_batchnorm_like_upstream():
    meta = {"a": ((3, 32, 32), "rgb"), "b": ((3, 32, 32), "rgb")}
    encoder = MultiImageObsEncoder(meta, use_group_norm=True, share_rgb_model=True).eval()
    expected = {"_dummy_variable"} | prefixed(
        "key_model_map.rgb.", with_running_stats(TORCHVISION_RESNET18_GN)
    )
    assert set(encoder.state_dict()) == expected
    obs = {"a": torch.rand(2, 3, 32, 32), "b": torch.rand(2, 3, 32, 32)}
    with torch.no_grad():
        features = encoder(obs)
        b_alone = encoder.key_model_map["rgb"](obs["b"])
    torch.testing.assert_close(features[:, 512:], b_alone)


# --- LeRobot DiffusionRgbEncoder -----------------------------------------------------------------


def test_lerobot_rgb_encoder_keys_grid_and_shape():
    encoder = DiffusionRgbEncoder((3, 96, 96), crop_shape=(84, 84), use_group_norm=True).eval()
    state = encoder.state_dict()
    expected = prefixed("backbone.", as_children(TORCHVISION_RESNET18_GN))
    expected |= {"pool.nets.weight", "pool.nets.bias", "pool.pos_grid", "out.weight", "out.bias"}
    assert set(state) == expected
    grid = state["pool.pos_grid"]  # 84 -> 3x3 map, x varies fastest
    assert grid.shape == (9, 2)
    assert grid[:4].tolist() == [[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0], [-1.0, 0.0]]
    assert state["out.weight"].shape == (64, 64)
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 96, 96))
    assert features.shape == (2, 64) and (features >= 0).all()


def test_lerobot_rgb_encoder_from_config_applies_resize_and_crop_ratio():
    config = {
        "input_features": {
            "observation.state": {"type": "STATE", "shape": [2]},
            "observation.image": {"type": "VISUAL", "shape": [3, 50, 60]},
        },
        "resize_shape": [40, 40],
        "crop_ratio": 0.8,
        "crop_shape": [84, 84],  # recomputed from resize_shape * crop_ratio, as __post_init__ does
        "vision_backbone": "resnet18",
        "use_group_norm": True,
        "spatial_softmax_num_keypoints": 8,
    }
    encoder = DiffusionRgbEncoder.from_lerobot_config(config).eval()
    assert encoder.crop_shape == (32, 32) and encoder.resize_shape == (40, 40)
    with torch.no_grad():
        assert encoder(torch.rand(1, 3, 50, 60)).shape == (1, 16)


# --- DiffusionPolicyImage ----------------------------------------------------------------------


def observation(batch: int = 2, steps: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch, steps, 3, 40, 40), dtype=np.float32),
        "agent_pos": rng.uniform(0, 100, (batch, steps, 2)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def hybrid():
    cfg = hybrid_cfg()
    return DiffusionPolicyImage(cfg, random_state(cfg), "hybrid.ckpt")


def test_hybrid_policy_keys_are_upstream_keys(hybrid):
    encoder_keys = {key for key in hybrid.modules.state_dict() if key.startswith("obs_encoder.")}
    assert encoder_keys == prefixed("obs_encoder.", robomimic_keys("image"))
    assert hybrid.observation_spec == {"image": (3, 40, 40), "agent_pos": (2,)}
    assert hybrid.obs_feature_dim == 64 + 2


def test_hybrid_policy_predicts_actions(hybrid):
    generator = torch.Generator().manual_seed(0)
    out = hybrid.predict_action(observation(), num_inference_steps=3, generator=generator)
    assert out["action"].shape == (2, 4, 2) and out["action_pred"].shape == (2, 8, 2)
    assert torch.isfinite(out["action_pred"]).all()
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:5])  # from To - 1


def test_hybrid_global_cond_is_the_encoded_history(hybrid):
    obs = observation()
    image = torch.from_numpy(obs["image"][:, :2]).reshape(4, 3, 40, 40) * 2 - 1
    agent = torch.from_numpy(obs["agent_pos"][:, :2]).reshape(4, 2) * torch.tensor([0.01, 0.02])
    with torch.no_grad():
        expected = hybrid.modules.obs_encoder({"image": image, "agent_pos": agent})
    torch.testing.assert_close(hybrid.encode(obs), expected.reshape(2, 2, 66))


def test_inpainting_hybrid_writes_features_into_the_trajectory():
    cfg = hybrid_cfg(obs_as_global_cond=False)
    policy = DiffusionPolicyImage(cfg, random_state(cfg), "inpaint.ckpt")
    obs = observation()
    problem = policy.problem(obs, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    assert problem.x_T.shape == (2, 8, 2 + 66)
    assert problem.mask[:, :2, 2:].all() and not problem.mask[:, 2:].any()
    torch.testing.assert_close(problem.cond_data[:, :2, 2:], policy.encode(obs))
    out = policy.predict_action(obs, num_inference_steps=3, generator=torch.Generator())
    assert out["action"].shape == (2, 4, 2)


def test_multi_image_policy_predicts_actions():
    cfg = image_cfg()
    state = random_state(cfg)
    assert "obs_encoder._dummy_variable" in state
    policy = DiffusionPolicyImage(cfg, state, "image.ckpt")
    assert policy.obs_feature_dim == 512 + 2
    out = policy.predict_action(observation(), num_inference_steps=3, generator=torch.Generator())
    assert out["action"].shape == (2, 4, 2) and torch.isfinite(out["action"]).all()


def test_strict_loading_refuses_a_missing_key():
    cfg = hybrid_cfg()
    state = random_state(cfg)
    del state["obs_encoder.obs_nets.image.nets.3.bias"]
    with pytest.raises(CheckpointContentError, match=r"obs_nets\.image\.nets\.3\.bias"):
        DiffusionPolicyImage(cfg, state, "broken.ckpt")
    state = random_state(cfg)
    del state["normalizer.params_dict.agent_pos.scale"]
    with pytest.raises(CheckpointContentError, match="agent_pos"):
        DiffusionPolicyImage(cfg, state, "broken.ckpt")


def test_wrong_image_shape_is_refused_naming_the_key(hybrid):
    obs = observation()
    obs["image"] = obs["image"][..., :30, :30]
    with pytest.raises(ObservationError, match=r"obs\['image'\] has shape \(2, 3, 3, 30, 30\)"):
        hybrid.predict_action(obs, num_inference_steps=3)
    obs = observation()
    obs["image"] = (obs["image"] * 255).astype(np.uint8)
    with pytest.raises(ObservationError, match=r"obs\['image'\].*divide uint8 images by 255"):
        hybrid.predict_action(obs, num_inference_steps=3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_target_": "x.DiffusionTransformerHybridImagePolicy"}, "not an image policy"),
        ({"eta": 0.5}, r"\['eta'\]"),
        ({"crop_shape": [40, 40]}, "crop < image"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(CheckpointContentError, match=message):
        DiffusionPolicyImage(hybrid_cfg(**change), {}, "bad.ckpt")


def test_unsupported_rgb_model_is_refused():
    cfg = image_cfg()
    cfg["obs_encoder"]["rgb_model"] = {**cfg["obs_encoder"]["rgb_model"], "name": "resnet50"}
    with pytest.raises(CheckpointContentError, match="resnet50"):
        DiffusionPolicyImage(cfg, {}, "bad.ckpt")


@pytest.mark.parametrize("make_cfg", [hybrid_cfg, image_cfg])
def test_image_checkpoints_load_through_the_front_door_and_convert(tmp_path, make_cfg):
    """An upstream-layout .ckpt (OmegaConf cfg pickled by torch.save) of an image policy goes
    through the restricted unpickler, load_policy and convert."""
    from omegaconf import OmegaConf

    from policy_accel import load_policy
    from policy_accel.policies.loading import convert

    cfg = make_cfg()
    state = random_state(cfg)
    path = tmp_path / "image.ckpt"
    workspace = {"policy": cfg, "training": {"use_ema": False}}
    torch.save({"cfg": OmegaConf.create(workspace), "state_dicts": {"model": state}}, path)
    policy = load_policy(path)
    assert isinstance(policy, DiffusionPolicyImage)
    converted = load_policy(convert(path, tmp_path / "safe"))
    obs = observation()
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = policy.predict_action(obs, num_inference_steps=3, generator=generator())["action"]
    b = converted.predict_action(obs, num_inference_steps=3, generator=generator())["action"]
    assert torch.equal(a, b)
