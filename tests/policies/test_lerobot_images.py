"""LeRobot DiffusionPolicy checkpoints with cameras (``VISUAL`` input features).

There is no golden fixture with images, so the checkpoints here are built from the state-only
fixture: its config gets camera features, its ``model.safetensors`` random weights for the wider
UNet condition and for the rgb encoder(s), and its processor files image stats. The rgb-encoder
key names are written by hand from LeRobot's ``modeling_diffusion.py`` (``DiffusionModel``:
``self.rgb_encoder = DiffusionRgbEncoder(config)``, or ``nn.ModuleList`` of one per camera with
``use_separate_rgb_encoder_per_camera``; ``DiffusionRgbEncoder``: ``backbone``, ``pool`` (with
``nets`` and the ``pos_grid`` buffer), ``out``). The global condition is rebuilt by hand as
LeRobot's ``_prepare_global_conditioning`` builds it: per step ``cat([state, camera features in
config order, environment_state])``, flattened step-major.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from policy_accel.policies import ObservationError, load_policy
from policy_accel.policies.lerobot import (
    LeRobotCheckpointError,
    LeRobotDiffusionPolicy,
    load_lerobot,
)
from policy_accel.policies.lerobot_config import read_config
from policy_accel.policies.lerobot_networks import build_unet, to_lerobot_key
from policy_accel.policies.networks.lerobot_rgb_encoder import DiffusionRgbEncoder
from tests.shared_fixtures import FIXTURES as SHARED
from tests.shared_fixtures import require

FIXTURES = SHARED
CHECKPOINT = FIXTURES / "lerobot" / "diffusion_pusht_keypoints"
require(CHECKPOINT / "config.json")

STATE, ENV, IMAGE = "observation.state", "observation.environment_state", "observation.image"
TOP, WRIST = "observation.images.top", "observation.images.wrist"
IMAGE_SHAPE, CROP, KEYPOINTS = (3, 96, 96), (84, 84), 4  # 2K = 8 features per camera
B, T = 3, 2
EPS = 1e-8
PREFIX = "diffusion.rgb_encoder."


# --- building checkpoints -----------------------------------------------------------------------


def image_stats(seed: int) -> dict[str, torch.Tensor]:
    """A LeRobotDataset's per-channel image stats: (3, 1, 1) each, count (1,)."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.3 + 0.4 * torch.rand(3, 1, 1, generator=g)
    std = 0.1 + 0.2 * torch.rand(3, 1, 1, generator=g)
    low, high = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    stats = {"mean": mean, "std": std, "min": low, "max": high, "count": torch.tensor([100.0])}
    for q in ("q01", "q10", "q50", "q90", "q99"):
        stats[q] = torch.full((3, 1, 1), int(q[1:]) / 100)
    return stats


def encoder(use_group_norm: bool = True) -> DiffusionRgbEncoder:
    return DiffusionRgbEncoder(
        IMAGE_SHAPE, crop_shape=CROP, use_group_norm=use_group_norm, num_keypoints=KEYPOINTS
    )


def randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Running stats away from their init (0, 1), so that loading them is visible."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            shape = layer.running_mean.shape
            layer.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            layer.num_batches_tracked.fill_(30)


def make_checkpoint(
    target: Path,
    cameras: tuple[str, ...] = (IMAGE,),
    *,
    separate: bool = True,
    env: bool = True,
    use_group_norm: bool = True,
    pretrained: str | None = None,
    edit_config=None,
    weights: bool = True,
) -> Path:
    """The fixture with ``cameras`` appended to ``input_features`` (after the environment state,
    so the condition order cannot come from the dict order), random weights and image stats."""
    shutil.copytree(
        CHECKPOINT,
        target,
        ignore=shutil.ignore_patterns("cases.npz", "meta.json", "train_config.json"),
        copy_function=shutil.copyfile,  # the fixture files are read-only
    )
    config = json.loads((target / "config.json").read_text())
    features = config["input_features"]
    if not env:
        del features[ENV]
    for camera in cameras:
        features[camera] = {"type": "VISUAL", "shape": list(IMAGE_SHAPE)}
    config.update(
        crop_shape=list(CROP),
        crop_is_random=True,
        resize_shape=None,
        spatial_softmax_num_keypoints=KEYPOINTS,
        use_group_norm=use_group_norm,
        pretrained_backbone_weights=pretrained,
        use_separate_rgb_encoder_per_camera=separate,
        vision_backbone="resnet18",
    )
    if edit_config is not None:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config, indent=4))
    if not weights:
        return target

    generator = torch.Generator().manual_seed(len(cameras) + 2 * separate + 4 * env)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        unet = build_unet(read_config(target / "config.json"))
        tensors = {to_lerobot_key(key): value for key, value in unet.state_dict().items()}
        # LeRobot: nn.ModuleList -> "diffusion.rgb_encoder.<i>.", one -> "diffusion.rgb_encoder."
        prefixes = [f"{PREFIX}{i}." for i in range(len(cameras))] if separate else [PREFIX]
        for prefix in prefixes:
            module = encoder(use_group_norm)
            randomize_batchnorm(module, generator)
            tensors.update({prefix + key: value for key, value in module.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, target / "model.safetensors")

    stats = {camera: image_stats(seed) for seed, camera in enumerate(cameras)}
    for pipeline in ("policy_preprocessor.json", "policy_postprocessor.json"):
        content = json.loads((target / pipeline).read_text())
        step = next(step for step in content["steps"] if "state_file" in step)
        if pipeline == "policy_preprocessor.json":  # the normalizer lists every input feature
            for camera in cameras:
                step["config"]["features"][camera] = features[camera]
            if not env:
                del step["config"]["features"][ENV]
            (target / pipeline).write_text(json.dumps(content, indent=2))
        path = target / step["state_file"]
        flat = load_file(path)
        for camera in cameras:  # both files hold the stats of every feature
            flat.update({f"{camera}.{name}": value for name, value in stats[camera].items()})
        save_file(flat, path)
    return target


def to_legacy(source: Path, target: Path) -> Path:
    """``source`` rewritten as LeRobot <= 0.3 saved it: stats as buffers in model.safetensors."""
    target.mkdir()
    shutil.copyfile(source / "config.json", target / "config.json")
    config = json.loads((target / "config.json").read_text())
    state_file = next(
        step["state_file"]
        for step in json.loads((source / "policy_preprocessor.json").read_text())["steps"]
        if "state_file" in step
    )
    stats = load_file(source / state_file)
    tensors = load_file(source / "model.safetensors")
    mapping = config["normalization_mapping"]
    features = {**config["input_features"], **config["output_features"]}
    modules = [("normalize_inputs", key) for key in config["input_features"]]
    modules += [("normalize_targets", "action"), ("unnormalize_outputs", "action")]
    for module, key in modules:
        names = {"MIN_MAX": ("min", "max"), "MEAN_STD": ("mean", "std")}[
            mapping[features[key]["type"]]
        ]
        for stat in names:
            tensors[f"{module}.buffer_{key.replace('.', '_')}.{stat}"] = stats[
                f"{key}.{stat}"
            ].clone()
    save_file(tensors, target / "model.safetensors")
    return target


def rgb_weights(directory: Path, prefix: str, use_group_norm: bool = True) -> nn.Module:
    """Our encoder loaded directly with the tensors under ``prefix`` (independent of the loader)."""
    tensors = load_file(directory / "model.safetensors")
    module = encoder(use_group_norm)
    module.load_state_dict(
        {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True
    )
    return module.eval()


def observation(cameras=(IMAGE,), env=True, seed=0) -> dict[str, torch.Tensor]:
    """Raw observations (B, T, ...): state/env from the processor stats' range, images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    stats = load_file(CHECKPOINT / "policy_preprocessor_step_3_normalizer_processor.safetensors")
    keys = [STATE, ENV] if env else [STATE]
    obs = {}
    for key in keys:
        low, high = stats[f"{key}.min"], stats[f"{key}.max"]
        obs[key] = low + (high - low) * torch.rand(B, T, low.numel(), generator=g)
    for camera in cameras:
        obs[camera] = torch.rand(B, T, *IMAGE_SHAPE, generator=g)
    return obs


def hand_built_cond(directory: Path, obs, cameras, encoders, env=True) -> torch.Tensor:
    """LeRobot's ``_prepare_global_conditioning`` on processor-normalized inputs."""
    stats = load_file(directory / "policy_preprocessor_step_3_normalizer_processor.safetensors")

    def min_max(key):
        low, high = stats[f"{key}.min"], stats[f"{key}.max"]
        denom = torch.where(high == low, torch.tensor(EPS), high - low)
        return 2 * (obs[key] - low) / denom - 1

    parts = [min_max(STATE)]
    with torch.no_grad():
        for camera, module in zip(cameras, encoders, strict=True):
            images = (obs[camera] - stats[f"{camera}.mean"]) / (stats[f"{camera}.std"] + EPS)
            parts.append(module(images.flatten(0, 1)).unflatten(0, (B, T)))
    if env:
        parts.append(min_max(ENV))
    return torch.cat(parts, dim=-1).flatten(1)


@pytest.fixture(scope="module")
def one_camera(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("one") / "checkpoint")


@pytest.fixture(scope="module")
def policy(one_camera) -> LeRobotDiffusionPolicy:
    return load_policy(one_camera)


# --- loading and sampling -------------------------------------------------------------------------


def test_loads_through_load_policy_and_predicts(one_camera, policy):
    assert isinstance(policy, LeRobotDiffusionPolicy)
    assert policy.observation_spec == {STATE: (2,), ENV: (16,), IMAGE: IMAGE_SHAPE}
    settings = read_config(one_camera / "config.json")
    assert settings.cond_dim_per_step == 2 + 2 * KEYPOINTS + 16
    assert settings.rgb_encoder.crop_shape == CROP
    out = policy.predict_action(
        observation(), num_inference_steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert out["action"].shape == (B, policy.n_action_steps, 2)
    assert out["action_pred"].shape == (B, policy.horizon, 2)
    assert torch.isfinite(out["action_pred"]).all()
    assert len(out["result"].trajectory) == 3 + 1


def test_global_cond_is_state_image_features_env_step_major(one_camera, policy):
    obs = observation()
    cond = policy.global_cond(obs)
    assert cond.shape == (B, T * (2 + 2 * KEYPOINTS + 16))
    expected = hand_built_cond(one_camera, obs, [IMAGE], [rgb_weights(one_camera, PREFIX + "0.")])
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-5)
    # the images were normalized with the (3, 1, 1) MEAN_STD stats and nothing else
    stats = load_file(one_camera / "policy_preprocessor_step_3_normalizer_processor.safetensors")
    normalized = policy.normalize_observation(obs)[IMAGE]
    manual = (obs[IMAGE] - stats[f"{IMAGE}.mean"]) / (stats[f"{IMAGE}.std"] + EPS)
    torch.testing.assert_close(normalized, manual, rtol=0, atol=1e-6)


def test_history_longer_than_n_obs_steps_uses_the_last_steps(policy):
    obs = observation()
    longer = {
        key: torch.cat([torch.zeros_like(value[:, :1]), value], 1) for key, value in obs.items()
    }
    torch.testing.assert_close(policy.global_cond(longer), policy.global_cond(obs))


@pytest.mark.parametrize(
    "separate, use_group_norm, pretrained",
    [(False, True, None), (True, False, "ResNet18_Weights.IMAGENET1K_V1")],
    ids=["shared-groupnorm", "separate-batchnorm-pretrained"],
)
def test_two_cameras_shared_or_separate(
    tmp_path, monkeypatch, separate, use_group_norm, pretrained
):
    cameras = (TOP, WRIST)
    target = make_checkpoint(
        tmp_path / "checkpoint",
        cameras,
        separate=separate,
        use_group_norm=use_group_norm,
        pretrained=pretrained,
    )
    keys = set(load_file(target / "model.safetensors"))
    if separate:
        prefixes = ["diffusion.rgb_encoder.0.", "diffusion.rgb_encoder.1."]
        assert "diffusion.rgb_encoder.1.backbone.1.running_var" in keys
        assert "diffusion.rgb_encoder.0.backbone.4.0.bn1.num_batches_tracked" in keys
    else:
        prefixes = [PREFIX, PREFIX]
        assert not any(key.startswith(("diffusion.rgb_encoder.0.", PREFIX + "1.")) for key in keys)
    for prefix in set(prefixes):
        for name in ("backbone.0.weight", "backbone.7.1.conv2.weight", "pool.nets.weight"):
            assert prefix + name in keys
        assert prefix + "pool.pos_grid" in keys and prefix + "out.bias" in keys

    def no_network(*args, **kwargs):
        raise AssertionError("loading a LeRobot checkpoint must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    policy = load_lerobot(target)
    assert isinstance(policy.rgb_encoder, nn.ModuleList) == separate
    assert list(policy.image_shapes) == [TOP, WRIST]
    obs = observation(cameras)
    encoders = [rgb_weights(target, prefix, use_group_norm) for prefix in prefixes]
    expected = hand_built_cond(target, obs, cameras, encoders)
    cond = policy.global_cond(obs)
    assert cond.shape == (B, T * (2 + 2 * 2 * KEYPOINTS + 16))
    torch.testing.assert_close(cond, expected, rtol=0, atol=1e-5)
    swapped = {**obs, TOP: obs[WRIST], WRIST: obs[TOP]}
    assert not torch.allclose(policy.global_cond(swapped), cond)
    out = policy.predict_action(
        obs, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert out["action"].shape == (B, policy.n_action_steps, 2)


def test_images_without_environment_state(tmp_path):
    target = make_checkpoint(tmp_path / "checkpoint", env=False)
    policy = load_lerobot(target)
    assert set(policy.observation_spec) == {STATE, IMAGE}
    obs = observation(env=False)
    expected = hand_built_cond(
        target, obs, [IMAGE], [rgb_weights(target, PREFIX + "0.")], env=False
    )
    torch.testing.assert_close(policy.global_cond(obs), expected, rtol=0, atol=1e-5)
    assert policy.predict_action(obs, num_inference_steps=2)["action"].shape == (B, 8, 2)


# --- legacy layout ------------------------------------------------------------------------------


def test_legacy_layout_with_image_buffers(one_camera, policy, tmp_path):
    legacy_dir = to_legacy(one_camera, tmp_path / "legacy")
    buffers = load_file(legacy_dir / "model.safetensors")
    assert buffers["normalize_inputs.buffer_observation_image.mean"].shape == (3, 1, 1)
    legacy = load_lerobot(legacy_dir)
    image_norm = legacy.input_normalization[IMAGE]
    assert image_norm.legacy and image_norm.mode == "MEAN_STD"
    assert image_norm.stats["std"].shape == (3, 1, 1)
    obs = observation(seed=3)
    torch.testing.assert_close(
        legacy.normalize_observation(obs)[IMAGE], policy.normalize_observation(obs)[IMAGE]
    )
    # MIN_MAX eps placement differs by ~1 ulp between the layouts; the networks are the same
    torch.testing.assert_close(legacy.global_cond(obs), policy.global_cond(obs), rtol=0, atol=1e-5)


# --- bad checkpoints ------------------------------------------------------------------------------


def drop(key):
    return lambda tensors: tensors.pop(key)


@pytest.mark.parametrize(
    "edit, named",
    [
        (drop("diffusion.rgb_encoder.0.backbone.4.0.conv1.weight"), "missing keys"),
        (drop("diffusion.rgb_encoder.0.pool.pos_grid"), "missing keys"),
        (
            lambda t: t.update({"diffusion.rgb_encoder.1.out.weight": torch.zeros(8, 8)}),
            "unexpected keys",
        ),
        (
            lambda t: t.update({"diffusion.rgb_encoder.0.out.weight": torch.zeros(9, 8)}),
            "(9, 8)",
        ),
        (
            lambda t: t.update({"diffusion.rgb_encoder.backbone.0.weight": torch.zeros(1)}),
            "unexpected keys",  # a shared-encoder key in a separate-encoder checkpoint
        ),
    ],
    ids=["missing-weight", "missing-pos-grid", "extra-camera", "wrong-shape", "shared-key"],
)
def test_bad_rgb_encoder_weights_are_named(one_camera, tmp_path, edit, named):
    target = tmp_path / "checkpoint"
    shutil.copytree(one_camera, target)
    tensors = load_file(target / "model.safetensors")
    before = set(tensors)
    edit(tensors)
    save_file(tensors, target / "model.safetensors")
    key = next(iter(before ^ set(tensors)), None) or "diffusion.rgb_encoder.0.out.weight"
    with pytest.raises(LeRobotCheckpointError, match="model.safetensors") as error:
        load_lerobot(target)
    assert key in str(error.value) and named in str(error.value)


def test_checkpoint_without_rgb_weights_names_the_whole_encoder(one_camera, tmp_path):
    target = tmp_path / "checkpoint"
    shutil.copytree(one_camera, target)
    tensors = load_file(target / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}, target / "model.safetensors"
    )
    with pytest.raises(
        LeRobotCheckpointError, match=r"diffusion\.rgb_encoder\.0\.\* \(all \d+ keys\)"
    ):
        load_lerobot(target)


def test_shared_encoder_config_refuses_separate_weights(one_camera, tmp_path):
    target = tmp_path / "checkpoint"
    shutil.copytree(one_camera, target)
    config = json.loads((target / "config.json").read_text())
    config["use_separate_rgb_encoder_per_camera"] = False
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(LeRobotCheckpointError) as error:
        load_lerobot(target)
    message = str(error.value)
    assert "diffusion.rgb_encoder.* (all" in message and "in all)" in message
    assert "diffusion.rgb_encoder.0.backbone.0.weight" in message
    assert "use_separate_rgb_encoder_per_camera" in message


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["input_features"].update(
                {
                    TOP: {"type": "VISUAL", "shape": [3, 96, 96]},
                    WRIST: {"type": "VISUAL", "shape": [3, 64, 64]},
                }
            ),
            "same shape",
        ),
        (lambda c: c.update(crop_shape=[100, 84]), r"`crop_shape` \[100, 84\] does not fit"),
        (
            lambda c: c.update(pretrained_backbone_weights="ResNet18_Weights.IMAGENET1K_V1"),
            "use_group_norm",
        ),
        (lambda c: c.update(vision_backbone="resnet50"), "`vision_backbone` must be one of"),
        (
            lambda c: c["input_features"][IMAGE].update(shape=[96, 96, 3]),
            r"must have a shape \[3, H, W\]",
        ),
    ],
    ids=["shapes-differ", "crop-too-large", "groupnorm-pretrained", "resnet50", "channels-last"],
)
def test_bad_image_configs_are_refused(tmp_path, edit, message):
    target = make_checkpoint(tmp_path / "checkpoint", edit_config=edit, weights=False)
    with pytest.raises(LeRobotCheckpointError, match=message) as error:
        read_config(target / "config.json")
    assert "config.json" in str(error.value)


def test_resize_and_crop_ratio_follow_post_init(tmp_path):
    def resize(config):
        config.update(resize_shape=[64, 64], crop_ratio=0.75, crop_shape=[84, 84])

    target = make_checkpoint(tmp_path / "checkpoint", edit_config=resize, weights=False)
    encoder_settings = read_config(target / "config.json").rgb_encoder
    assert encoder_settings.resize_shape == (64, 64) and encoder_settings.crop_shape == (48, 48)


# --- bad observations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda obs: obs.update({IMAGE: obs[IMAGE][..., :84, :84]}),
            r"has shape \(3, 2, 3, 84, 84\)",
        ),
        (lambda obs: obs.update({IMAGE: obs[IMAGE].permute(0, 1, 3, 4, 2)}), "channels-last"),
        (lambda obs: obs.update({IMAGE: obs[IMAGE][:, :, 0]}), r"has shape \(3, 2, 96, 96\)"),
        (lambda obs: obs.update({IMAGE: (obs[IMAGE] * 255).to(torch.uint8)}), r"\[0, 1\]"),
        (lambda obs: obs.update({IMAGE: (obs[IMAGE] * 255).to(torch.uint8).numpy()}), r"\[0, 1\]"),
        (lambda obs: obs.pop(IMAGE), "missing 'observation.image'"),
        (lambda obs: obs.update({IMAGE: obs[IMAGE][:2]}), "disagree on the batch size"),
    ],
    ids=["wrong-size", "channels-last", "no-channels", "uint8", "uint8-numpy", "missing", "batch"],
)
def test_bad_image_observations_are_refused_naming_the_key(policy, edit, message):
    obs = observation()
    edit(obs)
    with pytest.raises(ObservationError, match=message) as error:
        policy.global_cond(obs)
    assert IMAGE in str(error.value)
    if "[0, 1]" in message:
        assert "uint8" in str(error.value) and "255" in str(error.value)


def test_float64_numpy_images_are_accepted(policy):
    obs = observation()
    as_numpy = {**obs, IMAGE: obs[IMAGE].double().numpy()}
    assert np.issubdtype(as_numpy[IMAGE].dtype, np.floating)
    torch.testing.assert_close(policy.global_cond(as_numpy), policy.global_cond(obs))
