"""Reading DiffusionPolicy ``.ckpt`` files without executing arbitrary code.

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
"""

from __future__ import annotations

import _compat_pickle
import builtins
import io
import lzma
import pickle
import types
from pathlib import Path
from typing import Any

import torch

ALLOWED_GLOBALS = {
    ("omegaconf.dictconfig", "DictConfig"),
    ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.nodes", "AnyNode"),
    ("omegaconf.base", "ContainerMetadata"),
    ("omegaconf.base", "Metadata"),
    ("typing", "Any"),
    ("collections", "defaultdict"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("torch._utils", "_rebuild_tensor_v2"),
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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle names a global outside the allow-list."""


class CheckpointFormatError(ValueError):
    """A checkpoint file that is truncated, corrupt or not in the expected layout."""


def _dill_load_type(name: str) -> type:
    if name not in DILL_BUILTIN_TYPES:
        raise UnsafeCheckpointError(
            f"dill._dill._load_type({name!r}) is not an allowed builtin type."
        )
    return getattr(builtins, name)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allow-listed globals."""

    source = "<checkpoint>"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("dill._dill", "_load_type"):
            return _dill_load_type
        # Protocol-2 pickles name Python-2 spellings (__builtin__.long): map them as pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "builtins" and name in DILL_BUILTIN_TYPES:
            return getattr(builtins, name)  # the same types, pickled without dill
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to the global {module}.{name}, which a DiffusionPolicy "
            "checkpoint never needs; refusing to load it (nothing from the file was run). If you "
            "trust the file, convert it in a sandbox, or load it with plain torch.load at your "
            "own risk."
        )


def _restricted_module(source: str) -> types.ModuleType:
    """A stand-in for the ``pickle`` module that torch.load uses, naming the file in errors."""

    unpickler = type("RestrictedUnpickler", (RestrictedUnpickler,), {"source": source})
    module = types.ModuleType("policy_accel_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    module.loads = lambda data, **kwargs: unpickler(io.BytesIO(data), **kwargs).load()
    return module


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a DiffusionPolicy ``.ckpt`` (or ``.ckpt.xz``) as plain Python data:
    ``{"cfg": dict, "state_dicts": {...}, ...}`` with the config resolved to plain containers
    (other top-level entries, such as ``pickles``, come back as the restricted unpickler read
    them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    data = path.read_bytes()
    if path.suffix == ".xz":
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as error:
            raise CheckpointFormatError(f"{path} is not a valid .xz file ({error}).") from error
    try:
        payload = torch.load(
            io.BytesIO(data),
            map_location="cpu",
            pickle_module=_restricted_module(str(path)),
            weights_only=False,
        )
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointFormatError(
            f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error}). "
            "It may be truncated or corrupt; re-download or re-save it."
        ) from error
    if not isinstance(payload, dict) or "cfg" not in payload or "state_dicts" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointFormatError(
            f"{path} is not a DiffusionPolicy workspace checkpoint: expected a dict with 'cfg' and "
            f"'state_dicts', got {keys}."
        )
    from omegaconf import OmegaConf

    cfg = payload["cfg"]
    cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    return {**payload, "cfg": cfg}
