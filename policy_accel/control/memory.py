"""Keeping a long-running server's memory at its working set (glibc's allocator; a no-op where
there is no glibc).

glibc gives each thread that allocates a heap ("arena") of its own, up to 8 per core, serves
blocks of a few MiB from those heaps once such a block was freed (its mmap threshold rises), and
keeps a heap's pages after the blocks in them are freed. A server that receives megabyte frames
on many connection threads and plans on several worker threads then grows for good. Measured
with ``benchmarks/fuzz_server.py`` on the shipped PushT policy: 8 clients sending 8 MiB requests
left the server 115 MB larger without trimming; the full fuzz run left it 70-80 MB larger with
trimming but a heap per thread, 48 MB with two heaps.
"""

from __future__ import annotations

import ctypes

BIG_REQUEST_BYTES = 1024 * 1024
HEAP_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None  # not glibc


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (``malloc_trim``; microseconds when little is free).
    The server calls it after each big request and when a connection closes."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_heap_arenas(arenas: int = HEAP_ARENAS) -> None:
    """Let the threads of this process share ``arenas`` heaps instead of one each (process
    wide; call before the threads start). Plan latency on the shipped PushT policy did not
    change measurably (360-440 ms either way, within run-to-run noise on this CPU)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)
