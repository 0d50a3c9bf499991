"""Reading DiffusionPolicy ``.ckpt`` files as inert data.

A ``.ckpt`` is a torch zip archive whose pickle names globals. Plain
``torch.load(weights_only=False)`` (or dill) would import and call whatever a file names, so a
malicious checkpoint runs code on load. torch's ``weights_only`` unpickler refuses these files
(it cannot rebuild the ``defaultdict`` and OmegaConf objects the training workspace pickles).
Here the unpickler allows exactly the globals that upstream checkpoints use and refuses any other
*before* anything is called:

* OmegaConf containers of the resolved config (``DictConfig``, ``ListConfig``, ``AnyNode``,
  ``ContainerMetadata``, ``Metadata``) and ``typing.Any``;
* ``collections.defaultdict`` / ``OrderedDict``, ``_codecs.encode`` (bytes in protocol 2);
* ``torch._utils._rebuild_tensor_v2`` (storages are resolved by torch itself);
* ``dill._dill._load_type`` (dill pickles the builtin ``dict`` type this way), answered with the
  builtin type of that name from a short list, without importing dill; the same builtin container
  types named directly (``builtins.dict``), as a checkpoint saved without dill has them.

Allocation is bounded by the file's size, so a tiny file cannot exhaust memory: a ``.ckpt.xz``
whose index declares more than :func:`size_limit` of its compressed size is refused before
anything is decompressed, and decompression stops at the declared size (:mod:`.xz_file`); the
archive's declared record sizes and every storage the pickle declares must fit the same limit in
total; the allowed functions are guarded where an argument could allocate out of proportion
(``bytes(n)`` is refused, ``_codecs.encode`` takes text with the ``latin1`` codec only,
``_rebuild_tensor_v2`` may not view more elements than its storage holds). The config is
returned unresolved: an interpolation (``${...}``, which could read environment variables or nest
without bound) is refused, naming the file and the key; upstream's ``train.py`` resolves its
config before saving, so real checkpoints have none.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import io
import math
import mmap
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from policy_accel.policies.errors import (
    CheckpointContentError,
    CheckpointError,
    CheckpointFormatError,
    UnsafeCheckpointError,
)
from policy_accel.policies.validation import config_leaves
from policy_accel.policies.xz_file import read_xz

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "check_no_interpolation",
    "read_checkpoint",
    "size_limit",
]

ALLOWED_GLOBALS = {
    ("omegaconf.dictconfig", "DictConfig"),
    ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.nodes", "AnyNode"),
    ("omegaconf.base", "ContainerMetadata"),
    ("omegaconf.base", "Metadata"),
    ("typing", "Any"),
    ("collections", "defaultdict"),
    ("collections", "OrderedDict"),
}
DILL_BUILTIN_TYPES = (
    "dict",
    "list",
    "tuple",
    "set",
    "frozenset",
    "str",
    "bytes",
    "int",
    "float",
    "bool",
)
# A checkpoint may expand to this many times its size on disk (a .ckpt.xz of trained float
# weights compresses about 1.1x; zip archives written by torch are stored uncompressed), but
# never below the floor, so small real checkpoints always fit.
EXPANSION_RATIO = 8
EXPANSION_FLOOR_BYTES = 256 * 1024 * 1024
LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


def size_limit(file_bytes: int) -> int:
    """The most bytes a checkpoint file of ``file_bytes`` may expand to when it is read."""
    return max(EXPANSION_FLOOR_BYTES, EXPANSION_RATIO * file_bytes)


class _Budget:
    """Bytes the storages of one checkpoint may still claim."""

    def __init__(self, source: str, limit: int) -> None:
        self.source, self.left, self.limit = source, limit, limit

    def claim(self, nbytes: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise UnsafeCheckpointError(
                f"{self.source}: {what} would take the checkpoint past {self.limit} bytes, "
                f"{EXPANSION_RATIO}x its size on disk (at least {EXPANSION_FLOOR_BYTES}); a real "
                "checkpoint holds its tensors' bytes. Refusing to allocate it."
            )


def _dill_load_type(source: str):
    def load_type(name: str) -> type:
        if name not in DILL_BUILTIN_TYPES:
            raise UnsafeCheckpointError(
                f"{source}: dill._dill._load_type({str(name)[:40]!r}) names a type a "
                f"DiffusionPolicy checkpoint never needs (allowed: {list(DILL_BUILTIN_TYPES)}); "
                "refusing to load it (nothing from the file was run)."
            )
        return _builtin_type(name, source)

    return load_type


def _builtin_type(name: str, source: str) -> type:
    if name != "bytes":
        return getattr(builtins, name)

    class GuardedBytes(bytes):
        """``bytes`` that refuses ``bytes(n)``: n zero bytes from a few bytes of pickle."""

        def __new__(cls, *args: Any) -> bytes:  # type: ignore[misc]
            if args and isinstance(args[0], int):
                raise UnsafeCheckpointError(
                    f"{source} calls bytes({args[0]}), which allocates memory the file does not "
                    "hold; a checkpoint stores its bytes. Refusing to load it."
                )
            return bytes(*args)

    return GuardedBytes


def _codecs_encode(source: str):
    def encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if not isinstance(obj, str) or not isinstance(encoding, str) or encoding not in LATIN1:
            raise UnsafeCheckpointError(
                f"{source} calls _codecs.encode on a {type(obj).__name__} with encoding "
                f"{str(encoding)[:20]!r}; a pickle only encodes text with 'latin1' (protocol-2 "
                "bytes). Refusing to load it."
            )
        return obj.encode("latin1", errors)

    return encode


def _rebuild_tensor(source: str):
    def rebuild(storage, storage_offset, size, stride, *args: Any):
        elements = math.prod(size) if len(size) else 1
        itemsize = torch._utils._element_size(storage.dtype)
        capacity = getattr(storage, "_untyped_storage", storage).nbytes() // itemsize
        if elements and elements > capacity:
            raise UnsafeCheckpointError(
                f"{source}: a tensor of shape {tuple(size)[:8]} views a storage of "
                f"{capacity} elements; a checkpoint's tensors hold their own data. Refusing to "
                "load it."
            )
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *args)

    return rebuild


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed (and guarded)
    globals, and whose storages draw on a byte budget."""

    source = "<checkpoint>"
    budget: _Budget | None = None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("dill._dill", "_load_type"):
            return _dill_load_type(self.source)
        # Protocol-2 pickles name Python-2 spellings (__builtin__.long): map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "builtins" and name in DILL_BUILTIN_TYPES:
            return _builtin_type(name, self.source)  # the same types, pickled without dill
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode(self.source)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor(self.source)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to the global {str(module)[:60]}.{str(name)[:60]}, which a "
            "DiffusionPolicy checkpoint never needs; refusing to load it (nothing from the file "
            "was run). If you trust the file, convert it in a sandbox, or load it with plain "
            "torch.load at your own risk."
        )

    # torch sets ``persistent_load`` to its storage loader: wrap it to charge each storage's
    # declared size to the budget before torch allocates it
    @property
    def persistent_load(self):
        return self._storage_loader

    @persistent_load.setter
    def persistent_load(self, loader) -> None:
        def load(pid):
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                dtype = getattr(pid[1], "dtype", None)
                numel = pid[4]
                if not isinstance(numel, int) or numel < 0 or dtype is None:
                    raise CheckpointFormatError(f"{self.source}: a malformed storage record.")
                if self.budget is not None:
                    nbytes = numel * torch._utils._element_size(dtype)
                    self.budget.claim(nbytes, f"a storage of {nbytes} bytes")
            return loader(pid)

        self._storage_loader = load
        pickle.Unpickler.persistent_load.__set__(self, load)


def _restricted_module(source: str, budget: _Budget) -> types.ModuleType:
    """A stand-in for the ``pickle`` module that torch.load uses, naming the file in errors."""

    unpickler = type(
        "RestrictedUnpickler", (RestrictedUnpickler,), {"source": source, "budget": budget}
    )
    module = types.ModuleType("policy_accel_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    module.loads = lambda data, **kwargs: unpickler(io.BytesIO(data), **kwargs).load()
    return module


def _check_archive(source: str, data: mmap.mmap | Path, limit: int) -> None:
    """A zip archive's declared record sizes must fit ``limit`` (torch allocates each record's
    declared size when it reads it). Legacy (non-zip) files are left to the storage budget."""
    if not zipfile.is_zipfile(data):
        return
    try:
        with zipfile.ZipFile(data) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load names the corrupt archive below
    if declared > limit:
        raise UnsafeCheckpointError(
            f"{source}: its records declare {declared} bytes, more than the {limit} bytes a "
            f"checkpoint of its size may expand to ({EXPANSION_RATIO}x, at least "
            f"{EXPANSION_FLOOR_BYTES}); torch writes records uncompressed. Refusing to load it."
        )


def _load_archive(path: Path, source: Path | mmap.mmap, limit: int) -> Any:
    """``torch.load`` of ``source`` (the file, or its decompressed bytes) through the restricted
    unpickler, with the archive's records and storages held to ``limit`` bytes."""
    _check_archive(str(path), source, limit)
    if isinstance(source, mmap.mmap):
        source.seek(0)
    try:
        return torch.load(
            source,
            map_location="cpu",
            pickle_module=_restricted_module(str(path), _Budget(str(path), limit)),
            weights_only=False,
        )
    except CheckpointError:
        raise
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointFormatError(
            f"{path} is not a readable torch checkpoint ({type(error).__name__}: "
            f"{str(error)[:300]}). It may be truncated or corrupt; re-download or re-save it."
        ) from error


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a DiffusionPolicy ``.ckpt`` (or ``.ckpt.xz``) as plain Python data:
    ``{"cfg": dict, "state_dicts": {...}, ...}`` with the config as plain, unresolved containers
    (an interpolation is refused; other top-level entries, such as ``pickles``, come back as the
    restricted unpickler read them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    limit = size_limit(path.stat().st_size)
    if path.suffix != ".xz":
        payload = _load_archive(path, path, limit)
    else:
        with read_xz(path, limit) as decompressed:
            payload = _load_archive(path, decompressed, limit)
    if not isinstance(payload, dict) or "cfg" not in payload or "state_dicts" not in payload:
        keys = (
            sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
        )
        raise CheckpointFormatError(
            f"{path} is not a DiffusionPolicy workspace checkpoint: expected a dict with 'cfg' and "
            f"'state_dicts', got {keys}."
        )
    return {**payload, "cfg": _plain_config(payload["cfg"], str(path))}


def _plain_config(cfg: Any, source: str) -> Any:
    """The pickled OmegaConf config as plain containers, unresolved and checked."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.is_config(cfg):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=False)
        except (OmegaConfBaseException, RecursionError, ValueError, TypeError) as error:
            raise CheckpointContentError(
                f"{source}: its config cannot be read ({type(error).__name__}: {str(error)[:200]})."
            ) from error
    check_no_interpolation(cfg, source)
    return cfg


def check_no_interpolation(cfg: Any, source: str, where: str = "cfg") -> None:
    """Refuse a config value that holds an OmegaConf interpolation ``${...}``: a checkpoint is
    data, and resolving one could read environment variables, call resolvers or take unbounded
    time. Names the file and the key."""
    for name, value in config_leaves(cfg, source, where):
        if isinstance(value, str) and "${" in value:
            raise UnsafeCheckpointError(
                f"{source}: {name[:120]} is the interpolation {value[:80]!r}; a checkpoint's "
                "config must be resolved (DiffusionPolicy's train.py saves it resolved), and "
                "policy_accel never resolves one from a file. Write the value itself."
            )
