"""msgpack with numpy arrays, byte for byte as ``openpi_client.msgpack_numpy`` encodes them.

An array travels as the map ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
b"shape": shape}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": item, b"dtype":
dtype.str}``, so our server and client interoperate with openpi's. Unlike a generic
msgpack-numpy codec, nothing here ever unpickles: object (``O``), void/structured (``V``) and
complex (``c``) dtypes are refused in both directions, as openpi refuses them.

``unpack`` reads untrusted bytes from the network, so its work and memory are bounded by
:class:`DecodeLimits`, whatever the bytes hold: msgpack refuses a map, array, string or binary
longer than its limit as soon as it reads the length header, a budget on the total number of
container entries stops a message of millions of tiny elements (a 1-byte nil each) after a few
thousand, nesting and the number of arrays are capped, and error paths (``message['obs']``) are
only rendered when there is an error. Every declared array is checked against its payload: the
byte length must equal ``prod(shape) * itemsize`` and the result is a read-only view of the
received bytes, so a crafted shape can never make it allocate more memory than the message itself
holds. Anything wrong raises :class:`WireError`, which names the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from policy_accel.messages import preview, shorten

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
# the request key that resets a server connection's episode (a protocol constant both sides share)
RESET_KEY = "__reset__"
EXECUTED_KEY = "__executed__"  # actions of the last reply executed before this observation
COMMITTED_KEY = "__committed__"  # further actions of it executed while this request is planned
OVERLAP_KEY = "__overlap__"  # follow the rest of it, after the committed ones, softly
OBSERVE_KEY = "__observe__"  # record this observation step in the history, do not plan
MAX_DEPTH = 32
REFUSED_DTYPE_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}
ARRAY_MARKER = b"__ndarray__"
SCALAR_MARKER = b"__npgeneric__"
_PLAIN_TYPES = (type(None), bool, int, float, str, bytes)


class WireError(ValueError):
    """A message that cannot be encoded or decoded safely; the text names the key and why."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one decoded message may hold. The defaults admit any observation a robot sends
    (a few dozen keys of arrays, a text prompt) and bound the decoding of 8 MiB of crafted
    msgpack to milliseconds.

    Attributes:
        max_depth: nesting of maps and lists.
        max_entries: total entries of all maps and lists together (the work budget).
        max_map_len, max_array_len: entries of one map / one list.
        max_str_len: characters of one string (keys included).
        max_arrays: numpy arrays and scalars in one message.
    """

    max_depth: int = 8
    max_entries: int = 4096
    max_map_len: int = 256
    max_array_len: int = 1024
    max_str_len: int = 65536
    max_arrays: int = 256


DEFAULT_LIMITS = DecodeLimits()


def pack(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, tuples, numbers, strings, bytes, numpy arrays and scalars)."""
    tree = _encode(obj, "message", 0)
    try:
        return msgpack.packb(tree)
    except (OverflowError, ValueError, TypeError) as error:
        raise WireError(f"cannot encode the message as msgpack: {error}.") from error


def unpack(
    data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, limits: DecodeLimits = DEFAULT_LIMITS
) -> Any:
    """Decode one msgpack message within ``limits``; arrays come back as read-only views of
    ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes to decode, got {type(data).__name__}.")
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes.")
    entries = [0]

    def count(size: int) -> None:
        entries[0] += size
        if entries[0] > limits.max_entries:
            raise WireError(
                f"the message holds more than {limits.max_entries} map and list entries; send "
                "one observation step (a map of arrays)."
            )

    def make_list(items: list) -> list:
        count(len(items))
        return items

    def make_map(pairs: list) -> dict:
        count(len(pairs))
        try:
            return dict(pairs)
        except TypeError as error:  # a map or list as a key
            raise WireError(f"a map has a key that is not a string or bytes ({error}).") from error

    try:
        tree = msgpack.unpackb(
            data,
            list_hook=make_list,
            object_pairs_hook=make_map,
            max_str_len=limits.max_str_len,
            max_bin_len=max_bytes,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except WireError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError) as error:
        # ExtraData, FormatError, StackError, the length limits and invalid UTF-8 are ValueErrors
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise WireError(
            f"malformed msgpack ({shorten(detail, 300)}); send one message packed with "
            "policy_accel.control.wire.pack or openpi_client.msgpack_numpy."
        ) from error
    return _Decoder(limits).decode(tree, None, 0)


def _render(path: tuple | None) -> str:
    """``message['obs'][0]`` from the linked path ``(parent, key)`` (rendered on errors only)."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    parts = [f"[{shorten(repr(key))}]" if not isinstance(key, int) else f"[{key}]" for key in keys]
    return "message" + "".join(reversed(parts))


# --- encoding ---------------------------------------------------------------------------------


def _encode(obj: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"{path} is nested deeper than {MAX_DEPTH} levels.")
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype, path)
        return {
            ARRAY_MARKER: True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": obj.shape,
        }
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype, path)
        return {SCALAR_MARKER: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, dict):
        return {key: _encode(value, f"{path}[{key!r}]", depth + 1) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(value, f"{path}[{i}]", depth + 1) for i, value in enumerate(obj)]
    if isinstance(obj, _PLAIN_TYPES):
        return obj
    raise WireError(
        f"{path} is a {type(obj).__name__}, which has no wire format; send numpy arrays, "
        "numbers, strings, bytes, lists or dicts (convert tensors with .cpu().numpy())."
    )


def _check_dtype(dtype: np.dtype, path: str) -> None:
    if dtype.kind in REFUSED_DTYPE_KINDS:
        raise WireError(
            f"{path} has dtype {dtype.str} ({REFUSED_DTYPE_KINDS[dtype.kind]}), which is refused "
            "on the wire; send a bool, integer, float or string array."
        )


# --- decoding ---------------------------------------------------------------------------------


class _Decoder:
    """The msgpack tree -> Python values with numpy arrays, within :class:`DecodeLimits`."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.arrays = 0

    def decode(self, obj: Any, path: tuple | None, depth: int) -> Any:
        if depth > self.limits.max_depth:
            raise WireError(
                f"{_render(path)} is nested deeper than {self.limits.max_depth} levels."
            )
        if isinstance(obj, dict):
            if obj.get(ARRAY_MARKER) is True or obj.get(SCALAR_MARKER) is True:
                self.arrays += 1
                if self.arrays > self.limits.max_arrays:
                    raise WireError(
                        f"the message holds more than {self.limits.max_arrays} numpy arrays."
                    )
                if obj.get(ARRAY_MARKER) is True:
                    return _decode_array(obj, _render(path))
                return _decode_scalar(obj, _render(path))
            return {key: self.decode(value, (path, key), depth + 1) for key, value in obj.items()}
        if isinstance(obj, list):
            return [self.decode(value, (path, i), depth + 1) for i, value in enumerate(obj)]
        if isinstance(obj, _PLAIN_TYPES):
            return obj
        raise WireError(
            f"{_render(path)} is a msgpack {type(obj).__name__}, which is not accepted."
        )


def _decode_dtype(value: Any, path: str) -> np.dtype:
    if not isinstance(value, str) or len(value) > 32:
        raise WireError(
            f"{path}: the dtype must be a string like '<f4', got {shorten(repr(value))}."
        )
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as error:
        raise WireError(
            f"{path}: {shorten(repr(value))} is not a numpy dtype ({shorten(str(error))})."
        ) from error
    _check_dtype(dtype, path)
    return dtype


def _decode_array(obj: dict, path: str) -> np.ndarray:
    expected_fields = {ARRAY_MARKER, b"data", b"dtype", b"shape"}
    if set(obj) != expected_fields:
        raise WireError(
            f"{path}: an array must have exactly the fields {sorted(expected_fields)}, "
            f"got {preview(sorted(obj, key=repr))}."
        )
    dtype = _decode_dtype(obj[b"dtype"], path)
    data, shape = obj[b"data"], obj[b"shape"]
    if not isinstance(data, bytes):
        raise WireError(f"{path}: the array data must be bytes, got {type(data).__name__}.")
    if not isinstance(shape, list) or not all(
        type(size) is int and size >= 0
        for size in shape  # bool is an int: exclude it
    ):
        raise WireError(
            f"{path}: the shape must be a list of non-negative ints, got {shorten(repr(shape))}."
        )
    if len(shape) > MAX_DEPTH:
        raise WireError(f"{path}: {len(shape)} dimensions; at most {MAX_DEPTH} are accepted.")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            f"{path}: shape {tuple(shape)} of dtype {dtype.str} needs {expected} bytes, "
            f"but {len(data)} were sent."
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as error:  # e.g. a zero itemsize
        raise WireError(
            f"{path}: cannot build a {dtype.str} array of shape {shape} ({error})."
        ) from error


def _decode_scalar(obj: dict, path: str) -> np.generic:
    expected_fields = {SCALAR_MARKER, b"data", b"dtype"}
    if set(obj) != expected_fields:
        raise WireError(
            f"{path}: a numpy scalar must have exactly the fields {sorted(expected_fields)}, "
            f"got {preview(sorted(obj, key=repr))}."
        )
    dtype = _decode_dtype(obj[b"dtype"], path)
    value = obj[b"data"]
    if not isinstance(value, _PLAIN_TYPES) or value is None:
        raise WireError(f"{path}: a numpy scalar's data must be a number, string or bytes.")
    try:
        return dtype.type(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError(
            f"{path}: {shorten(repr(value))} is not a valid {dtype.str} scalar "
            f"({shorten(str(error))})."
        ) from error
