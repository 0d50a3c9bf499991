"""The server's transport under hostile connections: floods of connections that never handshake
(under a small open-file limit), idle clients holding slots, simultaneous handshakes against the
cap, slots reserved for clients with the key, malformed headers, and the exit on a signal."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from policy_accel.control import PolicyClient, PolicyServer
from policy_accel.control.wire import pack
from tests.shared_fixtures import ROOT

SEQUENTIAL = {"method": "sequential", "seed": 5}
OBS = {"obs": np.full(20, 250.0, np.float32)}


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _infer_once(port: int, timeout: float = 10.0) -> dict:
    """One request from a new connection, retried while the server turns it away."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with PolicyClient("127.0.0.1", port) as client:
                return client.infer(OBS)
        except (ConnectionError, OSError, ConnectionClosed) as error:  # evicted: try again
            last = error
            time.sleep(0.1)
    raise AssertionError(f"no reply within {timeout} s: {last!r}")


def _silent_connections(port: int, count: int) -> list[socket.socket]:
    """TCP connections that never send a byte (a connection flood)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(2.0)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:  # the backlog is full: the flood goes on regardless
            sock.close()
            continue
        sockets.append(sock)
    return sockets


def test_a_flood_of_silent_connections_under_a_small_file_limit_never_stops_the_server():
    """600 connections that never handshake, against a server whose hard open-file limit (256)
    is far below what they would take: before, websockets' accept loop ended on the first
    EMFILE and the process exited 0 without a word (and a plan that opened a file then
    failed)."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))"
    main = "from policy_accel.cli import main; raise SystemExit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", f"{limit}; {main}",
         "serve", str(ROOT / "checkpoints/pusht_keypoints"), "--port", "0", "--method",
         "sequential", "--steps", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    flood: list[socket.socket] = []
    try:
        line = process.stdout.readline()
        assert "serving" in line, line + process.stderr.read()
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        stop = threading.Event()

        def keep_flooding() -> None:
            while not stop.is_set() and len(flood) < 600:
                flood.extend(_silent_connections(port, 50))

        flood.extend(_silent_connections(port, 300))  # more than it has descriptors for
        assert len(flood) > 256
        flooder = threading.Thread(target=keep_flooding)
        flooder.start()
        during = _infer_once(port)  # a robot connects while the flood goes on
        stop.set()
        flooder.join()
        assert during["actions"].shape == (8, 2)
        assert process.poll() is None
        for sock in flood:
            sock.close()
        assert _infer_once(port)["actions"].shape == (8, 2)  # and after it
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 128 + signal.SIGTERM  # non-zero, the shell's code
        log = process.stderr.read()
        assert "stopped by SIGTERM" in log
        # the pending handshakes were bounded to what the descriptors allow
        assert re.search(r"leaves room for \d+ pending handshakes beside 32 connections", log)
    finally:
        for sock in flood:
            sock.close()
        process.kill()
        process.communicate()


def test_pending_handshakes_are_bounded_oldest_first(tiny_pusht_policy):
    with PolicyServer(tiny_pusht_policy, port=0, max_pending=4, **SEQUENTIAL) as server:
        silent = _silent_connections(server.port, 10)
        try:
            assert _wait_for(lambda: server.admission.evicted >= 6)
            assert server.admission.pending <= 4
            # the oldest were closed by the server: reading them gives EOF at once
            silent[0].settimeout(2.0)
            assert silent[0].recv(1) == b""
            with PolicyClient("127.0.0.1", server.port) as client:
                assert client.infer(OBS)["actions"].shape == (8, 2)
        finally:
            for sock in silent:
                sock.close()


def test_idle_connections_are_closed_and_free_their_slots(tiny_pusht_policy):
    with PolicyServer(
        tiny_pusht_policy, port=0, max_connections=2, idle_timeout_s=0.6, **SEQUENTIAL
    ) as server:
        idle = [connect(f"ws://127.0.0.1:{server.port}", legacy=True) for _ in range(2)]
        for connection in idle:
            connection.recv(timeout=5)  # the metadata
        with pytest.raises(ConnectionError, match="HTTP 503"):
            PolicyClient("127.0.0.1", server.port)
        # a busy client is not idle: requests every 0.3 s keep it open past the timeout
        busy_replies = []
        for connection in idle:
            with pytest.raises(ConnectionClosed) as closed:
                connection.recv(timeout=5)
            assert "no request for 0.6 s" in closed.value.rcvd.reason
        assert _wait_for(lambda: server.connections == 0)
        with PolicyClient("127.0.0.1", server.port) as client:
            for _ in range(4):
                busy_replies.append(client.infer(OBS))
                time.sleep(0.3)
        assert len(busy_replies) == 4


def test_admission_is_atomic_under_simultaneous_handshakes(tiny_pusht_policy):
    """80 clients handshaking at once against a cap of 8: exactly 8 get in (34 of 32 did)."""
    with PolicyServer(
        tiny_pusht_policy, port=0, max_connections=8, max_pending=128, **SEQUENTIAL
    ) as server:
        barrier, admitted, refused, held = threading.Barrier(80), [], [], []
        lock = threading.Lock()

        def client() -> None:
            barrier.wait()
            try:
                connection = connect(f"ws://127.0.0.1:{server.port}", open_timeout=20, legacy=True)
            except InvalidStatus as error:
                with lock:
                    refused.append(error.response.status_code)
                return
            with lock:
                admitted.append(1)
                held.append(connection)

        threads = [threading.Thread(target=client) for _ in range(80)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        try:
            assert len(admitted) == 8 and server.connections == 8
            assert refused == [503] * 72
        finally:
            for connection in held:
                connection.close()


def test_slots_can_be_reserved_for_clients_with_the_key(tiny_pusht_policy):
    with PolicyServer(
        tiny_pusht_policy,
        port=0,
        api_key="s3cret",
        max_connections=3,
        max_keyless_connections=1,
        **SEQUENTIAL,
    ) as server:
        keyless = PolicyClient("127.0.0.1", server.port)
        with pytest.raises(ConnectionError, match="HTTP 503.*reserved for clients with the key"):
            PolicyClient("127.0.0.1", server.port)
        keyed = [PolicyClient("127.0.0.1", server.port, api_key="s3cret") for _ in range(2)]
        assert keyed[1].infer(OBS)["actions"].shape == (8, 2)
        with pytest.raises(ConnectionError, match="HTTP 503"):
            PolicyClient("127.0.0.1", server.port, api_key="s3cret")  # all three slots held
        for client in [keyless, *keyed]:
            client.close()
    with pytest.raises(ValueError, match="set api_key too"):
        PolicyServer(tiny_pusht_policy, port=0, max_keyless_connections=1)


def test_two_authorization_headers_are_a_bad_request_not_a_server_error(tiny_pusht_policy, caplog):
    with PolicyServer(tiny_pusht_policy, port=0, api_key="s3cret", **SEQUENTIAL) as server:
        with caplog.at_level("ERROR"):
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                    sock.sendall(
                        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                        b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\nAuthorization: Api-Key s3cret\r\n"
                        b"Authorization: Api-Key other\r\n\r\n"
                    )
                    response = sock.recv(4096)
                assert response.startswith(b"HTTP/1.1 400"), response
                assert b"send exactly one" in response
        assert not caplog.records  # no traceback, no error line
        with PolicyClient("127.0.0.1", server.port, api_key="s3cret") as client:
            assert client.infer(OBS)["actions"].shape == (8, 2)


def test_a_closed_connection_releases_its_planner_thread(tiny_pusht_policy):
    """Warm chord with ``jacobian_stride`` refreshes its Jacobians on a thread of the
    connection's Planner: the thread ends with the connection (Planner.close had no caller)."""

    def refreshers() -> int:
        return sum(t.name.startswith("policy-accel-jacobians") for t in threading.enumerate())

    before = refreshers()
    with PolicyServer(tiny_pusht_policy, port=0, seed=1, jacobian_stride=5) as server:
        with PolicyClient("127.0.0.1", server.port) as client:
            for _ in range(2):
                client.infer(OBS)
            assert _wait_for(lambda: refreshers() > before)
        assert _wait_for(lambda: refreshers() == before)


def test_connections_still_send_requests_after_a_refused_one(tiny_pusht_policy):
    """The idle timer counts from the last request, refused ones included."""
    with PolicyServer(tiny_pusht_policy, port=0, idle_timeout_s=0.8, **SEQUENTIAL) as server:
        with connect(f"ws://127.0.0.1:{server.port}") as connection:
            connection.recv(timeout=5)
            for _ in range(4):
                time.sleep(0.4)
                connection.send(pack({"bad": 1}))
                assert isinstance(connection.recv(timeout=5), str)  # refused, still open


class _FailingAccepts:
    """A listening socket whose next ``failures`` accepts fail as when descriptors run out."""

    def __init__(self, sock: socket.socket, failures: int) -> None:
        self.sock, self.failures = sock, failures

    def accept(self):
        if self.failures:
            self.failures -= 1
            raise OSError(24, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


def test_failed_accepts_pause_and_serve_on(tiny_pusht_policy, caplog):
    with PolicyServer(tiny_pusht_policy, port=0, **SEQUENTIAL) as server:
        listener = server._server
        listener.socket = _FailingAccepts(listener.socket, failures=5)
        with caplog.at_level("WARNING", logger="policy_accel.control.admission"):
            with PolicyClient("127.0.0.1", server.port) as client:  # waits out the pauses
                assert client.infer(OBS)["actions"].shape == (8, 2)
        assert listener.socket.failures == 0
        assert "accepting a connection failed" in caplog.text
