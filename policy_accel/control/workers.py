"""A fixed pool of daemon worker threads for the server's decoding and planning.

``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit, so one plan still
running (a cold Newton plan takes seconds on a CPU) held a stopping server open. Daemon workers
let ``policy-accel serve`` exit within a second of SIGTERM; :meth:`WorkerPool.shutdown` waits for
running jobs only as long as it is told to.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class WorkerPool:
    """``submit(fn, *args) -> Future``, run by ``workers`` daemon threads in arrival order."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}.")
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        if self._closed:
            raise RuntimeError("the worker pool is shut down.")
        future: Future = Future()
        self._jobs.put((future, function, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, function, args = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as error:  # delivered to whoever waits on the future
                    forget_frames(error)
                    future.set_exception(error)
            del future, function, args  # nothing of a finished job stays referenced here

    def shutdown(self, timeout: float) -> bool:
        """Stop taking jobs, cancel the queued ones and wait at most ``timeout`` seconds for the
        running ones; returns whether every worker finished."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


def forget_frames(error: BaseException) -> None:
    """Clear the local variables of every frame in ``error``'s tracebacks (its cause and context
    included). An exception raised inside ``except ... as e`` forms a reference cycle with its
    frames, which keep a failed job's arguments (a request of megabytes) alive until the garbage
    collector runs: measured, a flood of refused 8 MiB requests left 100-200 MB resident."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]
