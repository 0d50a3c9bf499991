"""Decompressing a ``.xz`` file within a byte limit, refusing a bomb before it allocates.

An ``.xz`` stream ends with an index that declares every block's uncompressed size, so the
size a file expands to is known from its last bytes: :func:`read_xz` reads that index first and
refuses a file that declares more than the limit before anything is decompressed. Otherwise the
stream is decompressed into an anonymous memory map of exactly the declared size (pages are
committed only as they are written), never asking the decoder for more than the bytes still
expected plus one: a file whose blocks hold more than its index says is refused at the first
extra byte, one whose blocks hold less when they end. The decoder's own memory (its dictionary,
which a header chooses) is capped by :data:`DECODER_MEMORY_BYTES`.

Only a single stream is read (what ``xz`` and :func:`lzma.compress` write), followed by optional
stream padding; concatenated streams are refused with a way out.
"""

from __future__ import annotations

import io
import lzma
import mmap
from pathlib import Path
from typing import BinaryIO

from policy_accel.policies.errors import CheckpointFormatError, UnsafeCheckpointError

# xz -9 (the largest preset) decodes with 65 MiB; a header asking for more is not a checkpoint
DECODER_MEMORY_BYTES = 256 * 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024  # compressed input per read
OUTPUT_CHUNK_BYTES = 16 * 1024 * 1024  # the most decompressed bytes asked for at once
HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_BYTES = FOOTER_BYTES = 12
PADDING_SCAN_BYTES = 64 * 1024


def read_xz(path: Path, limit: int) -> mmap.mmap:
    """The decompressed bytes of the ``.xz`` file ``path`` as a read-ready memory map (at
    position 0; the caller closes it), refused before anything is decompressed if its index
    declares more than ``limit`` bytes, and as soon as its data passes what the index declares."""
    with path.open("rb") as file:
        declared = declared_size(path, file)
        if declared > limit:
            raise UnsafeCheckpointError(
                f"{path} declares {declared} bytes once decompressed (its .xz index), more than "
                f"the {limit} bytes a checkpoint of its size may expand to; a checkpoint of "
                "trained weights barely compresses. Refusing to decompress it."
            )
        if declared == 0:
            raise CheckpointFormatError(f"{path} decompresses to nothing; it is not a checkpoint.")
        file.seek(0)
        buffer = mmap.mmap(-1, declared)
        try:
            _decompress_into(path, file, buffer)
        except BaseException:
            buffer.close()
            raise
    buffer.seek(0)
    return buffer


def _decompress_into(path: Path, file: BinaryIO, buffer: mmap.mmap) -> None:
    """Fill ``buffer`` (the declared size) from the stream in ``file``, asking the decoder for
    at most one byte more than still fits, so an overflowing file is caught at once."""
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=DECODER_MEMORY_BYTES)
    declared = len(buffer)
    try:
        while not decompressor.eof:
            data = file.read(READ_CHUNK_BYTES) if decompressor.needs_input else b""
            if decompressor.needs_input and not data:
                raise CheckpointFormatError(f"{path} is a truncated .xz file.")
            room = declared - buffer.tell()
            part = decompressor.decompress(data, max_length=min(OUTPUT_CHUNK_BYTES, room + 1))
            if len(part) > room:
                raise UnsafeCheckpointError(
                    f"{path} decompresses to more than the {declared} bytes its .xz index "
                    "declares; the file was crafted or damaged. Refusing to decompress it further."
                )
            buffer.write(part)
    except lzma.LZMAError as error:
        if "memory" in str(error).lower():
            raise UnsafeCheckpointError(
                f"{path} needs more than {DECODER_MEMORY_BYTES} bytes of decoder memory (its "
                "dictionary); `xz -9` needs 65 MiB. Recompress it with a standard preset."
            ) from error
        raise CheckpointFormatError(f"{path} is not a valid .xz file ({error}).") from error
    if buffer.tell() != declared:
        raise CheckpointFormatError(
            f"{path} decompresses to {buffer.tell()} bytes, but its .xz index declares "
            f"{declared}; the file is damaged. Re-download or recompress it."
        )


def declared_size(path: Path, file: BinaryIO) -> int:
    """The uncompressed size the index of the single ``.xz`` stream in ``file`` declares, read
    from the end of the file (stream footer, then index) without decompressing anything."""
    end = _end_without_padding(file)
    if end < HEADER_BYTES + FOOTER_BYTES:
        raise _invalid(path, "too short for an .xz stream")
    file.seek(end - FOOTER_BYTES)
    footer = file.read(FOOTER_BYTES)
    if footer[10:] != FOOTER_MAGIC:
        raise _invalid(path, "no .xz stream footer at its end")
    index_bytes = (int.from_bytes(footer[4:8], "little") + 1) * 4
    index_start = end - FOOTER_BYTES - index_bytes
    if index_start < HEADER_BYTES:
        raise _invalid(path, "its index runs past the start of the file")
    file.seek(index_start)
    blocks, uncompressed = _parse_index(path, file.read(index_bytes))
    stream_start = index_start - blocks - HEADER_BYTES
    file.seek(max(stream_start, 0))
    if stream_start < 0 or file.read(len(HEADER_MAGIC)) != HEADER_MAGIC:
        raise _invalid(path, "no .xz stream header where its index says the blocks start")
    if stream_start > 0:
        raise CheckpointFormatError(
            f"{path} holds several concatenated .xz streams; policy_accel reads one. "
            "Recompress it as one: `xz -dc FILE | xz > FILE2`."
        )
    return uncompressed


def _end_without_padding(file: BinaryIO) -> int:
    """The file's length without trailing stream padding (null bytes, a multiple of 4)."""
    end = file.seek(0, io.SEEK_END)
    while end > 0:
        start = max(0, end - PADDING_SCAN_BYTES)
        file.seek(start)
        kept = len(file.read(end - start).rstrip(b"\0"))
        if kept:
            zeros = end - start - kept
            return end - (zeros - zeros % 4)
        end = start
    return 0


def _parse_index(path: Path, index: bytes) -> tuple[int, int]:
    """``(bytes of the blocks, uncompressed bytes)`` from an ``.xz`` index: an indicator byte 0,
    the record count, then (unpadded size, uncompressed size) per block, as multibyte ints."""
    if not index or index[0] != 0:
        raise _invalid(path, "no .xz index before its footer")
    position = 1
    count, position = _varint(path, index, position)
    blocks = uncompressed = 0
    for _ in range(count):
        unpadded, position = _varint(path, index, position)
        size, position = _varint(path, index, position)
        blocks += (unpadded + 3) // 4 * 4
        uncompressed += size
    return blocks, uncompressed


def _varint(path: Path, data: bytes, position: int) -> tuple[int, int]:
    """One xz multibyte integer (7 bits a byte, little-endian, at most 9 bytes) at ``position``."""
    value = 0
    for shift in range(0, 63, 7):
        if position >= len(data):
            raise _invalid(path, "its .xz index ends inside a record")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    raise _invalid(path, "an .xz index number longer than 9 bytes")


def _invalid(path: Path, why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path} is not a valid .xz file ({why}).")
