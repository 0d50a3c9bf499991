"""LeRobot DiffusionPolicy checkpoints reproduce LeRobot 0.6.1's own outputs (golden fixtures).

The fixture directory is described in its README: ``cases.npz`` holds raw UNet calls, three
replayed sampling runs with their recorded noise and an online ``select_action`` episode.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from policy_accel import load_policy
from policy_accel.policies import ObservationError
from policy_accel.policies.lerobot import LeRobotCheckpointError, load_lerobot
from policy_accel.policies.lerobot_config import read_config
from policy_accel.policies.lerobot_networks import build_unet, to_lerobot_key, to_our_key
from policy_accel.policies.lerobot_normalization import FeatureNormalization
from policy_accel.sampling import SOLVERS
from policy_accel.sampling.problem import noise_from_draws
from tests.shared_fixtures import FIXTURES as SHARED
from tests.shared_fixtures import require

# the shared fixtures sit beside the checkout (../shared); POLICY_ACCEL_FIXTURES overrides
FIXTURES = SHARED
CHECKPOINT = FIXTURES / "lerobot" / "diffusion_pusht_keypoints"
require(CHECKPOINT / "cases.npz")

STATE, ENV = "observation.state", "observation.environment_state"
# DESIGN's bound for golden fixtures: 1e-4 in normalized units. The UNet's float32 rounding
# differs between CPUs (~6e-7 on an Intel Xeon, where these fixtures reproduce to 6e-7); actions
# in environment units are compared after normalizing them, clean-sample predictions in the units
# of the step's noise (see x0_bound).
NORMALIZED_ATOL = 1e-4
PARALLEL = [name for name in SOLVERS if name != "sequential"]


@pytest.fixture(scope="module")
def cases():
    with np.load(CHECKPOINT / "cases.npz") as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


@pytest.fixture(scope="module")
def policy():
    return load_lerobot(CHECKPOINT)


def observation(cases, prefix="obs__", rows=slice(None)):
    return {key: cases[f"{prefix}{key}"][rows] for key in (STATE, ENV)}


def max_error(a, b):
    return float((a - b).abs().max())


def action_error(policy, actions, reference):
    """The largest difference of two action arrays in environment units, measured in the model's
    normalized units (PushT's 1e-4 normalized is ~0.03 px)."""
    return max_error(policy.normalize_action(actions), policy.normalize_action(reference))


def x0_bound(policy, timesteps):
    """Per-step bound ``[N, 1, 1, 1]`` on the clean-sample prediction
    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``: rounding in ``x_t`` and ``eps`` is amplified
    by ``1 / sqrt(a_t)`` (~2000 at this checkpoint's noisiest DDPM-100 step), so NORMALIZED_ATOL
    applies to ``sqrt(a_t) * x0``; at the clean end the bound is NORMALIZED_ATOL itself. (An AMD
    EPYC was 1.47e-5 off against the old flat 1e-5; an Intel Xeon is within 0.6% of this bound.)"""
    alpha_bar = policy.scheduler.alphas_cumprod[timesteps].to(torch.float32)
    return (NORMALIZED_ATOL / alpha_bar.sqrt()).reshape(-1, 1, 1, 1)


def replay(policy, obs, noise_init, noise_steps, method="sequential", steps=None, **options):
    """Sample with LeRobot's recorded initial noise and per-step noise draws."""
    rule = policy.problem(obs, x_T=noise_init, num_inference_steps=steps).rule
    noise = noise_from_draws(rule, noise_steps)
    return policy.predict_action(
        obs, method, x_T=noise_init, noise=noise, num_inference_steps=steps, **options
    )


def normalizer_state_file(directory=CHECKPOINT):
    """The stats file the preprocessor's normalizer step names (never hard-coded)."""
    pipeline = json.loads((directory / "policy_preprocessor.json").read_text())
    return next(s["state_file"] for s in pipeline["steps"] if "state_file" in s)


def copy_checkpoint(tmp_path, edit_config=None):
    target = tmp_path / "checkpoint"
    shutil.copytree(CHECKPOINT, target)
    if edit_config is not None:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


# --- network and conditioning ----------------------------------------------------------------


def test_key_map_covers_lerobot_state_dict_exactly():
    meta = json.loads((CHECKPOINT / "meta.json").read_text())
    ours = build_unet(read_config(CHECKPOINT / "config.json")).state_dict()
    renamed = {
        to_our_key(k.removeprefix("diffusion.unet.")): s for k, s in meta["state_dict"].items()
    }
    assert renamed == {key: list(value.shape) for key, value in ours.items()}
    assert sorted(to_lerobot_key(key) for key in ours) == sorted(meta["state_dict"])
    assert sum(value.numel() for value in ours.values()) == meta["n_params"]


def test_normalized_observation_and_global_cond(policy, cases):
    obs = observation(cases)
    normalized = policy.normalize_observation(obs)
    for key in (STATE, ENV):
        assert max_error(normalized[key], cases[f"nobs__{key}"]) <= 1e-6
    assert max_error(policy.global_cond(obs), cases["global_cond"]) <= 1e-6


def test_raw_unet_calls(policy, cases):
    for x, t, cond, expected in zip(
        cases["unet__x"],
        cases["unet__t"],
        cases["unet__global_cond"],
        cases["unet__out"],
        strict=True,
    ):
        assert t.dtype == torch.int64 and len(set(t.tolist())) == len(t)
        with torch.no_grad():
            assert max_error(policy.unet(x, t, global_cond=cond), expected) <= NORMALIZED_ATOL


# --- sampling runs ---------------------------------------------------------------------------


def ddim_checkpoint(tmp_path):
    def to_ddim(config):
        config.update(noise_scheduler_type="DDIM", num_inference_steps=10)

    return copy_checkpoint(tmp_path, to_ddim)


@pytest.mark.parametrize("run", ["ddpm100", "ddpm10", "ddim10"])
def test_replayed_run_matches_lerobot(policy, cases, run, tmp_path):
    if run == "ddim10":  # a checkpoint whose config says DDIM, 10 steps
        policy = load_lerobot(ddim_checkpoint(tmp_path))
        assert type(policy.scheduler).__name__ == "DDIMScheduler"
    steps = int(cases[f"{run}__num_inference_steps"])
    steps = None if steps == policy.num_inference_steps else steps  # else the checkpoint default
    obs = observation(cases)
    out = replay(
        policy, obs, cases[f"{run}__noise_init"], cases[f"{run}__noise_steps"], steps=steps
    )
    result = out["result"]
    start = policy.n_obs_steps - 1
    timesteps = policy.problem(obs, num_inference_steps=steps).timesteps
    assert torch.equal(timesteps, cases[f"{run}__timesteps"])
    assert torch.equal(cases[f"{run}__t_model"][:, 0], cases[f"{run}__timesteps"])
    trace = {
        "x_t": result.trajectory[:-1],
        "prev_sample": result.trajectory[1:],
        "action_pred_norm": result.sample,
        "action_norm": result.sample[:, start : start + policy.n_action_steps],
    }
    for key, value in trace.items():
        assert max_error(value, cases[f"{run}__{key}"]) <= NORMALIZED_ATOL, key
    x0_error = (result.x0_predictions - cases[f"{run}__pred_original_sample"]).abs()
    assert bool((x0_error <= x0_bound(policy, timesteps)).all()), "pred_original_sample"
    for key in ("action", "action_pred"):
        assert action_error(policy, out[key], cases[f"{run}__{key}"]) <= NORMALIZED_ATOL, key


def test_seeded_global_generator_draws_lerobots_noise(policy, cases):
    with torch.random.fork_rng():
        torch.manual_seed(int(cases["ddpm10__seed"]))
        out = policy.predict_action(observation(cases), num_inference_steps=10)
    assert max_error(out["result"].trajectory[0], cases["ddpm10__noise_init"]) == 0.0
    assert max_error(out["result"].sample, cases["ddpm10__action_pred_norm"]) <= NORMALIZED_ATOL


def test_online_episode_replays_select_action(policy, cases):
    """LeRobot's queues: the history starts as copies of the first frame; replan when empty."""
    frames = observation(cases, "episode__obs__")
    history = {key: deque(maxlen=policy.n_obs_steps) for key in frames}
    actions, actions_norm, replans = deque(), [], []
    popped = []
    for step in range(frames[STATE].shape[0]):
        for key, queue in history.items():
            queue.extend([frames[key][step]] * (policy.n_obs_steps if not queue else 1))
        if not actions:
            obs = {key: torch.stack(list(queue), dim=1) for key, queue in history.items()}
            plan = len(replans)
            for key, value in policy.normalize_observation(obs).items():
                window = cases[f"episode__window__{key}"][plan]
                assert max_error(value, window) <= 1e-6
            out = replay(
                policy, obs, cases["episode__noise_init"][plan], cases["episode__noise_steps"][plan]
            )
            start = policy.n_obs_steps - 1
            chunk_norm = out["result"].sample[:, start : start + policy.n_action_steps]
            actions.extend(zip(out["action"].unbind(1), chunk_norm.unbind(1), strict=True))
            replans.append(step)
        action, action_norm = actions.popleft()
        popped.append(action)
        actions_norm.append(action_norm)
    assert replans == cases["episode__replan_steps"].tolist()
    assert max_error(torch.stack(actions_norm), cases["episode__action_norm"]) <= NORMALIZED_ATOL
    assert action_error(policy, torch.stack(popped), cases["episode__action"]) <= NORMALIZED_ATOL


@pytest.fixture(scope="module")
def ddpm100_reference(policy, cases):
    """The first batch row of ddpm100 (one row keeps the parallel solvers' runtime low)."""
    obs = observation(cases, rows=slice(0, 1))
    draws = (cases["ddpm100__noise_init"][:1], cases["ddpm100__noise_steps"][:, :1])
    return obs, draws, replay(policy, obs, *draws)["result"].sample


@pytest.mark.parametrize("method", PARALLEL)
def test_parallel_solver_matches_sequential(policy, cases, ddpm100_reference, method):
    obs, draws, reference = ddpm100_reference
    # newton at tolerance 0 needs ~95 rounds of 32 JVP directions (minutes on this CPU); its
    # default tolerance promises RMS <= 1e-5, which is what is checked.
    options = {} if method == "newton" else {"tolerance": 0.0}
    result = replay(policy, obs, *draws, method=method, **options)["result"]
    assert result.converged
    assert float((result.sample - reference).pow(2).mean().sqrt()) <= 1e-5
    assert max_error(result.sample, cases["ddpm100__action_pred_norm"][:1]) <= NORMALIZED_ATOL


# --- normalization ----------------------------------------------------------------------------


def legacy_checkpoint(tmp_path, normalization_mapping=None):
    """The fixture rewritten as LeRobot <= 0.3 saved it: stats inside model.safetensors."""
    target = tmp_path / "legacy"
    target.mkdir()
    config = json.loads((CHECKPOINT / "config.json").read_text())
    if normalization_mapping is None:
        del config["normalization_mapping"]
    else:
        config["normalization_mapping"] = normalization_mapping
    (target / "config.json").write_text(json.dumps(config))
    stats = load_file(CHECKPOINT / normalizer_state_file())
    mapping = config.get("normalization_mapping", {"STATE": "MIN_MAX", "ACTION": "MIN_MAX"})
    tensors = load_file(CHECKPOINT / "model.safetensors")
    modules = [("normalize_inputs", key) for key in config["input_features"]]
    modules += [("normalize_targets", "action"), ("unnormalize_outputs", "action")]
    features = {**config["input_features"], **config["output_features"]}
    for module, key in modules:
        if mapping.get(features[key]["type"]) != "MIN_MAX":
            continue
        for stat in ("min", "max"):
            name = f"{module}.buffer_{key.replace('.', '_')}.{stat}"
            tensors[name] = stats[f"{key}.{stat}"].clone()
    save_file(tensors, target / "model.safetensors")
    return target


def test_legacy_layout_gives_the_same_actions(cases, tmp_path):
    mapping = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"}
    legacy = load_lerobot(legacy_checkpoint(tmp_path, mapping))
    assert legacy.action_normalization.legacy
    obs = observation(cases)
    for key, value in legacy.normalize_observation(obs).items():
        assert max_error(value, cases[f"nobs__{key}"]) <= 1e-6  # eps placement: ~1 ulp
    out = replay(legacy, obs, cases["ddpm100__noise_init"], cases["ddpm100__noise_steps"])
    assert max_error(out["result"].sample, cases["ddpm100__action_pred_norm"]) <= NORMALIZED_ATOL
    assert action_error(legacy, out["action"], cases["ddpm100__action"]) <= NORMALIZED_ATOL


def test_legacy_default_mapping_leaves_environment_state_raw(cases, tmp_path):
    legacy = load_lerobot(legacy_checkpoint(tmp_path, normalization_mapping=None))
    normalized = legacy.normalize_observation(observation(cases))
    assert torch.equal(normalized[ENV], cases[f"obs__{ENV}"])
    assert max_error(normalized[STATE], cases[f"nobs__{STATE}"]) <= 1e-6


def test_processor_norm_map_without_env_leaves_environment_state_raw(cases, tmp_path):
    target = copy_checkpoint(tmp_path)
    path = target / "policy_preprocessor.json"
    pipeline = json.loads(path.read_text())
    del pipeline["steps"][-1]["config"]["norm_map"]["ENV"]
    path.write_text(json.dumps(pipeline))
    normalized = load_lerobot(target).normalize_observation(observation(cases))
    assert torch.equal(normalized[ENV], cases[f"obs__{ENV}"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda tensors: tensors.update(
                {"normalize_inputs.buffer_observation_state.min": torch.full((2,), float("inf"))}
            ),
            r"observation\.state\.min holds NaN or Inf",
        ),
        (
            lambda tensors: tensors.update(
                {"normalize_inputs.buffer_observation_env.max": torch.zeros(16)}
            ),
            r"\['buffer_observation_env'\] match no input feature",
        ),
        (
            lambda tensors: tensors.pop("unnormalize_outputs.buffer_action.max"),
            "no 'max' stat for 'action'",
        ),
    ],
    ids=["unfilled-inf", "unknown-buffer", "missing-stat"],
)
def test_bad_legacy_buffers(tmp_path, edit, message):
    target = legacy_checkpoint(tmp_path)
    rewrite_model(target, edit)
    with pytest.raises(LeRobotCheckpointError, match=message):
        load_lerobot(target)


def test_preprocessor_rename_map_is_applied(cases, tmp_path):
    target = copy_checkpoint(tmp_path)
    path = target / "policy_preprocessor.json"
    pipeline = json.loads(path.read_text())
    pipeline["steps"][0]["config"]["rename_map"] = {"agent_pos": STATE}
    path.write_text(json.dumps(pipeline))
    obs = observation(cases)
    obs["agent_pos"] = obs.pop(STATE)
    normalized = load_lerobot(target).normalize_observation(obs)
    assert max_error(normalized[STATE], cases[f"nobs__{STATE}"]) <= 1e-6


def test_eps_placement_current_and_legacy():
    """Current MIN_MAX swaps eps in only where max == min; legacy adds it everywhere, forward
    only. Values are exact in float32 (eps = 0.5 to make the difference visible)."""
    stats = {"min": torch.tensor([1.0, 2.0]), "max": torch.tensor([3.0, 2.0])}
    x = torch.tensor([2.5, 2.5])
    current = FeatureNormalization("MIN_MAX", stats, eps=0.5)
    assert torch.equal(current.normalize(x), torch.tensor([2 * 1.5 / 2 - 1, 2 * 0.5 / 0.5 - 1]))
    assert torch.equal(current.unnormalize(current.normalize(x)), x)
    legacy = FeatureNormalization("MIN_MAX", stats, eps=0.5, legacy=True)
    assert torch.allclose(legacy.normalize(x), torch.tensor([1.5 / 2.5 * 2 - 1, 0.5 / 0.5 * 2 - 1]))
    assert torch.equal(legacy.unnormalize(torch.tensor([0.0, 0.0])), torch.tensor([2.0, 2.0]))
    # MEAN_STD divides by std + eps; the inverse multiplies by std alone (LeRobot's code).
    gaussian = {"mean": torch.tensor([1.0]), "std": torch.tensor([0.5])}
    for flag in (False, True):
        mean_std = FeatureNormalization("MEAN_STD", gaussian, eps=0.5, legacy=flag)
        assert torch.equal(mean_std.normalize(torch.tensor([3.0])), torch.tensor([2.0]))
        assert torch.equal(mean_std.unnormalize(torch.tensor([2.0])), torch.tensor([2.0]))


# --- layouts on disk ---------------------------------------------------------------------------


def hub_cache_snapshot(cache, source=CHECKPOINT, revision="0123abcd"):
    """``source`` as the Hugging Face hub caches it: content-addressed files in
    ``models--org--name/blobs/`` and ``snapshots/<revision>/<name>`` links to
    ``../../blobs/<sha256>`` (what ``from_pretrained`` / ``snapshot_download`` leave on disk)."""
    repo = cache / "models--lerobot--diffusion_pusht_keypoints"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for path in sorted(source.iterdir()):
        if path.name in ("cases.npz", "meta.json"):
            continue
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def test_a_hub_cache_snapshot_of_links_loads_and_acts_the_same(policy, cases, tmp_path):
    snapshot = hub_cache_snapshot(tmp_path / "hub")
    state_file = snapshot / normalizer_state_file(snapshot)
    assert state_file.is_symlink() and not state_file.resolve().is_relative_to(snapshot)
    cached = load_policy(snapshot)
    obs = observation(cases)
    draws = cases["ddpm10__noise_init"], cases["ddpm10__noise_steps"]
    ours = replay(cached, obs, *draws, steps=10)
    plain = replay(policy, obs, *draws, steps=10)
    assert torch.equal(ours["action"], plain["action"])
    assert torch.equal(ours["result"].sample, plain["result"].sample)


# --- bad checkpoints and observations ---------------------------------------------------------


def rewrite_model(target, edit):
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(LeRobotCheckpointError, match="is not a directory"):
        load_lerobot(tmp_path / "nowhere")
    target = copy_checkpoint(tmp_path)
    (target / "config.json").unlink()
    with pytest.raises(LeRobotCheckpointError, match=r"config\.json does not exist"):
        load_lerobot(target)


def test_config_that_is_not_json(tmp_path):
    target = copy_checkpoint(tmp_path)
    (target / "config.json").write_text('{"type": "diffusion",')
    with pytest.raises(LeRobotCheckpointError, match=r"config\.json is not valid JSON"):
        load_lerobot(target)


def test_config_of_another_policy_type(tmp_path):
    target = copy_checkpoint(tmp_path, lambda config: config.update(type="act"))
    with pytest.raises(LeRobotCheckpointError, match=r"`type` must be 'diffusion'.*'act'"):
        load_lerobot(target)


def test_a_camera_in_the_config_without_its_encoder_weights_is_named(tmp_path):
    def add_camera(config):
        config["input_features"]["observation.image"] = {"type": "VISUAL", "shape": [3, 96, 96]}

    with pytest.raises(LeRobotCheckpointError, match=r"diffusion\.rgb_encoder\.0\.\* \(all"):
        load_lerobot(copy_checkpoint(tmp_path, add_camera))


def test_truncated_model_file(tmp_path):
    target = copy_checkpoint(tmp_path)
    path = target / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LeRobotCheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_lerobot(target)


def test_wrong_shape_names_key_file_and_both_shapes(tmp_path):
    target = copy_checkpoint(tmp_path)
    key = "diffusion.unet.final_conv.1.weight"
    rewrite_model(target, lambda tensors: tensors.update({key: torch.zeros(3, 32, 1)}))
    with pytest.raises(LeRobotCheckpointError) as error:
        load_lerobot(target)
    message = str(error.value)
    assert key in message and "model.safetensors" in message
    assert "(3, 32, 1)" in message and "(2, 32, 1)" in message


def test_missing_and_unexpected_weights_are_named(tmp_path):
    target = copy_checkpoint(tmp_path)
    dropped = "diffusion.unet.mid_modules.1.conv2.block.1.bias"

    def edit(tensors):
        del tensors[dropped]
        tensors["diffusion.unet.extra.weight"] = torch.zeros(1)

    rewrite_model(target, edit)
    with pytest.raises(LeRobotCheckpointError, match="missing keys") as error:
        load_lerobot(target)
    assert dropped in str(error.value) and "diffusion.unet.extra.weight" in str(error.value)


def test_missing_processor_state_file(tmp_path):
    target = copy_checkpoint(tmp_path)
    (target / normalizer_state_file(target)).unlink()
    message = r"normalizer_processor\.safetensors does not exist, but policy_preprocessor\.json"
    with pytest.raises(LeRobotCheckpointError, match=message):
        load_lerobot(target)


def test_missing_normalization_stats_entirely(tmp_path):
    target = copy_checkpoint(tmp_path)
    for path in target.glob("policy_*"):
        path.unlink()
    with pytest.raises(LeRobotCheckpointError, match="normalization stats are missing"):
        load_lerobot(target)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda obs: obs.pop(ENV), "missing 'observation.environment_state'"),
        (lambda obs: obs.update({STATE: obs[STATE][..., :1]}), r"has shape \(3, 2, 1\)"),
        (lambda obs: obs.update({STATE: obs[STATE][:, :1]}), "holds 1 steps of history"),
        (lambda obs: obs[STATE].__setitem__((0, 0, 0), float("nan")), "NaN or Inf"),
        (lambda obs: obs.update({ENV: obs[ENV][:2]}), "disagree on the batch size"),
    ],
    ids=["missing-key", "wrong-shape", "short-history", "nan", "batch-mismatch"],
)
def test_bad_observations(policy, cases, edit, message):
    obs = {key: value.clone() for key, value in observation(cases).items()}
    edit(obs)
    with pytest.raises(ObservationError, match=message):
        policy.problem(obs)
