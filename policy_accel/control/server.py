"""An openpi-compatible websocket policy server: one :class:`Controller` per connection.

Protocol (that of openpi's ``WebsocketPolicyServer``, so ``openpi_client``'s
``WebsocketClientPolicy`` drives it unchanged; messages are :mod:`policy_accel.control.wire`):

1. On connect the server sends one binary frame, the metadata (:attr:`PolicyServer.metadata`):
   ``protocol``, ``policy``, ``observation_spec`` (key -> per-step shape), ``n_obs_steps``,
   ``horizon``, ``action_dim``, ``n_action_steps``, ``num_inference_steps``, ``method``,
   ``solver_options``, ``warm_start``, ``budget_ms``, ``fallback_steps``, ``seed``,
   ``reset_key`` and ``max_message_bytes``.
2. Lockstep: each binary request is ONE observation step ``{key: array of the per-step shape}``
   (the server keeps the ``n_obs_steps`` history); the reply is ``{"actions": float32
   (n_action_steps, action_dim), "server_timing": {"infer_ms", "prev_total_ms"}, "policy_timing":
   {"infer_ms", "rounds", "model_evals", "converged", "warm", "deadline_hit", "fallback"}}``.
   ``server_timing.infer_ms`` is the wall time of the plan as the server saw it (including any wait
   for a worker thread), ``prev_total_ms`` the previous inference's receive-to-sent time (absent on
   a connection's first, as in openpi), ``policy_timing.infer_ms`` the Controller's own latency.
3. A refused request (malformed msgpack, not a map, a missing or unexpected key, a wrong shape or
   dtype, NaN/Inf, values outside the bound around the policy's training range (see
   :mod:`~policy_accel.policies.observations`; with ``out_of_range="flag"`` such a request is
   served and the reply carries ``"out_of_range": {key: what}``), a timing key the last reply
   cannot honour, a text frame, a decode that runs past ``request_timeout_s``) is answered with a
   TEXT frame naming the problem (at most ``messages.MESSAGE_LIMIT`` characters) and changes
   nothing: the connection stays open and its Controller is untouched. A plan that fails after
   the request was accepted is also answered with a text frame and also leaves the Controller as
   it was. openpi's client raises ``RuntimeError`` on a text reply; ours raises ``ServerError``.

Timing keys (optional, for real-time clients): ``"__executed__": k``, the actions of the last
reply executed before this observation's step (the warm start's shift; default: as a lockstep
client, none counted), and ``"__committed__": c``, the further actions of the last reply the
robot executes while this request is planned: they are inpainted into the new chunk, which then
continues them (real-time chunking); with ``"__overlap__": True`` the rest of the last plan
after those is followed softly too (RTC's decaying prefix schedule, ``soft_inpaint``). The
reply's ``policy_timing`` says what was done (``executed``, ``committed``, ``overlap``). The keys
count actions of this episode's last reply, so they are refused, naming the counts and the
limit, where they cannot be honoured: ``executed + committed`` beyond the actions that reply
held, on an ``__observe__`` or reset-only request (which plan nothing), and on the first request
of a connection or an episode (no reply to count against).

History. The server keeps the ``n_obs_steps`` history from the observations it receives, so a
client that executes several actions between plans should send the steps in between with
``"__observe__": True`` (recorded, not planned; answered ``{"observed": True}``), or the policy
sees a history with gaps (DiffusionPolicy was trained on consecutive steps).

Reset. A new connection is a new episode: a fresh Controller (empty history, generator seeded with
``seed``, so a connection's chunks equal a local ``Controller(policy, ..., seed=seed)``'s). The
reserved key ``"__reset__": True`` resets the connection's Controller (its generator continues
its stream, as ``Controller.reset`` does). Sent alone it is answered ``{"reset": True}``; sent
with observation keys it resets and then plans from that observation, the first step of the new
episode in one round trip, and the reply carries ``"reset": True`` beside the actions.

Concurrency. Every connection has its own thread (websockets' threading server): a connection
receiving a frame of megabytes or waiting for its plan never delays another one, pings or
``/healthz`` (an asyncio loop serving all connections answered ``/healthz`` in 120-240 ms while
8 clients sent 8 MiB frames; see ``benchmarks/fuzz_server.py``). Requests are decoded and
validated on ``decode_workers`` threads within ``request_timeout_s`` and bounded in work
(:class:`~policy_accel.control.wire.DecodeLimits`); plans run on ``max_workers`` threads.
Connections share one policy: its networks are in eval mode and only read, under
``torch.no_grad`` (grad mode is thread-local); forward-mode JVPs, whose state torch keeps per
process, are serialised by :mod:`policy_accel.execution.autodiff`; schedulers are copied before
``set_timesteps``, rules are cached under a lock, and each Controller owns its noise generator.
Only its own connection's thread touches a Controller, one request at a time.

Limits. The transport refuses a frame over ``max_message_bytes`` (close code 1009, "message too
big") and queues at most ``MAX_QUEUED_FRAMES`` frames per connection; at most ``max_connections``
clients are connected at once (others get HTTP 503; the slot is counted and checked under one
lock), so the server's memory is bounded by about ``max_connections * (MAX_QUEUED_FRAMES + 1) *
max_message_bytes`` plus the policy. Before its handshake a connection holds a thread and
descriptors: at most ``max_pending`` wait at once (fewer where the open-file limit, raised to
its hard limit at start, has no room for them), and one more closes the one that has waited
longest, so a flood of silent connections neither exhausts descriptors nor keeps a robot out
(:mod:`~policy_accel.control.admission`). A failed ``accept()`` pauses and serves on. A
connection that sends no request for ``idle_timeout_s`` is closed (code 1000, the reason says
why), so idle clients do not hold slots for good.

Access. The server listens on 127.0.0.1 by default. With ``api_key`` set, a client must send the
header ``Authorization: Api-Key <key>`` (what ``openpi_client``'s ``api_key`` sends) or gets
HTTP 401 (two ``Authorization`` headers: HTTP 400); ``/healthz`` stays open.
``max_keyless_connections`` lets that many clients in without the key and reserves the other
slots for clients with it. Listening beyond loopback without a key logs a warning.

Shutdown. SIGINT/SIGTERM (or :meth:`PolicyServer.stop`) closes the connections and returns within
about a second; a plan still running then is abandoned (the workers are daemon threads).
:meth:`PolicyServer.serve_forever` logs the signal and returns its number (``policy-accel serve``
exits with 128 + it); it never returns otherwise. A client that does not complete its opening
handshake within ``OPEN_TIMEOUT_S`` is dropped.
"""

from __future__ import annotations

import gc
import hmac
import http
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as websocket_serve

from policy_accel.control import wire
from policy_accel.control.admission import (
    DEFAULT_MAX_PENDING,
    Admission,
    AdmittedConnection,
    accept_forever,
    pending_within,
    raise_open_file_limit,
)
from policy_accel.control.config import SamplerConfig
from policy_accel.control.controller import Controller
from policy_accel.control.memory import BIG_REQUEST_BYTES, limit_heap_arenas, release_freed_memory
from policy_accel.control.workers import WorkerPool, forget_frames
from policy_accel.messages import bounded, preview
from policy_accel.policies.base import ObservationError, Policy, describe_spec
from policy_accel.policies.loading import load_policy
from policy_accel.policies.observations import out_of_range_keys

logger = logging.getLogger(__name__)

RESET_KEY = wire.RESET_KEY
EXECUTED_KEY = wire.EXECUTED_KEY
COMMITTED_KEY = wire.COMMITTED_KEY
OVERLAP_KEY = wire.OVERLAP_KEY
OBSERVE_KEY = wire.OBSERVE_KEY
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_REQUEST_TIMEOUT_S = 5.0
# lockstep clients have one request in flight; a few more frames are queued, never 16 x 32 MiB
MAX_QUEUED_FRAMES = 1
SHUTDOWN_GRACE_S = 0.5
OPEN_TIMEOUT_S = 5.0  # a client that does not finish its handshake in time is dropped
DEFAULT_IDLE_TIMEOUT_S = 60.0
# connections the kernel queues for accept(): Python's default (128) overflowed under a flood of
# silent connections, and a dropped SYN costs a client (a robot, a /healthz probe) a 1 s retry
LISTEN_BACKLOG = 1024
OUT_OF_RANGE_CHOICES = ("refuse", "flag")

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RESET_KEY",
    "PolicyServer",
    "RequestError",
    "check_request",
    "serve",
]


class RequestError(ValueError):
    """A request the server refuses; its text goes back to the client as a text frame."""


def check_request(
    payload: dict, policy: Policy, out_of_range: str = "refuse"
) -> dict[str, np.ndarray]:
    """One observation step validated against the policy (exactly its keys, each a numpy array
    of the per-step shape, finite, and within the bound around the training range unless
    ``out_of_range="flag"``), as float32 copies; raises :class:`RequestError` naming the key,
    what was expected and why."""
    spec = policy.observation_spec
    payload = policy.rename_observation(payload)
    missing = [key for key in spec if key not in payload]
    unexpected = [key for key in payload if key not in spec]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing key(s) {preview(missing)}")
        if unexpected:
            problems.append(f"unexpected key(s) {preview(unexpected)}")
        raise RequestError(
            f"observation has {' and '.join(problems)}; this policy takes one step of "
            f"{describe_spec(spec)} per request (plus {RESET_KEY!r}: True to reset)."
        )
    for key, shape in spec.items():
        if not isinstance(payload[key], (np.ndarray, np.generic)):
            raise RequestError(
                f"obs[{key!r}] is a {type(payload[key]).__name__}; expected a float array of "
                f"shape {tuple(shape)} (one step), sent as a msgpack-numpy array."
            )
    try:
        return policy.check_observation_step(
            payload, out_of_range="accept" if out_of_range == "flag" else "refuse"
        )
    except ObservationError as error:
        raise RequestError(str(error)) from error


class PolicyServer:
    """Serves ``policy`` over websockets, one :class:`Controller` per connection (module docs).

    Args:
        policy: a loaded policy, shared by all connections.
        host, port: where to listen; ``port=0`` picks a free port, and ``port`` holds the bound
            one once the server listens.
        sampler: how every connection's Controller samples
            (:class:`~policy_accel.control.config.SamplerConfig`); ``settings`` are shortcuts for
            its fields and solver options (``method="taa", tolerance=1e-4``).
        n_action_steps, seed: the Controllers' chunk length and noise seed.
        max_message_bytes: the largest request frame accepted (larger frames close the
            connection with code 1009).
        max_workers: threads that run plans; concurrent connections plan in parallel up to this.
        decode_workers: threads that decode and validate requests.
        max_connections: clients connected at once; more get HTTP 503 (checked and counted
            atomically).
        request_timeout_s: a request not decoded and validated within this time gets an error.
        api_key: when set, clients must send ``Authorization: Api-Key <key>``.
        max_keyless_connections: with ``api_key`` set, up to this many clients without the key
            are served too, and the other ``max_connections`` slots are reserved for clients
            with the key (default 0: every client needs the key).
        idle_timeout_s: a connection that sends no request for this long is closed (pings do
            not count; a plan in progress does not count as idle); None: never.
        max_pending: connections that may wait for their opening handshake at once (each
            holds a thread and descriptors before any header is read); one more closes the
            one that has waited longest.
        out_of_range: an observation outside the bound around the policy's training range
            (:mod:`~policy_accel.policies.observations`) is refused (``"refuse"``, the
            default) or served with ``"out_of_range": {key: what}`` in the reply (``"flag"``).
    """

    def __init__(
        self,
        policy: Policy,
        sampler: SamplerConfig | None = None,
        *,
        host: str = DEFAULT_HOST,
        port: int = 8000,
        n_action_steps: int | None = None,
        seed: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int = 4,
        decode_workers: int = 2,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        api_key: str | None = None,
        max_keyless_connections: int = 0,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        out_of_range: str = "refuse",
        **settings: Any,
    ) -> None:
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_workers", max_workers),
            ("decode_workers", decode_workers),
            ("max_connections", max_connections),
            ("max_pending", max_pending),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s!r}.")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(
                f"idle_timeout_s must be positive or None (never), got {idle_timeout_s!r}."
            )
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None.")
        if not isinstance(max_keyless_connections, int) or not (
            0 <= max_keyless_connections <= max_connections
        ):
            raise ValueError(
                f"max_keyless_connections must be an int from 0 to max_connections="
                f"{max_connections}, got {max_keyless_connections!r}."
            )
        if max_keyless_connections and api_key is None:
            raise ValueError(
                "max_keyless_connections reserves slots for clients with the API key: set "
                "api_key too (without a key every client is keyless)."
            )
        if out_of_range not in OUT_OF_RANGE_CHOICES:
            raise ValueError(
                f"out_of_range must be one of {list(OUT_OF_RANGE_CHOICES)}, got {out_of_range!r}."
            )
        self.sampler = SamplerConfig.from_settings(sampler, **settings)  # invalid: fails now
        self.policy = policy
        self.host = host
        self.port = port
        self.max_message_bytes = int(max_message_bytes)
        self.max_workers = int(max_workers)
        self.decode_workers = int(decode_workers)
        self.max_connections = int(max_connections)
        self.request_timeout_s = float(request_timeout_s)
        self.idle_timeout_s = None if idle_timeout_s is None else float(idle_timeout_s)
        self.max_pending = int(max_pending)
        self.out_of_range = out_of_range
        self._api_key = api_key
        self.max_keyless_connections = max_keyless_connections if api_key is not None else None
        self.n_action_steps, self.seed = n_action_steps, seed
        controller = self.new_controller()  # invalid settings fail here, before serving
        self.metadata: dict[str, Any] = {
            "protocol": "openpi",
            "server": "policy_accel",
            "policy": type(policy).__name__,
            "observation_spec": {k: list(v) for k, v in policy.observation_spec.items()},
            "n_obs_steps": policy.n_obs_steps,
            "horizon": policy.horizon,
            "action_dim": policy.action_dim,
            "n_action_steps": controller.n_action_steps,
            "num_inference_steps": controller.planner.num_steps,
            "method": self.sampler.method,
            "solver_options": dict(self.sampler.options),
            "warm_start": self.sampler.warm_start,
            "budget_ms": self.sampler.budget_ms,
            "fallback_steps": self.sampler.fallback_steps,
            "scheduler": type(controller.planner.scheduler).__name__,
            "seed": seed,
            "reset_key": RESET_KEY,
            "executed_key": EXECUTED_KEY,
            "committed_key": COMMITTED_KEY,
            "overlap_key": OVERLAP_KEY,
            "observe_key": OBSERVE_KEY,
            "max_message_bytes": self.max_message_bytes,
            "idle_timeout_s": self.idle_timeout_s,
            "out_of_range": self.out_of_range,
        }
        self._metadata_frame = wire.pack(self.metadata)
        self._server = None
        self._stopping = threading.Event()
        self._plans: WorkerPool | None = None
        self._decoders: WorkerPool | None = None
        self._thread: threading.Thread | None = None
        self.admission = self._new_admission()
        self.stopped_by: int | None = None  # the signal that stopped serve_forever

    def new_controller(self) -> Controller:
        """A fresh Controller with the server's settings (what each connection gets)."""
        return Controller(
            self.policy,
            self.sampler,
            n_action_steps=self.n_action_steps,
            seed=self.seed,
            out_of_range="accept" if self.out_of_range == "flag" else "refuse",
        )

    def _new_admission(self, file_limit: int = 0) -> Admission:
        """Admission for a server about to listen; ``file_limit`` (the open-file limit, 0:
        unknown) bounds the pending handshakes so that descriptors never run out."""
        pending = pending_within(file_limit, self.max_connections, self.max_pending)
        if pending < self.max_pending:
            logger.warning(
                "the open-file limit of %d descriptors leaves room for %d pending handshakes "
                "beside %d connections (max_pending=%d asked): raise the limit (ulimit -n) or "
                "lower max_connections",
                file_limit,
                pending,
                self.max_connections,
                self.max_pending,
            )
        return Admission(self.max_connections, pending, self.max_keyless_connections)

    @property
    def connections(self) -> int:
        """Clients connected now."""
        return self.admission.connections

    # -- running -------------------------------------------------------------------------------
    def run(self, on_start: Callable[[int], None] | None = None) -> None:
        """Serve until :meth:`stop` is called from another thread; ``on_start`` gets the bound
        port once the server listens."""
        if self._api_key is None and not _is_loopback(self.host):
            logger.warning(
                "serving on %s without an API key: anyone who can reach this address can drive "
                "the robot's policy; pass api_key (--api-key) or listen on 127.0.0.1.",
                self.host,
            )
        self._stopping.clear()
        self.admission = self._new_admission(raise_open_file_limit())
        # The objects alive now (the policy, torch's modules: ~350,000) never become garbage;
        # frozen, the collector skips them. Unfrozen, each full collection held the GIL for
        # ~240 ms on this CPU: a stall of every connection, /healthz and every plan at once.
        gc.collect()
        gc.freeze()
        limit_heap_arenas()
        self._plans = WorkerPool(self.max_workers, "policy-plan")
        self._decoders = WorkerPool(self.decode_workers, "policy-decode")
        try:
            with websocket_serve(
                self._handle,
                self.host,
                self.port,
                create_connection=self._connection,
                process_request=self._admit,
                max_size=self.max_message_bytes,
                max_queue=MAX_QUEUED_FRAMES,
                compression=None,
                open_timeout=OPEN_TIMEOUT_S,
                close_timeout=SHUTDOWN_GRACE_S,
                backlog=LISTEN_BACKLOG,
            ) as server:
                self._server = server
                self.port = server.socket.getsockname()[1]
                logger.info(
                    "serving %s (%s) on ws://%s:%d",
                    type(self.policy).__name__,
                    self.sampler.label,
                    self.host,
                    self.port,
                )
                if on_start is not None:
                    on_start(self.port)
                # until shutdown() from stop(), at once if stop() came already: the loop marks
                # the socket closed, which websockets' shutdown() waits for
                accept_forever(server, self._stopping, self.admission, OPEN_TIMEOUT_S)
        finally:
            self._server = None
            self._plans.shutdown(SHUTDOWN_GRACE_S)
            self._decoders.shutdown(SHUTDOWN_GRACE_S)

    def serve_forever(self, on_start: Callable[[int], None] | None = None) -> int:
        """Block serving until SIGINT/SIGTERM (the command-line entry point; main thread);
        returns the signal's number, logged. Serving never ends otherwise: a failed accept
        pauses and serves on, and an error that stops the server is raised."""

        def on_signal(signum, frame) -> None:
            self.stopped_by = signum
            threading.Thread(target=self._shutdown, name="policy-server-stop").start()

        self.stopped_by = None
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.run(on_start)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stopped_by is None:
            raise RuntimeError("the policy server stopped serving without a signal.")
        logger.warning("stopped by %s", signal.Signals(self.stopped_by).name)
        return self.stopped_by

    def _connection(self, *args: Any, **kwargs: Any) -> AdmittedConnection:
        """websockets' connection factory: connections report their handshake to admission."""
        return AdmittedConnection(*args, admission=self.admission, **kwargs)

    def start_in_thread(self, timeout: float = 30.0) -> int:
        """Serve from a daemon thread (tests, notebooks); returns the bound port."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the server is already running; stop() it first.")
        started = threading.Event()
        failure: list[BaseException] = []

        def target() -> None:
            try:
                self.run(on_start=lambda _: started.set())
            except BaseException as error:  # surfaced to start_in_thread's caller below
                failure.append(error)
                logger.exception("the policy server stopped with an error")
                started.set()

        self._thread = threading.Thread(target=target, name="policy-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"the policy server did not start within {timeout} s.")
        if failure:
            raise failure[0]
        return self.port

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (from any thread but the serving one): close connections, abandon plans
        still running after a short grace period."""
        if self._server is None and (self._thread is None or not self._thread.is_alive()):
            raise RuntimeError("the server is not running.")
        self._shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the policy server did not stop within {timeout} s.")
            self._thread = None

    def _shutdown(self) -> None:
        self._stopping.set()  # handlers waiting on a plan give up at once
        server = self._server
        if server is not None:
            server.shutdown()

    def __enter__(self) -> PolicyServer:
        self.start_in_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- admission -----------------------------------------------------------------------------
    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """``GET /healthz`` -> 200; then the API key (401) and a connection slot (503); None
        lets the websocket handshake go on, holding the slot."""
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        keyed = False
        if self._api_key is not None:
            sent = request.headers.get_all("Authorization")
            if len(sent) > 1:
                return connection.respond(
                    http.HTTPStatus.BAD_REQUEST,
                    f"got {len(sent)} Authorization headers; send exactly one: "
                    "'Authorization: Api-Key <key>'.\n",
                )
            expected = f"Api-Key {self._api_key}".encode()
            keyed = hmac.compare_digest(
                (sent[0] if sent else "").encode("utf-8", "surrogateescape"), expected
            )
            if not keyed and not self.max_keyless_connections:
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    "this server needs an API key: send the header 'Authorization: Api-Key "
                    "<key>' (openpi_client: WebsocketClientPolicy(..., api_key=...)).\n",
                )
        refused = self.admission.take_slot(connection, keyed)
        if refused is not None:
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"{refused}; retry later.\n"
            )
        return None

    # -- one connection ------------------------------------------------------------------------
    def _handle(self, connection: ServerConnection) -> None:
        """One connection, in its own thread: lockstep requests and replies."""
        peer = connection.remote_address
        logger.info("connection from %s opened", peer)
        controller = self.new_controller()
        prev_total_ms: float | None = None
        try:
            connection.send(self._metadata_frame)
            while True:
                try:
                    message = connection.recv(timeout=self.idle_timeout_s)
                except TimeoutError:
                    logger.info("closing %s: no request for %g s", peer, self.idle_timeout_s)
                    connection.close(
                        1000, f"no request for {self.idle_timeout_s:g} s (idle_timeout_s)"
                    )
                    return
                received = time.perf_counter()
                big = len(message) >= BIG_REQUEST_BYTES
                try:
                    reply = self._respond(controller, message, prev_total_ms)
                except RequestError as error:
                    forget_frames(error)  # the request's bytes are freed now, not at the next gc
                    connection.send(bounded(str(error)))
                    continue
                except _Stopping:
                    return
                except Exception as error:
                    forget_frames(error)
                    logger.warning("planning for %s failed: %r", peer, error)
                    connection.send(
                        bounded(
                            f"planning failed: {type(error).__name__}: {error} (nothing was "
                            "recorded; the connection's episode goes on)."
                        )
                    )
                    continue
                finally:
                    del message  # a request of megabytes is not kept while the next one waits
                    if big:
                        release_freed_memory()
                connection.send(wire.pack(reply))
                if "actions" in reply:
                    prev_total_ms = (time.perf_counter() - received) * 1e3
        except ConnectionClosed:
            pass  # the client left, possibly mid-request: nothing to answer
        finally:
            self.admission.release(connection)
            controller.close()
            logger.info("connection from %s closed", peer)
            if not self._stopping.is_set():
                release_freed_memory()  # the working memory of this connection's plans

    def _wait(self, future, timeout: float | None = None):
        """A worker's result, waited for in short slices so that a stopping server does not wait
        for a plan still running (the worker is a daemon thread and is abandoned)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stopping.is_set():
                future.cancel()
                raise _Stopping
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            try:
                return future.result(timeout=0.05 if left is None else min(0.05, left))
            except FutureTimeout:
                continue

    def _parse(self, message: bytes | str) -> tuple[bool, dict[str, np.ndarray] | None, dict]:
        """(reset?, observation or None, {executed, committed} counts) of a request, or a
        RequestError (a worker's job)."""
        if isinstance(message, str):
            raise RequestError(
                "got a text frame; send each request as a binary msgpack frame "
                "(openpi_client.msgpack_numpy or policy_accel.control.wire)."
            )
        if len(message) > self.max_message_bytes:
            raise RequestError(
                f"request of {len(message)} bytes exceeds max_message_bytes="
                f"{self.max_message_bytes}; send one observation step, or start the server "
                "with a larger limit."
            )
        try:
            payload = wire.unpack(message, max_bytes=self.max_message_bytes)
        except wire.WireError as error:
            raise RequestError(f"malformed request: {error}") from error
        if not isinstance(payload, dict):
            raise RequestError(
                f"a request must be a msgpack map of observation keys, got a "
                f"{type(payload).__name__}; this policy takes "
                f"{describe_spec(self.policy.observation_spec)}."
            )
        reset = payload.pop(RESET_KEY, False)
        if not isinstance(reset, bool):
            raise RequestError(f"{RESET_KEY!r} must be true or false, got {type(reset).__name__}.")
        timing = {key: _count(payload.pop(key, None), key) for key in (EXECUTED_KEY, COMMITTED_KEY)}
        observe = payload.pop(OBSERVE_KEY, False)
        if not isinstance(observe, bool):
            raise RequestError(
                f"{OBSERVE_KEY!r} must be true or false, got {type(observe).__name__}."
            )
        if observe and not payload:
            raise RequestError(f"{OBSERVE_KEY!r} needs the observation keys beside it.")
        timing[OBSERVE_KEY] = observe
        overlap = payload.pop(OVERLAP_KEY, False)
        if not isinstance(overlap, bool):
            raise RequestError(
                f"{OVERLAP_KEY!r} must be true or false, got {type(overlap).__name__}."
            )
        timing[OVERLAP_KEY] = overlap
        if not payload:
            if reset:
                return True, None, timing
            raise RequestError(
                f"empty request; send {describe_spec(self.policy.observation_spec)} or "
                f"{{{RESET_KEY!r}: True}}."
            )
        return reset, check_request(payload, self.policy, self.out_of_range), timing

    def _respond(
        self, controller: Controller, message: bytes | str, prev_total_ms: float | None
    ) -> dict[str, Any]:
        try:
            reset, observation, timing = self._wait(
                self._decoders.submit(self._parse, message), self.request_timeout_s
            )
        except TimeoutError as error:
            raise RequestError(
                f"the request was not decoded and validated within {self.request_timeout_s:g} s; "
                "send one observation step (a map of arrays)."
            ) from error
        start = time.perf_counter()
        chunk, record = self._wait(
            self._plans.submit(_step, controller, reset, observation, timing)
        )
        if chunk is None:
            reply = {"observed": True} if timing.get(OBSERVE_KEY) else {}
            return self._annotate(reply, reset, observation)
        server_timing = {"infer_ms": (time.perf_counter() - start) * 1e3}
        if prev_total_ms is not None:
            server_timing["prev_total_ms"] = prev_total_ms
        reply: dict[str, Any] = {
            "actions": chunk.astype(np.float32),
            "server_timing": server_timing,
            "policy_timing": {
                "infer_ms": record.latency_ms,
                "rounds": record.rounds,
                "model_evals": record.model_evals,
                "converged": record.converged,
                "warm": record.warm,
                "deadline_hit": record.deadline_hit,
                "fallback": record.fallback,
                "committed": record.committed,
                "executed": record.shift,
                "overlap": bool(timing.get(OVERLAP_KEY)),
            },
        }
        return self._annotate(reply, reset, observation)

    def _annotate(self, reply: dict, reset: bool, observation: dict | None) -> dict:
        """What else the request did: ``reset``, and with ``out_of_range="flag"`` the keys of
        its observation outside the bound around the training range."""
        if reset:
            reply["reset"] = True
        if self.out_of_range == "flag" and observation is not None:
            outside = out_of_range_keys(self.policy, observation)
            if outside:
                reply["out_of_range"] = outside
        return reply


class _Stopping(Exception):
    """The server is stopping while a connection waits for a worker."""


def _step(
    controller: Controller,
    reset: bool,
    observation: dict[str, np.ndarray] | None,
    timing: dict | None = None,
):
    """A worker thread's job: reset and/or plan; ``(None, None)`` when there was nothing to
    plan, else the chunk and its record. ``timing``: the request's executed and committed
    counts (the warm start's shift; the last reply's actions to inpaint) and whether to follow
    the rest of the last reply softly, checked against the last reply first (a
    :class:`RequestError` changes nothing)."""
    timing = timing or {}
    committed, overlap = _timing_windows(controller, reset, observation, timing)
    if reset:
        controller.reset()
    if observation is None:
        return None, None
    if timing.get(OBSERVE_KEY):
        controller.observe(observation)  # a step between plans: the history stays consecutive
        return None, None
    plan = controller.plan(
        observation, executed=timing.get(EXECUTED_KEY), committed=committed, overlap=overlap
    )
    return plan.chunk, plan.record


def _timing_windows(
    controller: Controller, reset: bool, observation: dict | None, timing: dict
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The committed and overlap actions the request's timing keys name in the connection's
    last reply, or a :class:`RequestError` when the keys do not apply to this request or ask
    for more actions than the last reply held."""
    executed, count = timing.get(EXECUTED_KEY), timing.get(COMMITTED_KEY)
    sent = [key for key in (EXECUTED_KEY, COMMITTED_KEY) if timing.get(key) is not None]
    sent += [OVERLAP_KEY] if timing.get(OVERLAP_KEY) else []
    if not sent:
        return None, None
    named = " and ".join(repr(key) for key in sent)
    if observation is None or timing.get(OBSERVE_KEY):
        what = f"an {OBSERVE_KEY!r} step" if observation is not None else "a reset alone"
        raise RequestError(
            f"{named} count actions of the last reply for a planning request; this request is "
            f"{what}, which plans nothing: send them with the next planning request."
        )
    last = controller.last_plan
    if reset or last is None:
        raise RequestError(
            f"{named} count actions of this episode's last reply, and there is none yet (the "
            "connection's first request, a reset, or the first request after one): send them "
            "only after a reply with actions."
        )
    start, count = executed or 0, count or 0
    actions = len(last.chunk)
    if start + count > actions:
        raise RequestError(
            f"{EXECUTED_KEY!r}={start} + {COMMITTED_KEY!r}={count} = {start + count} actions, "
            f"but the last reply held {actions}: the robot cannot have executed more than it "
            "received. Count only actions of the last reply."
        )
    committed = last.future[0, start : start + count] if count else None
    overlap = None
    if timing.get(OVERLAP_KEY):
        overlap = last.future[0, start + count :]
        if not len(overlap):
            raise RequestError(
                f"{OVERLAP_KEY!r}: nothing of the last plan is left to follow after "
                f"{start + count} executed and committed actions."
            )
    return committed, overlap


def _count(value, key: str) -> int | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not 0 <= value <= 4096
    ):
        raise RequestError(f"{key!r} must be an int between 0 and 4096, got {value!r}.")
    return int(value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def serve(
    checkpoint_or_policy: str | Path | Policy,
    sampler: SamplerConfig | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = 8000,
    device: str = "cpu",
    on_start: Callable[[int], None] | None = None,
    **options: Any,
) -> int:
    """Load a checkpoint (any format :func:`~policy_accel.load_policy` reads) or take a loaded
    policy and serve it with ``sampler`` until SIGINT/SIGTERM; returns the signal's number.
    ``options`` go to :class:`PolicyServer` (``n_action_steps``, ``seed``,
    ``max_message_bytes``, ``max_workers``, ``max_connections``, ``api_key``,
    ``idle_timeout_s``, ``out_of_range``, sampler shortcuts)."""
    if isinstance(checkpoint_or_policy, Policy):
        policy = checkpoint_or_policy
    else:
        policy = load_policy(checkpoint_or_policy, device=device)
    server = PolicyServer(policy, sampler, host=host, port=port, **options)
    return server.serve_forever(on_start)
