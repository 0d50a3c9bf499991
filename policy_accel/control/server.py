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
   dtype, NaN/Inf, values far outside the policy's range, a text frame, a decode that runs past
   ``request_timeout_s``) is answered with a TEXT frame naming the problem (at most
   ``messages.MESSAGE_LIMIT`` characters) and changes nothing: the connection stays open and its
   Controller is untouched. A plan that fails after the request was accepted is also answered
   with a text frame and also leaves the Controller as it was. openpi's client raises
   ``RuntimeError`` on a text reply; ours raises ``ServerError``.

Timing keys (optional, for real-time clients): ``"__executed__": k``, the actions of the last
reply executed before this observation's step (the warm start's shift; default: as a lockstep
client, none counted), and ``"__committed__": c``, the further actions of the last reply the
robot executes while this request is planned: they are inpainted into the new chunk, which then
continues them (real-time chunking; the reply's ``policy_timing.committed`` says how many);
with ``"__overlap__": True`` the rest of the last reply after those is followed softly too
(RTC's decaying prefix schedule, ``soft_inpaint``).

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
clients are connected at once (others get HTTP 503), so the server's memory is bounded by about
``max_connections * (MAX_QUEUED_FRAMES + 1) * max_message_bytes`` plus the policy.

Access. The server listens on 127.0.0.1 by default. With ``api_key`` set, a client must send the
header ``Authorization: Api-Key <key>`` (what ``openpi_client``'s ``api_key`` sends) or gets
HTTP 401; ``/healthz`` stays open. Listening beyond loopback without a key logs a warning.

Shutdown. SIGINT/SIGTERM (or :meth:`PolicyServer.stop`) closes the connections and returns within
about a second; a plan still running then is abandoned (the workers are daemon threads). A client
that does not complete its opening handshake within ``OPEN_TIMEOUT_S`` is dropped.
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
from policy_accel.control.config import SamplerConfig
from policy_accel.control.controller import Controller
from policy_accel.control.memory import BIG_REQUEST_BYTES, limit_heap_arenas, release_freed_memory
from policy_accel.control.workers import WorkerPool, forget_frames
from policy_accel.messages import bounded, preview
from policy_accel.policies.base import ObservationError, Policy, describe_spec
from policy_accel.policies.loading import load_policy

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


def check_request(payload: dict, policy: Policy) -> dict[str, np.ndarray]:
    """One observation step validated against the policy (exactly its keys, each a numpy array
    of the per-step shape, finite and in range), as float32 copies; raises
    :class:`RequestError` naming the key, what was expected and why."""
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
        return policy.check_observation_step(payload)
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
        max_connections: clients connected at once; more get HTTP 503.
        request_timeout_s: a request not decoded and validated within this time gets an error.
        api_key: when set, clients must send ``Authorization: Api-Key <key>``.
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
        **settings: Any,
    ) -> None:
        for name, value in (
            ("max_message_bytes", max_message_bytes),
            ("max_workers", max_workers),
            ("decode_workers", decode_workers),
            ("max_connections", max_connections),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s!r}.")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None.")
        self.sampler = SamplerConfig.from_settings(sampler, **settings)  # invalid: fails now
        self.policy = policy
        self.host = host
        self.port = port
        self.max_message_bytes = int(max_message_bytes)
        self.max_workers = int(max_workers)
        self.decode_workers = int(decode_workers)
        self.max_connections = int(max_connections)
        self.request_timeout_s = float(request_timeout_s)
        self._api_key = api_key
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
        }
        self._metadata_frame = wire.pack(self.metadata)
        self._server = None
        self._stopping = threading.Event()
        self._plans: WorkerPool | None = None
        self._decoders: WorkerPool | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections = 0

    def new_controller(self) -> Controller:
        """A fresh Controller with the server's settings (what each connection gets)."""
        return Controller(
            self.policy, self.sampler, n_action_steps=self.n_action_steps, seed=self.seed
        )

    @property
    def connections(self) -> int:
        """Clients connected now."""
        return self._connections

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
                process_request=self._admit,
                max_size=self.max_message_bytes,
                max_queue=MAX_QUEUED_FRAMES,
                compression=None,
                open_timeout=OPEN_TIMEOUT_S,
                close_timeout=SHUTDOWN_GRACE_S,
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
                if self._stopping.is_set():  # stop() came before the server listened
                    return
                server.serve_forever()  # until shutdown() from stop()
        finally:
            self._server = None
            self._plans.shutdown(SHUTDOWN_GRACE_S)
            self._decoders.shutdown(SHUTDOWN_GRACE_S)

    def serve_forever(self, on_start: Callable[[int], None] | None = None) -> None:
        """Block serving until SIGINT/SIGTERM (the command-line entry point; main thread)."""

        def on_signal(signum, frame) -> None:
            threading.Thread(target=self._shutdown, name="policy-server-stop").start()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.run(on_start)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
        """``GET /healthz`` -> 200; then the API key (401) and the connection cap (503); None
        lets the websocket handshake go on."""
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._api_key is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self._api_key}".encode()):
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    "this server needs an API key: send the header 'Authorization: Api-Key "
                    "<key>' (openpi_client: WebsocketClientPolicy(..., api_key=...)).\n",
                )
        if self._connections >= self.max_connections:
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"the server is at its limit of {self.max_connections} connections; retry later.\n",
            )
        return None

    # -- one connection ------------------------------------------------------------------------
    def _handle(self, connection: ServerConnection) -> None:
        """One connection, in its own thread: lockstep requests and replies."""
        peer = connection.remote_address
        with self._lock:
            self._connections += 1
        logger.info("connection from %s opened", peer)
        controller = self.new_controller()
        prev_total_ms: float | None = None
        try:
            connection.send(self._metadata_frame)
            for message in connection:
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
            with self._lock:
                self._connections -= 1
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
        return reset, check_request(payload, self.policy), timing

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
            return {"observed": True} if timing.get(OBSERVE_KEY) else {"reset": True}
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
            },
        }
        if reset:
            reply["reset"] = True
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
    counts (the warm start's shift; the last reply's actions to inpaint)."""
    if reset:
        controller.reset()
    if observation is None:
        return None, None
    timing = timing or {}
    if timing.get(OBSERVE_KEY):
        controller.observe(observation)  # a step between plans: the history stays consecutive
        return None, None
    executed, count = timing.get(EXECUTED_KEY), timing.get(COMMITTED_KEY)
    last = controller.last_plan
    committed = overlap = None
    if last is not None and not reset:
        start, count = executed or 0, count or 0
        committed = last.future[0, start : start + count] if count else None
        committed = committed if committed is not None and len(committed) else None
        if timing.get(OVERLAP_KEY) and (committed is None or len(committed) == count):
            overlap = last.future[0, start + count :]
            overlap = overlap if len(overlap) else None
    plan = controller.plan(observation, executed=executed, committed=committed, overlap=overlap)
    return plan.chunk, plan.record


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
) -> None:
    """Load a checkpoint (any format :func:`~policy_accel.load_policy` reads) or take a loaded
    policy and serve it with ``sampler`` until SIGINT/SIGTERM. ``options`` go to
    :class:`PolicyServer` (``n_action_steps``, ``seed``, ``max_message_bytes``, ``max_workers``,
    ``max_connections``, ``api_key``, sampler shortcuts)."""
    if isinstance(checkpoint_or_policy, Policy):
        policy = checkpoint_or_policy
    else:
        policy = load_policy(checkpoint_or_policy, device=device)
    PolicyServer(policy, sampler, host=host, port=port, **options).serve_forever(on_start)
