"""msgpack with numpy arrays, byte for byte as ``openpi_client.msgpack_numpy`` encodes them.

An array travels as the map ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
b"shape": shape}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": item, b"dtype":
dtype.str}``, so our server and client interoperate with openpi's. Unlike a generic
msgpack-numpy codec, nothing here ever unpickles: object (``O``), void/structured (``V``) and
complex (``c``) dtypes are refused in both directions, as openpi refuses them.

``unpack`` reads untrusted bytes from the network, so it checks every declared array against its
payload: the byte length must equal ``prod(shape) * itemsize`` and the result is a read-only view
of the received bytes, so a crafted shape can never make it allocate more memory than the message
itself holds. Anything wrong raises :class:`WireError`, which names the offending key.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
# the request key that resets a server connection's episode (a protocol constant both sides share)
RESET_KEY = "__reset__"
MAX_DEPTH = 32
REFUSED_DTYPE_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}
ARRAY_MARKER = b"__ndarray__"
SCALAR_MARKER = b"__npgeneric__"
_PLAIN_TYPES = (type(None), bool, int, float, str, bytes)


class WireError(ValueError):
    """A message that cannot be encoded or decoded safely; the text names the key and why."""


def pack(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, tuples, numbers, strings, bytes, numpy arrays and scalars)."""
    tree = _encode(obj, "message", 0)
    try:
        return msgpack.packb(tree)
    except (OverflowError, ValueError, TypeError) as error:
        raise WireError(f"cannot encode the message as msgpack: {error}.") from error


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode one msgpack message; arrays come back as read-only views of ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes to decode, got {type(data).__name__}.")
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes.")
    try:
        tree = msgpack.unpackb(data)
    except (msgpack.UnpackException, ValueError, TypeError) as error:
        # ExtraData, FormatError, StackError and invalid UTF-8 are all ValueErrors
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise WireError(
            f"malformed msgpack ({detail}); send one message packed with "
            "policy_accel.control.wire.pack or openpi_client.msgpack_numpy."
        ) from error
    return _decode(tree, "message", 0)


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


def _decode(obj: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"{path} is nested deeper than {MAX_DEPTH} levels.")
    if isinstance(obj, dict):
        if obj.get(ARRAY_MARKER) is True:
            return _decode_array(obj, path)
        if obj.get(SCALAR_MARKER) is True:
            return _decode_scalar(obj, path)
        return {key: _decode(value, f"{path}[{key!r}]", depth + 1) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode(value, f"{path}[{i}]", depth + 1) for i, value in enumerate(obj)]
    if isinstance(obj, _PLAIN_TYPES):
        return obj
    raise WireError(f"{path} is a msgpack {type(obj).__name__}, which is not accepted.")


def _decode_dtype(value: Any, path: str) -> np.dtype:
    if not isinstance(value, str):
        raise WireError(f"{path}: the dtype must be a string like '<f4', got {value!r}.")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as error:
        raise WireError(f"{path}: {value!r} is not a numpy dtype ({error}).") from error
    _check_dtype(dtype, path)
    return dtype


def _decode_array(obj: dict, path: str) -> np.ndarray:
    expected_fields = {ARRAY_MARKER, b"data", b"dtype", b"shape"}
    if set(obj) != expected_fields:
        raise WireError(
            f"{path}: an array must have exactly the fields {sorted(expected_fields)}, "
            f"got {sorted(obj, key=repr)}."
        )
    dtype = _decode_dtype(obj[b"dtype"], path)
    data, shape = obj[b"data"], obj[b"shape"]
    if not isinstance(data, bytes):
        raise WireError(f"{path}: the array data must be bytes, got {type(data).__name__}.")
    if not isinstance(shape, list) or not all(
        type(size) is int and size >= 0
        for size in shape  # bool is an int: exclude it
    ):
        raise WireError(f"{path}: the shape must be a list of non-negative ints, got {shape!r}.")
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
            f"got {sorted(obj, key=repr)}."
        )
    dtype = _decode_dtype(obj[b"dtype"], path)
    value = obj[b"data"]
    if not isinstance(value, _PLAIN_TYPES) or value is None:
        raise WireError(f"{path}: a numpy scalar's data must be a number, string or bytes.")
    try:
        return dtype.type(value)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError(
            f"{path}: {value!r} is not a valid {dtype.str} scalar ({error})."
        ) from error
