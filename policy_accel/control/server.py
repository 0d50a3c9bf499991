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
   dtype, NaN/Inf, over ``max_message_bytes``, a text frame) is answered with a TEXT frame naming
   the problem and changes nothing: the connection stays open and its Controller is untouched.
   openpi's client raises ``RuntimeError`` on a text reply; ours raises ``ServerError``.

Reset. A new connection is a new episode: a fresh Controller (empty history, generator seeded with
``seed``, so a connection's chunks equal a local ``Controller(policy, ..., seed=seed)``'s). The
reserved key ``"__reset__": True`` resets the connection's Controller (its generator continues
its stream, as ``Controller.reset`` does). Sent alone it is answered ``{"reset": True}``; sent
with observation keys it resets and then plans from that observation, the first step of the new
episode in one round trip, and the reply carries ``"reset": True`` beside the actions.

Concurrency. Plans run in a thread pool of ``max_workers`` threads, never on the event loop, so a
slow plan does not stall other connections, pings or ``/healthz``. Connections share one policy
without a lock: its networks are in eval mode and only read, run under ``torch.no_grad`` (grad
mode is thread-local), schedulers are copied before ``set_timesteps`` and each Controller owns its
noise generator. Only its own connection's handler touches a Controller, one request at a time.
``max_workers=1`` queues all plans (for a policy that is not safe to run from several threads).

Sizes. The server checks each request against ``max_message_bytes`` before decoding it and
answers an oversized one with an error; the transport's own limit is 4x larger, so only a grossly
oversized frame closes the connection (code 1009).
"""

from __future__ import annotations

import asyncio
import http
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as websocket_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from policy_accel.control import wire
from policy_accel.control.controller import Controller
from policy_accel.policies.base import Policy
from policy_accel.policies.loading import load_policy
from policy_accel.sampling.sample import solver_options as parse_solver_options

logger = logging.getLogger(__name__)

RESET_KEY = wire.RESET_KEY
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
TRANSPORT_SIZE_FACTOR = 4
# a connection's Controller appends a PlanRecord per plan; the server reads only the last one, so
# it keeps a bounded tail instead of growing for as long as a robot stays connected
KEPT_RECORDS = 1000

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RESET_KEY",
    "PolicyServer",
    "RequestError",
    "check_observation",
    "serve",
]


class RequestError(ValueError):
    """A request the server refuses; its text goes back to the client as a text frame."""


def check_observation(
    payload: dict, spec: dict[str, tuple[int, ...]], n_obs_steps: int
) -> dict[str, np.ndarray]:
    """One observation step validated against ``spec`` (key -> per-step shape), as float32
    copies; raises :class:`RequestError` naming the key, what was expected and why."""
    expected = {key: tuple(shape) for key, shape in spec.items()}
    missing = sorted(set(expected) - set(payload))
    unexpected = sorted(set(payload) - set(expected), key=repr)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing key(s) {missing}")
        if unexpected:
            problems.append(f"unexpected key(s) {unexpected}")
        raise RequestError(
            f"observation has {' and '.join(problems)}; this policy takes one step of "
            f"{_describe(expected)} per request (plus {RESET_KEY!r}: True to reset)."
        )
    history = f"one step: the server keeps the n_obs_steps={n_obs_steps} history"
    observation = {}
    for key, shape in expected.items():
        value = payload[key]
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            raise RequestError(
                f"obs[{key!r}] is a {type(value).__name__}; expected a float array of shape "
                f"{shape} ({history}), sent as a msgpack-numpy array."
            )
        if value.dtype.kind not in "fiu":
            raise RequestError(
                f"obs[{key!r}] has dtype {value.dtype}; expected a real number array of shape "
                f"{shape} (float32 preferred)."
            )
        if value.shape != shape:
            raise RequestError(
                f"obs[{key!r}] has shape {value.shape}, expected {shape} ({history})."
            )
        with np.errstate(over="ignore"):  # an overflow becomes Inf, refused just below
            value = value.astype(np.float32)  # a copy; the policy computes in float32 anyway
        if not np.all(np.isfinite(value)):
            raise RequestError(f"obs[{key!r}] contains NaN or Inf (after conversion to float32).")
        observation[key] = value
    return observation


class PolicyServer:
    """Serves ``policy`` over websockets, one :class:`Controller` per connection (module docs).

    Args:
        policy: a loaded policy, shared by all connections.
        host, port: where to listen; ``port=0`` picks a free port, and ``port`` holds the bound
            one once the server listens.
        method, warm_start, n_action_steps, budget_ms, fallback_steps, seed, solver_options:
            the settings of every connection's Controller.
        max_message_bytes: the largest request the server decodes; larger ones get an error.
        max_workers: threads that run plans; concurrent connections plan in parallel up to this.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        method: str = "picard",
        warm_start: bool = True,
        n_action_steps: int | None = None,
        budget_ms: float | None = None,
        fallback_steps: int | None = None,
        seed: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_workers: int = 4,
        **solver_options: Any,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}.")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}.")
        parse_solver_options(method, **solver_options)  # unknown options fail now, not per plan
        self.policy = policy
        self.host = host
        self.port = port
        self.max_message_bytes = int(max_message_bytes)
        self.max_workers = int(max_workers)
        self._controller_settings = dict(
            method=method,
            warm_start=warm_start,
            n_action_steps=n_action_steps,
            budget_ms=budget_ms,
            fallback_steps=fallback_steps,
            seed=seed,
            **solver_options,
        )
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
            "num_inference_steps": policy.num_inference_steps,
            "method": method,
            "solver_options": dict(solver_options),
            "warm_start": warm_start,
            "budget_ms": budget_ms,
            "fallback_steps": fallback_steps,
            "seed": seed,
            "reset_key": RESET_KEY,
            "max_message_bytes": self.max_message_bytes,
        }
        self._metadata_frame = wire.pack(self.metadata)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    def new_controller(self) -> Controller:
        """A fresh Controller with the server's settings (what each connection gets)."""
        return Controller(self.policy, **self._controller_settings)

    # -- running -------------------------------------------------------------------------------
    async def run(
        self, on_start: Callable[[int], None] | None = None, stop_on_signals: bool = False
    ) -> None:
        """Serve until :meth:`stop` (or SIGINT/SIGTERM with ``stop_on_signals``); ``on_start``
        gets the bound port once the server listens."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if stop_on_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._loop.add_signal_handler(signum, self._stopping.set)
                except (NotImplementedError, RuntimeError):
                    pass  # no signal handlers on Windows loops or off the main thread
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="policy-plan")
        try:
            async with websocket_serve(
                self._handle,
                self.host,
                self.port,
                process_request=_health_check,
                max_size=self.max_message_bytes * TRANSPORT_SIZE_FACTOR,
                compression=None,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                logger.info(
                    "serving %s (%s) on ws://%s:%d",
                    type(self.policy).__name__,
                    self._controller_settings["method"],
                    self.host,
                    self.port,
                )
                if on_start is not None:
                    on_start(self.port)
                await self._stopping.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def serve_forever(self, on_start: Callable[[int], None] | None = None) -> None:
        """Block serving until SIGINT/SIGTERM (the command-line entry point)."""
        asyncio.run(self.run(on_start, stop_on_signals=True))

    def start_in_thread(self, timeout: float = 30.0) -> int:
        """Serve from a daemon thread (tests, notebooks); returns the bound port."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the server is already running; stop() it first.")
        started = threading.Event()
        failure: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(self.run(on_start=lambda _: started.set()))
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
        """Stop serving (from any thread): close connections, let running plans finish."""
        if self._loop is None or self._stopping is None:
            raise RuntimeError("the server is not running.")
        self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the policy server did not stop within {timeout} s.")
            self._thread = None
        self._loop = self._stopping = None

    def __enter__(self) -> PolicyServer:
        self.start_in_thread()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- one connection ------------------------------------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        peer = connection.remote_address
        logger.info("connection from %s opened", peer)
        controller = self.new_controller()
        prev_total_ms: float | None = None
        try:
            await connection.send(self._metadata_frame)
            async for message in connection:
                received = time.perf_counter()
                try:
                    reply = await self._respond(controller, message, prev_total_ms)
                except RequestError as error:
                    await connection.send(str(error))
                    continue
                except Exception as error:
                    logger.exception("planning for %s failed", peer)
                    await connection.send(
                        f"planning failed: {type(error).__name__}: {error} (the observation is in "
                        f"the history; send {RESET_KEY!r}: True to start over)."
                    )
                    continue
                await connection.send(wire.pack(reply))
                if "actions" in reply:
                    prev_total_ms = (time.perf_counter() - received) * 1e3
        except ConnectionClosed:
            pass  # the client left, possibly mid-request: nothing to answer
        finally:
            logger.info("connection from %s closed", peer)

    def _parse(self, message: bytes | str) -> tuple[bool, dict[str, np.ndarray] | None]:
        """(reset?, observation or None) of a request, or a RequestError."""
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
                f"{_describe(self.policy.observation_spec)}."
            )
        reset = payload.pop(RESET_KEY, False)
        if not isinstance(reset, bool):
            raise RequestError(f"{RESET_KEY!r} must be true or false, got {reset!r}.")
        if not payload:
            if reset:
                return True, None
            raise RequestError(
                f"empty request; send {_describe(self.policy.observation_spec)} or "
                f"{{{RESET_KEY!r}: True}}."
            )
        spec = self.policy.observation_spec
        return reset, check_observation(payload, spec, self.policy.n_obs_steps)

    async def _respond(
        self, controller: Controller, message: bytes | str, prev_total_ms: float | None
    ) -> dict[str, Any]:
        reset, observation = self._parse(message)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        chunk = await loop.run_in_executor(self._pool, _step, controller, reset, observation)
        if chunk is None:
            return {"reset": True}
        record = controller.records[-1]
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
            },
        }
        if reset:
            reply["reset"] = True
        return reply


def _step(
    controller: Controller, reset: bool, observation: dict[str, np.ndarray] | None
) -> np.ndarray | None:
    """A worker thread's job: reset and/or plan; ``None`` when there was nothing to plan."""
    if reset:
        controller.reset()
    if observation is None:
        return None
    chunk = controller.plan(observation)
    del controller.records[:-KEPT_RECORDS]
    return chunk


def _describe(spec: dict[str, tuple[int, ...]]) -> str:
    return "{" + ", ".join(f"{key!r}: shape {tuple(shape)}" for key, shape in spec.items()) + "}"


def _health_check(connection: ServerConnection, request: Request) -> Response | None:
    """``GET /healthz`` -> 200 OK (load balancers, readiness probes); other paths go on to the
    websocket handshake."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


def serve(
    checkpoint_or_policy: str | Path | Policy,
    host: str = "0.0.0.0",
    port: int = 8000,
    method: str = "picard",
    warm_start: bool = True,
    budget_ms: float | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    device: str = "cpu",
    on_start: Callable[[int], None] | None = None,
    **options: Any,
) -> None:
    """Load a checkpoint (any format :func:`~policy_accel.load_policy` reads) or take a loaded
    policy and serve it until SIGINT/SIGTERM. ``options`` go to :class:`PolicyServer`
    (``n_action_steps``, ``fallback_steps``, ``seed``, ``max_workers``, solver options)."""
    if isinstance(checkpoint_or_policy, Policy):
        policy = checkpoint_or_policy
    else:
        policy = load_policy(checkpoint_or_policy, device=device)
    server = PolicyServer(
        policy,
        host=host,
        port=port,
        method=method,
        warm_start=warm_start,
        budget_ms=budget_ms,
        max_message_bytes=max_message_bytes,
        **options,
    )
    server.serve_forever(on_start)
