"""Checkpoint writers (``convert``, ``export_lerobot``) never write through links, never touch
their source, and replace a destination as a whole or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import policy_accel.policies.lerobot_export as lerobot_export
import policy_accel.policies.loading as loading
from policy_accel.cli import main as cli
from policy_accel.policies.destination import DestinationError, check_destination
from policy_accel.policies.lerobot_export import export_lerobot
from policy_accel.policies.loading import convert, load_policy

LEROBOT_FILES = [
    "config.json",
    "model.safetensors",
    "policy_postprocessor.json",
    "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    "policy_preprocessor.json",
    "policy_preprocessor_step_3_normalizer_processor.safetensors",
]


@pytest.fixture
def source(tiny_pusht_policy, tmp_path) -> Path:
    """A copy of the tiny PushT policy folder (policy_accel.json + model.safetensors)."""
    return Path(shutil.copytree(tiny_pusht_policy.source, tmp_path / "source"))


@pytest.fixture
def checkpoint(tiny_pusht_policy) -> Path:
    """The tiny policy's DiffusionPolicy .ckpt, which ``convert`` reads."""
    return Path(tiny_pusht_policy.source).parent / "latest.ckpt"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, links not followed."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def _export(source: Path, destination: Path, overwrite: bool = False) -> Path:
    return export_lerobot(load_policy(source), destination, 2, overwrite=overwrite)


def _convert(checkpoint: Path, destination: Path, overwrite: bool = False) -> Path:
    return convert(checkpoint, destination, overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_inside_the_destination_is_not_written_through(
    source, checkpoint, tmp_path, overwrite
):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    for name, write, origin in [("lerobot", _export, source), ("safe", _convert, checkpoint)]:
        destination = tmp_path / name
        destination.mkdir()
        (destination / "model.safetensors").symlink_to(outside)
        with pytest.raises(DestinationError, match="holds a symbolic link.*model.safetensors"):
            write(origin, destination, overwrite=overwrite)
        assert outside.read_bytes() == b"not yours"
        assert sorted(p.name for p in destination.iterdir()) == ["model.safetensors"]


def test_a_linked_subfolder_is_refused_too(source, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    destination = tmp_path / "out"
    (destination / "sub").mkdir(parents=True)
    (destination / "sub" / "data").symlink_to(elsewhere)
    with pytest.raises(DestinationError, match="sub/data"):
        _export(source, destination, overwrite=True)
    assert list(elsewhere.iterdir()) == []


def test_a_destination_that_is_a_link_is_refused(source, checkpoint, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(DestinationError, match="link is a symbolic link"):
        _export(source, link)
    with pytest.raises(DestinationError, match="link is a symbolic link"):
        _convert(checkpoint, link, overwrite=True)
    assert list(real.iterdir()) == [] and link.is_symlink()


@pytest.mark.parametrize(
    "destination, relation",
    [("source", "is"), ("source/sub", "lies inside"), ("source/..", "holds")],
)
def test_export_refuses_a_destination_overlapping_its_source(
    source, tmp_path, destination, relation, capsys
):
    before = _files(source)
    argv = ["export-lerobot", str(source), str(source.parent / destination), "--state-size", "2"]
    for flags in ([], ["--overwrite"]):
        assert cli(argv + flags) == 2
        error = capsys.readouterr().err
        assert f"{relation} the source" in error and "Choose a destination outside" in error
        assert error.count("\n") == 1  # one line
        with pytest.raises(DestinationError, match=f"{relation} the source"):
            _export(source, source.parent / destination, overwrite=bool(flags))
    assert _files(source) == before
    assert sorted(p.name for p in source.parent.iterdir()) == ["source"]  # no folder left behind


def test_convert_refuses_a_destination_holding_its_source(tiny_pusht_policy, tmp_path):
    checkpoint = tmp_path / "run" / "latest.ckpt"
    checkpoint.parent.mkdir()
    shutil.copy(Path(tiny_pusht_policy.source).parent / "latest.ckpt", checkpoint)
    before = checkpoint.read_bytes()
    for destination in (checkpoint.parent, checkpoint, tmp_path):
        with pytest.raises(DestinationError, match="the source .*latest.ckpt"):
            convert(checkpoint, destination, overwrite=True)
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["latest.ckpt"]


def test_a_destination_holding_what_the_source_links_to_is_refused(source, tmp_path):
    """A Hugging Face cache snapshot's files are links into ``../../blobs``."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (source / "model.safetensors").rename(blobs / "abc123")
    (source / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(DestinationError, match="holds the source .*abc123 \\(a file .* links to"):
        check_destination(blobs, source=source, overwrite=True)


def test_exporting_over_another_checkpoint_needs_the_flag_and_replaces_it(source, tmp_path, capsys):
    destination = Path(shutil.copytree(source, tmp_path / "out"))  # a converted checkpoint
    (destination / "stale.txt").write_text("from the old checkpoint")
    before = _files(destination)
    argv = ["export-lerobot", str(source), str(destination), "--state-size", "2"]
    assert cli(argv) == 2
    error = capsys.readouterr().err
    assert "already holds 3 entries" in error and "--overwrite" in error
    assert _files(destination) == before
    assert cli(argv + ["--overwrite"]) == 0
    assert sorted(_files(destination)) == LEROBOT_FILES  # no policy_accel.json, no stale.txt
    assert type(load_policy(destination)).__name__ == "LeRobotDiffusionPolicy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]


def test_converting_over_another_checkpoint_replaces_it(source, checkpoint, tmp_path):
    destination = _export(source, tmp_path / "out")
    with pytest.raises(DestinationError, match="already holds 6 entries"):
        _convert(checkpoint, destination)
    assert sorted(_files(destination)) == LEROBOT_FILES
    _convert(checkpoint, destination, overwrite=True)
    assert sorted(_files(destination)) == ["model.safetensors", "policy_accel.json"]
    assert type(load_policy(destination)).__name__ == "DiffusionPolicyLowdim"


def test_an_empty_folder_is_replaced_without_the_flag(source, tmp_path):
    destination = tmp_path / "out"
    destination.mkdir()
    _export(source, destination)
    assert sorted(_files(destination)) == LEROBOT_FILES


def test_a_failure_mid_write_leaves_the_destination_as_it_was(
    source, checkpoint, tmp_path, monkeypatch
):
    destination = _export(source, tmp_path / "out")
    before = _files(destination)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lerobot_export, "_write", fail)  # after the safetensors files
    with pytest.raises(OSError, match="disk full"):
        _export(source, destination, overwrite=True)
    monkeypatch.setattr(loading, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        _convert(checkpoint, destination, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        _convert(checkpoint, tmp_path / "new")
    assert _files(destination) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]  # no temporary folder


def test_a_file_as_destination_is_refused(source, tmp_path):
    destination = tmp_path / "notes.txt"
    destination.write_text("keep")
    with pytest.raises(DestinationError, match="is a file, not a folder"):
        _export(source, destination, overwrite=True)
    assert destination.read_text() == "keep"


def test_new_folders_get_the_usual_permissions(source, tmp_path):
    destination = _export(source, tmp_path / "a" / "b")
    umask = os.umask(0)
    os.umask(umask)
    assert destination.stat().st_mode & 0o777 == 0o777 & ~umask
