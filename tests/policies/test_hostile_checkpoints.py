"""Crafted checkpoints are read as inert data: no interpolation is resolved, decompression and
allocation stay bounded by the file's size, configs are validated before networks are built,
LeRobot processor files stay inside the checkpoint, and every refusal is a CheckpointError that
names the file (the CLI prints it on one line and exits 2)."""

from __future__ import annotations

import codecs
import copy
import json
import lzma
import os
import re
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import policy_accel.policies.pickle_safe as pickle_safe
from policy_accel import load_policy
from policy_accel.cli import main as cli
from policy_accel.policies import (
    CheckpointContentError,
    CheckpointError,
    CheckpointFormatError,
    LeRobotCheckpointError,
    UnsafeCheckpointError,
)
from policy_accel.policies.pickle_safe import read_checkpoint
from tests.shared_fixtures import FIXTURES, require

FIXTURE = FIXTURES / "diffusion_policy" / "unet_lowdim_global"
LEROBOT = FIXTURES / "lerobot" / "diffusion_pusht_keypoints"
require(FIXTURE)


@pytest.fixture(scope="module")
def payload():
    return read_checkpoint(FIXTURE / "model.ckpt")


def _save(path: Path, payload: dict, cfg=None, **torch_save) -> Path:
    """A DiffusionPolicy-layout checkpoint with the fixture's weights and ``cfg``."""
    state = {"ema_model": payload["state_dicts"]["ema_model"]}
    torch.save({"cfg": cfg if cfg is not None else payload["cfg"], "state_dicts": state}, path)
    return path


def _with_policy(payload: dict, **changes) -> dict:
    cfg = copy.deepcopy(payload["cfg"])
    for dotted, value in changes.items():
        node = cfg["policy"]
        *parents, last = dotted.split("__")
        for parent in parents:
            node = node[parent]
        node[last] = value
    return cfg


# --- interpolations (findings 3 and 4) ---------------------------------------------------------


def test_an_environment_interpolation_is_refused_and_never_written(payload, tmp_path, monkeypatch):
    monkeypatch.setenv("POLICY_ACCEL_TEST_SECRET", "hunter2")
    cfg = OmegaConf.create(_with_policy(payload))
    cfg.policy.noise_scheduler.beta_schedule = "${oc.env:POLICY_ACCEL_TEST_SECRET}"
    path = _save(tmp_path / "env.ckpt", payload, cfg)
    with pytest.raises(UnsafeCheckpointError, match=r"env\.ckpt: cfg\.policy\.noise_scheduler"):
        load_policy(path)
    assert cli(["convert", str(path), str(tmp_path / "out")]) == 2
    written = list((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    assert not any(b"hunter2" in p.read_bytes() for p in written if p.is_file())


def test_nested_interpolations_are_refused_at_once(payload, tmp_path):
    chain = {"a0": "x" * 50}
    for i in range(1, 40):  # each level doubles: resolving it would take forever
        chain[f"a{i}"] = f"${{a{i - 1}}}${{a{i - 1}}}"
    cfg = OmegaConf.create({**_with_policy(payload), "bomb": chain})
    path = _save(tmp_path / "nested.ckpt", payload, cfg)
    start = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match="interpolation"):
        load_policy(path)
    assert time.perf_counter() - start < 10


# --- bounded decompression and allocation (finding 3) ------------------------------------------


@pytest.fixture()
def small_limits(monkeypatch):
    """A 1 MiB floor instead of 256 MiB, so bombs can be small and fast to build."""
    monkeypatch.setattr(pickle_safe, "EXPANSION_FLOOR_BYTES", 1024 * 1024)


def test_an_xz_bomb_is_refused_before_it_is_decompressed(tmp_path, small_limits):
    path = tmp_path / "bomb.ckpt.xz"
    path.write_bytes(lzma.compress(bytes(32 * 1024 * 1024), preset=1))
    assert path.stat().st_size < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeCheckpointError, match="declares 33554432 bytes once decomp"):
            load_policy(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the index at the file's end said 32 MiB: nothing was decompressed (this was 16 MiB, one
    # decompressed chunk, before the index was read; 256 MiB at the real limit)
    assert peak < 256 * 1024


def test_the_shipped_compressed_fixture_still_loads(tmp_path):
    path = tmp_path / "model.ckpt.xz"
    path.write_bytes(lzma.compress(FIXTURE.joinpath("model.ckpt").read_bytes(), preset=1))
    assert load_policy(path).horizon == 16


def test_a_compressed_zip_record_is_refused_before_it_is_inflated(tmp_path, small_limits):
    plain = tmp_path / "plain.ckpt"
    torch.save({"cfg": {}, "state_dicts": {"x": torch.zeros(4 * 1024 * 1024)}}, plain)
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 200 * 1024
    with pytest.raises(UnsafeCheckpointError, match="records declare"):
        load_policy(path)


def test_a_legacy_file_cannot_declare_storages_beyond_its_size(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_safe, "EXPANSION_FLOOR_BYTES", 1024)
    monkeypatch.setattr(pickle_safe, "EXPANSION_RATIO", 0)
    path = tmp_path / "legacy.ckpt"
    torch.save({"cfg": {}, "state_dicts": {"x": torch.zeros(4096)}}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    with pytest.raises(UnsafeCheckpointError, match="a storage of 16384 bytes"):
        read_checkpoint(path)


class _Call:
    """Pickles as ``function(*args)``: what a crafted file asks the unpickler to run."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(
    "call, message",
    [
        (_Call(bytes, 10**9), r"calls bytes\(1000000000\)"),
        (_Call(codecs.encode, b"\0" * 16, "hex"), "_codecs.encode on a bytes"),
        (_Call(codecs.encode, "x" * 16, "rot13"), "encoding 'rot13'"),
    ],
    ids=["bytes(n)", "encode(bytes, hex)", "encode(str, rot13)"],
)
def test_allowed_functions_with_amplifying_arguments_are_refused(tmp_path, call, message):
    path = tmp_path / "amplify.ckpt"
    torch.save({"cfg": {}, "state_dicts": {}, "x": call}, path)
    with pytest.raises(UnsafeCheckpointError, match=message):
        load_policy(path)


def test_a_broadcast_tensor_view_is_refused(tmp_path):
    path = tmp_path / "expanded.ckpt"
    torch.save({"cfg": {}, "state_dicts": {"x": torch.zeros(1).expand(10**8)}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"views a storage of 1 elements"):
        load_policy(path)


def test_huge_layer_sizes_are_refused_before_any_network_is_built(payload, tmp_path):
    cases = {
        "down_dims": (_with_policy(payload, model__down_dims=[60000, 60000, 60000]), "match"),
        "huge int": (_with_policy(payload, model__down_dims=[10**9]), r"down_dims\[0\]"),
        "train steps": (
            _with_policy(payload, noise_scheduler__num_train_timesteps=10**9),
            "num_train_timesteps must be an int between 1 and 100000",
        ),
    }
    for name, (cfg, message) in cases.items():
        path = _save(tmp_path / f"{name}.ckpt", payload, cfg)
        start = time.perf_counter()
        with pytest.raises(CheckpointContentError, match=message):
            load_policy(path)
        assert time.perf_counter() - start < 10, name  # the meta-device check allocates nothing


# --- validated configs and errors that name the file (findings 8 and 9) -------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"horizon": 0}, r"cfg\.policy\.horizon must be an int between 1 and 4096\. Got 0\."),
        ({"obs_dim": -5}, r"cfg\.policy\.obs_dim must be an int"),
        ({"n_action_steps": 10**6}, r"cfg\.policy\.n_action_steps must be an int"),
        ({"n_action_steps": 16}, r"n_action_steps=16 does not fit the horizon.*15 at most"),
        ({"obs_dim": 21}, r"model\.global_cond_dim is 40, but .* make it 42"),
        ({"horizon": "16"}, r"horizon must be an int"),
        ({"num_inference_steps": 1000}, r"num_inference_steps=1000 exceeds"),
    ],
)
def test_invalid_configs_are_refused_naming_the_key(payload, tmp_path, changes, message):
    path = _save(tmp_path / "bad.ckpt", payload, _with_policy(payload, **changes))
    with pytest.raises(CheckpointContentError, match=message) as error:
        load_policy(path)
    assert "bad.ckpt" in str(error.value)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda cfg: cfg["policy"].pop("horizon"),
        lambda cfg: cfg["policy"].__setitem__("model", [1, 2]),
        lambda cfg: cfg["policy"].__setitem__("noise_scheduler", "DDPM"),
        lambda cfg: cfg["policy"]["noise_scheduler"].__setitem__("beta_schedule", "nonsense"),
    ],
    ids=["missing key", "list for a dict", "string for a dict", "bad scheduler option"],
)
def test_malformed_configs_are_checkpoint_errors_naming_the_file(payload, tmp_path, mutate):
    cfg = copy.deepcopy(payload["cfg"])
    mutate(cfg)
    path = _save(tmp_path / "malformed.ckpt", payload, cfg)
    with pytest.raises(CheckpointError, match="malformed.ckpt"):
        load_policy(path)


def test_a_refused_dill_type_names_the_file(tmp_path):
    path = tmp_path / "dilly.ckpt"
    torch.save({"cfg": {}, "state_dicts": {}, "x": _Call(str, "os")}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    data = path.read_bytes()
    marker = b"c__builtin__\nunicode\n"  # protocol 2 spells str so
    assert marker in data
    path.write_bytes(data.replace(marker, b"cdill._dill\n_load_type\n"))
    with pytest.raises(
        UnsafeCheckpointError, match=r"dilly\.ckpt: dill\._dill\._load_type\('os'\)"
    ):
        load_policy(path)


def test_invalid_utf8_in_the_safe_format_names_the_file(tmp_path):
    from policy_accel.policies.loading import convert

    destination = convert(FIXTURE / "model.ckpt", tmp_path / "converted")
    (destination / "policy_accel.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(CheckpointFormatError, match=r"policy_accel\.json is not valid JSON"):
        load_policy(destination)


# --- non-finite numbers (issue 22, item 8) -------------------------------------------------------


def _lerobot_copy(tmp_path: Path, file_name: str, edit) -> Path:
    """The LeRobot fixture with ``edit(json)`` applied to ``file_name``; a value ``"@<literal>"``
    is written as the bare literal (``NaN``, ``Infinity``, ``1e999``), as Python's json does."""
    require(LEROBOT)
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(LEROBOT, copy_dir)
    content = json.loads((copy_dir / file_name).read_text())
    edit(content)
    text = re.sub(r'"@([^"]+)"', r"\1", json.dumps(content))
    (copy_dir / file_name).write_text(text)
    return copy_dir


@pytest.mark.parametrize(
    "field, literal, shown",
    [
        ("clip_sample_range", "NaN", "nan"),
        ("clip_sample_range", "Infinity", "inf"),
        ("beta_start", "-Infinity", "-inf"),
        ("beta_end", "1e999", "inf"),  # parses as a float overflow, not a constant
    ],
)
def test_a_non_finite_number_in_a_lerobot_config_is_refused_naming_it(
    tmp_path, field, literal, shown
):
    copy_dir = _lerobot_copy(tmp_path, "config.json", lambda c: c.update({field: f"@{literal}"}))
    message = rf"config\.json: {field} is {shown}, not a finite number"
    with pytest.raises(LeRobotCheckpointError, match=message):
        load_policy(copy_dir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("clip_sample_range", 0, r"`clip_sample_range` must be a number in \(0\.0, inf\)"),
        ("clip_sample_range", "1.0", r"`clip_sample_range` must be a number"),
        ("beta_end", 1.5, r"`beta_end` must be a number in \(0\.0, 1\.0\)\. Got '1\.5'"),
        ("clip_sample", "yes", r"`clip_sample` must be true or false"),
    ],
)
def test_lerobot_scheduler_numbers_out_of_range_are_refused(tmp_path, field, value, message):
    copy_dir = _lerobot_copy(tmp_path, "config.json", lambda c: c.update({field: value}))
    with pytest.raises(LeRobotCheckpointError, match=message):
        load_policy(copy_dir)


def test_a_non_finite_processor_eps_is_refused_naming_the_step(tmp_path):
    def edit(pipeline):
        pipeline["steps"][3]["config"]["eps"] = "@NaN"

    copy_dir = _lerobot_copy(tmp_path, "policy_preprocessor.json", edit)
    message = r"policy_preprocessor\.json: steps\[3\]\.config\.eps is nan"
    with pytest.raises(LeRobotCheckpointError, match=message):
        load_policy(copy_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_number_in_a_pickled_policy_config_is_refused(payload, tmp_path, value):
    cfg = _with_policy(payload, noise_scheduler__clip_sample_range=value)
    path = _save(tmp_path / "odd.ckpt", payload, cfg)
    message = rf"odd\.ckpt: cfg\.policy\.noise_scheduler\.clip_sample_range is {value}, not a"
    with pytest.raises(CheckpointContentError, match=message):
        load_policy(path)


def test_a_non_finite_number_in_the_safe_format_is_refused(tmp_path):
    from policy_accel.policies.loading import convert

    destination = convert(FIXTURE / "model.ckpt", tmp_path / "converted")
    config = json.loads((destination / "policy_accel.json").read_text())
    config["policy"]["noise_scheduler"]["beta_start"] = float("nan")
    (destination / "policy_accel.json").write_text(json.dumps(config))  # writes a bare NaN
    message = r"policy_accel\.json: policy\.noise_scheduler\.beta_start is nan"
    with pytest.raises(CheckpointFormatError, match=message):
        load_policy(destination)


# --- LeRobot processor files (finding 10) -------------------------------------------------------


@pytest.mark.parametrize("state_file", ["/etc/passwd", "../outside.safetensors", "../../nope"])
def test_a_lerobot_state_file_outside_the_checkpoint_is_refused(tmp_path, state_file):
    require(LEROBOT)
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(LEROBOT, copy_dir)
    (tmp_path / "outside.safetensors").write_bytes(
        (copy_dir / "policy_preprocessor_step_3_normalizer_processor.safetensors").read_bytes()
    )
    pipeline = json.loads((copy_dir / "policy_preprocessor.json").read_text())
    pipeline["steps"][3]["state_file"] = state_file
    (copy_dir / "policy_preprocessor.json").write_text(json.dumps(pipeline))
    with pytest.raises(LeRobotCheckpointError, match="is not a file inside the checkpoint") as e:
        load_policy(copy_dir)
    assert "does not exist" not in str(e.value)  # the text never tells whether a path exists


STATE_FILE = "policy_preprocessor_step_3_normalizer_processor.safetensors"


def _snapshot_copy(tmp_path: Path) -> Path:
    """The LeRobot fixture copied as a Hugging Face cache snapshot folder (plain files)."""
    snapshot = tmp_path / "models--x--y" / "snapshots" / "rev"
    (tmp_path / "models--x--y" / "blobs").mkdir(parents=True)
    shutil.copytree(LEROBOT, snapshot)
    return snapshot


@pytest.mark.parametrize("layout", ["plain", "hub-snapshot"])
def test_a_lerobot_state_file_linking_out_of_the_checkpoint_is_refused(tmp_path, layout):
    """Links into the hub cache's blobs are allowed (test_lerobot); links anywhere else are not."""
    require(LEROBOT)
    if layout == "plain":
        copy_dir = tmp_path / "ckpt"
        shutil.copytree(LEROBOT, copy_dir)
    else:
        copy_dir = _snapshot_copy(tmp_path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((copy_dir / STATE_FILE).read_bytes())
    (copy_dir / STATE_FILE).unlink()
    (copy_dir / STATE_FILE).symlink_to(outside)
    with pytest.raises(LeRobotCheckpointError, match="is not a file inside the checkpoint"):
        load_policy(copy_dir)


def test_a_lerobot_state_file_may_not_name_the_hub_blobs_itself(tmp_path):
    """The name in the JSON stays inside the snapshot; only the hub's own links lead to blobs."""
    require(LEROBOT)
    snapshot = _snapshot_copy(tmp_path)
    (snapshot / STATE_FILE).rename(snapshot.parents[1] / "blobs" / "stats")
    pipeline = json.loads((snapshot / "policy_preprocessor.json").read_text())
    pipeline["steps"][3]["state_file"] = "../../blobs/stats"
    (snapshot / "policy_preprocessor.json").write_text(json.dumps(pipeline))
    with pytest.raises(LeRobotCheckpointError, match="is not a file inside the checkpoint"):
        load_policy(snapshot)


def test_a_lerobot_state_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    require(LEROBOT)
    snapshot = _snapshot_copy(tmp_path)
    fifo = snapshot.parents[1] / "blobs" / "fifo"
    os.mkfifo(fifo)  # reading it would block forever
    (snapshot / STATE_FILE).unlink()
    (snapshot / STATE_FILE).symlink_to(Path("..", "..", "blobs", "fifo"))
    with pytest.raises(LeRobotCheckpointError, match=f"{STATE_FILE} is not a regular file"):
        load_policy(snapshot)


@pytest.mark.parametrize(
    "field, value", [("eps", "tiny"), ("norm_map", ["MIN_MAX"]), ("features", {"x": 3})]
)
def test_bad_lerobot_processor_fields_name_the_file(tmp_path, field, value):
    require(LEROBOT)
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(LEROBOT, copy_dir)
    pipeline = json.loads((copy_dir / "policy_preprocessor.json").read_text())
    pipeline["steps"][3]["config"][field] = value
    (copy_dir / "policy_preprocessor.json").write_text(json.dumps(pipeline))
    with pytest.raises(LeRobotCheckpointError, match=str(copy_dir)):
        load_policy(copy_dir)


# --- the command line (finding 7) -----------------------------------------------------------------


class _System:
    def __reduce__(self):
        import os

        return os.system, ("true",)


@pytest.mark.parametrize("command", ["convert", "serve"])
def test_refused_checkpoints_exit_2_with_one_line(tmp_path, capsys, command):
    path = tmp_path / "evil.ckpt"
    torch.save({"cfg": {}, "state_dicts": {}, "x": _System()}, path)
    argv = [command, str(path), str(tmp_path / "out")] if command == "convert" else [
        command, str(path), "--port", "0"
    ]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "evil.ckpt refers to the global" in err
