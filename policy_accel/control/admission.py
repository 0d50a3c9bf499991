"""Keeping a websocket server's connections bounded, before and after their opening handshake.

websockets' threading server gives every accepted TCP connection a handler thread, a reader
thread and four descriptors (the socket, a wake-up socket pair, a selector) for up to its open
timeout, before any header is read: before an API key or a connection cap can be checked. A
flood of connections that never send a header then exhausted the process's descriptors, and the
library's accept loop ends on the first ``accept()`` error, so the server returned with status 0
(measured: ~270 silent connections under a soft ``nofile`` limit of 1024). This module bounds
each phase:

- **Before the handshake** a connection that has sent nothing waits in the accept loop's
  selector (one descriptor, no thread); at most ``max_pending`` wait so, and as many again
  whose first bytes arrived wait in their handshake with a thread; one more in either pool
  closes the one that has waited longest (in the selector's pool, unless its first bytes are
  there already: then it gets its handler) (a robot completes its handshake in milliseconds, a
  silent connection never does, so a robot gets in during a flood).
- **Admitted** connections take one of ``max_connections`` slots atomically (the count and the
  check under one lock), optionally with slots that only clients with the API key may take.
- **The accept loop** (:func:`accept_forever`) backs off on ``accept()`` errors (no descriptors
  left, out of memory) and serves on; it returns only when the server shuts down.
- :func:`raise_open_file_limit` lifts the soft ``nofile`` limit to the hard one at start.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

from websockets.protocol import State
from websockets.sync.server import Server, ServerConnection

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 64
ACCEPT_BACKOFF_S = (0.01, 1.0)  # first and longest pause after a failed accept()
LOG_EVERY_S = 10.0  # at most one log line per this many seconds about failed accepts
# descriptors a connection holds in the server: its socket, the reader's wake-up pair and its
# selector (measured: 4), plus one of margin
DESCRIPTORS_PER_CONNECTION = 5
RESERVED_DESCRIPTORS = 64  # the interpreter, the policy's files, logging (a serving process: ~10)
MIN_PENDING = 4


class Admission:
    """Slots for admitted connections and the bounded pool of connections still in their
    handshake; thread-safe (every method holds one lock).

    Args:
        max_connections: admitted connections at once.
        max_pending: connections waiting for their handshake at once; one more evicts the
            oldest.
        max_keyless: of ``max_connections``, how many clients without the API key may hold (the
            rest are reserved for clients with the key); ``None``: no limit by key.
    """

    def __init__(self, max_connections: int, max_pending: int, max_keyless: int | None) -> None:
        self.max_connections, self.max_pending, self.max_keyless = (
            max_connections,
            max_pending,
            max_keyless,
        )
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, ServerConnection] = OrderedDict()
        self._slots: dict[int, bool] = {}  # id(connection) -> holds the key
        self.evicted = 0  # connections closed before their handshake (a counter tests read)

    @property
    def connections(self) -> int:
        """Connections holding a slot now (admitted, or answering their handshake)."""
        return len(self._slots)

    @property
    def pending(self) -> int:
        """Connections accepted whose handshake has not ended."""
        return len(self._pending)

    def arrived(self, connection: ServerConnection) -> None:
        """A connection was accepted: it waits for its handshake; the oldest waiting one is
        closed if the pool is full."""
        with self._lock:
            self._pending[id(connection)] = connection
            full = len(self._pending) > self.max_pending
        if full:
            self.evict_oldest()  # its handshake then ends at once, its threads with it

    def count_eviction(self) -> None:
        """A connection was closed before its handshake to make room (the accept loop's)."""
        with self._lock:
            self.evicted += 1

    def evict_oldest(self) -> bool:
        """Close the connection that has waited longest for its handshake (descriptors ran
        out); whether there was one."""
        with self._lock:
            if not self._pending:
                return False
            _, oldest = self._pending.popitem(last=False)
            self.evicted += 1
        oldest.close_socket()
        return True

    def take_slot(self, connection: ServerConnection, keyed: bool) -> str | None:
        """Admit ``connection`` (checked and counted under one lock); the refusal's reason
        when every slot it may take is held."""
        with self._lock:
            if len(self._slots) >= self.max_connections:
                return f"the server is at its limit of {self.max_connections} connections"
            if not keyed and self.max_keyless is not None:
                keyless = sum(1 for has_key in self._slots.values() if not has_key)
                if keyless >= self.max_keyless:
                    return (
                        f"the {self.max_keyless} connection slot(s) open to clients without the "
                        "API key are taken (the rest are reserved for clients with the key)"
                    )
            self._slots[id(connection)] = keyed
            return None

    def handshake_ended(self, connection: ServerConnection) -> None:
        """The handshake is over: the connection leaves the pending pool, and gives its slot
        back if it did not open."""
        with self._lock:
            self._pending.pop(id(connection), None)
            if connection.protocol.state is not State.OPEN:
                self._slots.pop(id(connection), None)

    def release(self, connection: ServerConnection) -> None:
        """An admitted connection closed: its slot is free."""
        with self._lock:
            self._slots.pop(id(connection), None)


class AdmittedConnection(ServerConnection):
    """A websockets server connection that reports its handshake to an :class:`Admission`."""

    def __init__(self, *args: Any, admission: Admission, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admission = admission
        admission.arrived(self)

    def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().handshake(*args, **kwargs)
        finally:
            self.admission.handshake_ended(self)


def accept_forever(
    server: Server, stopping: threading.Event, admission: Admission, open_timeout: float
) -> None:
    """websockets' ``Server.serve_forever`` loop with the pre-handshake phase bounded.

    An accepted connection waits in this thread's selector, holding one descriptor and no
    thread, until its first bytes arrive; only then does it get websockets' handler thread (and
    join :class:`Admission`'s pending pool). At most ``admission.max_pending`` wait at once: one
    more closes the one that has waited longest, and one waiting ``open_timeout`` seconds is
    closed. A failed ``accept()`` (no descriptors left, no memory) closes the oldest waiting
    and pending connections, pauses and serves on, with one warning per ``LOG_EVERY_S``. Returns
    when ``server.shutdown()`` closes the listening socket."""
    poller = selectors.DefaultSelector()
    poller.register(server.shutdown_watcher, selectors.EVENT_READ, "shutdown")
    poller.register(server.socket, selectors.EVENT_READ, "listen")
    waiting: OrderedDict[socket.socket, tuple[Any, float]] = OrderedDict()
    pause, failures, logged = ACCEPT_BACKOFF_S[0], 0, 0.0

    def drop(sock: socket.socket) -> None:
        waiting.pop(sock, None)
        poller.unregister(sock)
        sock.close()
        admission.count_eviction()

    def make_room() -> None:
        """Free the longest-waiting slot: a connection whose first bytes already arrived (the
        selector has not said so yet) gets its handler; a silent one is closed."""
        sock = next(iter(waiting))
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            drop(sock)  # silent since it connected
            return
        except OSError:
            data = b""
        if not data:
            drop(sock)  # closed by its client
            return
        address, _ = waiting.pop(sock)
        poller.unregister(sock)
        _start_handler(server, sock, address)

    try:
        while not stopping.is_set():
            timeout = None
            if waiting:
                oldest = next(iter(waiting.values()))[1]
                timeout = max(0.0, oldest + open_timeout - time.monotonic())
            ready = poller.select(timeout)
            now = time.monotonic()
            for sock in [s for s, (_, since) in waiting.items() if now - since >= open_timeout]:
                drop(sock)  # sent nothing within the open timeout
            for key, _ in ready:
                if key.data == "shutdown":
                    return
                if key.data != "listen" and key.fileobj in waiting:
                    sock = key.fileobj
                    address, _ = waiting.pop(sock)
                    poller.unregister(sock)
                    _start_handler(server, sock, address)  # its first bytes arrived
            if not any(key.data == "listen" for key, _ in ready):
                continue
            try:
                sock, address = server.socket.accept()
            except OSError as error:
                if stopping.is_set() or server.socket.fileno() == -1:
                    return
                failures += 1
                if waiting:  # descriptors for the next connection
                    drop(next(iter(waiting)))
                admission.evict_oldest()
                if now - logged >= LOG_EVERY_S:
                    logger.warning(
                        "accepting a connection failed %d time(s) (%s); pausing %.2f s and "
                        "serving on (raise the open-file limit or lower max_pending if this "
                        "persists)",
                        failures,
                        error,
                        pause,
                    )
                    logged, failures = now, 0
                if stopping.wait(pause):
                    return
                pause = min(pause * 2, ACCEPT_BACKOFF_S[1])
                continue
            pause = ACCEPT_BACKOFF_S[0]
            while len(waiting) >= admission.max_pending:
                make_room()
            waiting[sock] = (address, now)
            poller.register(sock, selectors.EVENT_READ, "waiting")
    finally:
        for sock in list(waiting):
            sock.close()
        server.socket_closed.set()
        server.shutdown_watcher.close()
        poller.close()


def _start_handler(server: Server, sock: socket.socket, address: Any) -> None:
    """websockets' handler thread for a connection whose handshake has begun (registered as
    websockets registers its own, so that shutdown waits for it)."""
    thread = threading.Thread(target=server.handler, args=(sock, address), daemon=True)
    with server.lock:
        server.handler_threads.add(thread)
    try:
        thread.start()
    except RuntimeError:  # no thread could be started: refuse this one, serve on
        with server.lock:
            server.handler_threads.discard(thread)
        sock.close()


def raise_open_file_limit() -> int:
    """Lift the soft ``nofile`` limit of this process to its hard limit (where the platform
    has one); returns the soft limit now in force (0 where unknown)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # kept as it was
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def pending_within(limit: int, max_connections: int, max_pending: int) -> int:
    """The most pending handshakes (at most ``max_pending``, at least ``MIN_PENDING``) whose
    descriptors fit the open-file ``limit`` beside ``max_connections`` admitted connections;
    ``max_pending`` where the limit is unknown (0). Descriptors that never run out keep every
    file the server opens later working (the first plan's lazy TorchScript compilation read
    its sources and failed with EMFILE under a flood)."""
    if not limit:
        return max_pending
    room = limit - RESERVED_DESCRIPTORS - max_connections * DESCRIPTORS_PER_CONNECTION
    # each pending slot: one connection waiting for its first bytes, one in its handshake
    return max(MIN_PENDING, min(max_pending, room // (DESCRIPTORS_PER_CONNECTION + 1)))
