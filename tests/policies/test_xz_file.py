"""Bounded ``.xz`` reading: the index at the end of the file decides the size before anything is
decompressed, and a file whose blocks outgrow their index is stopped at the first extra byte."""

from __future__ import annotations

import lzma
import struct
import tracemalloc
import zlib

import pytest

from policy_accel.policies import CheckpointFormatError, UnsafeCheckpointError, xz_file
from policy_accel.policies.xz_file import read_xz

MiB = 1024 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        value, shift, position = value | (byte & 0x7F) << shift, shift + 7, position + 1
        if not byte & 0x80:
            return value, position


def with_declared_size(stream: bytes, declared: int) -> bytes:
    """A one-block .xz ``stream`` whose index (checksums and footer rewritten to match)
    declares ``declared`` uncompressed bytes: what a crafted file can do."""
    footer = stream[-12:]
    index_start = len(stream) - 12 - (struct.unpack("<I", footer[4:8])[0] + 1) * 4
    count, position = _read_varint(stream, index_start + 1)
    assert count == 1  # lzma.compress writes one block
    unpadded, _ = _read_varint(stream, position)
    index = b"\0" + _varint(1) + _varint(unpadded) + _varint(declared)
    index += b"\0" * (-(len(index) + 4) % 4)
    index += struct.pack("<I", zlib.crc32(index))
    fields = struct.pack("<I", len(index) // 4 - 1) + footer[8:10]
    return stream[:index_start] + index + struct.pack("<I", zlib.crc32(fields)) + fields + b"YZ"


def traced_peak(call) -> int:
    """Peak bytes Python allocated while ``call()`` ran (decompressed chunks are Python bytes)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_file_within_the_limit_comes_back_whole(tmp_path):
    data = bytes(range(256)) * 4096
    path = tmp_path / "ok.xz"
    path.write_bytes(lzma.compress(data) + b"\0" * 8)  # stream padding is allowed
    with read_xz(path, limit=len(data)) as buffer:
        assert len(buffer) == len(data) and buffer.read() == data


def test_a_bomb_is_refused_from_its_index_alone(tmp_path):
    path = tmp_path / "bomb.xz"
    path.write_bytes(lzma.compress(bytes(64 * MiB), preset=1))

    def load():
        with pytest.raises(UnsafeCheckpointError, match=f"declares {64 * MiB} bytes"):
            read_xz(path, limit=MiB)

    assert traced_peak(load) < 64 * 1024


def test_blocks_that_outgrow_their_index_are_stopped_at_the_first_extra_byte(tmp_path):
    path = tmp_path / "liar.xz"
    path.write_bytes(with_declared_size(lzma.compress(bytes(32 * MiB), preset=1), 64 * 1024))

    def load():
        with pytest.raises(UnsafeCheckpointError, match="more than the 65536 bytes its .xz index"):
            read_xz(path, limit=MiB)

    # the decoder's 1 MiB dictionary (preset 1), a 256 KiB read and the declared 64 KiB (+1
    # byte) of output; never a whole 16 MiB chunk
    assert traced_peak(load) < 2 * MiB


def test_blocks_that_fall_short_of_their_index_are_refused(tmp_path):
    path = tmp_path / "short.xz"
    path.write_bytes(with_declared_size(lzma.compress(bytes(1000)), 2000))
    with pytest.raises(CheckpointFormatError, match="short.xz is not a valid .xz file"):
        read_xz(path, limit=MiB)


def test_a_decoder_asking_for_too_much_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(xz_file, "DECODER_MEMORY_BYTES", MiB)
    path = tmp_path / "big_dictionary.xz"
    path.write_bytes(lzma.compress(bytes(1000), preset=6))  # an 8 MiB dictionary
    with pytest.raises(UnsafeCheckpointError, match="big_dictionary.xz needs more than 1048576"):
        read_xz(path, limit=MiB)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not an xz file, only some text " * 4, "no .xz stream footer"),
        (b"", "too short"),
        (lzma.compress(b"a") + lzma.compress(b"b"), "several concatenated .xz streams"),
        (lzma.compress(b"abc")[:-1] + b"X", "no .xz stream footer"),
        (lzma.compress(b"abc")[6:], "no .xz stream header"),
    ],
    ids=["text", "empty", "concatenated", "footer", "header"],
)
def test_malformed_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.xz"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=f"bad.xz .*{message}"):
        read_xz(path, limit=MiB)
