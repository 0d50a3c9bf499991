"""A small synchronous client for :mod:`policy_accel.control.server` (or any openpi server).

It speaks the same protocol as ``openpi_client.WebsocketClientPolicy`` and adds what a robot loop
needs from it: a ``reset`` that the server honours, an error type for refused requests that
carries the server's message, timeouts, and a ``ConnectionError`` that names the address.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from policy_accel.control import wire


class ServerError(RuntimeError):
    """The server answered with a text frame: a refused request or a failed plan. The
    connection stays usable; the message is the server's."""


class PolicyClient:
    """Lockstep client of one policy server connection (one robot, one episode at a time).

    Args:
        host, port: the server's address.
        timeout: seconds to wait for the connection and for each reply. After a reply times out
            the connection is closed, since a late reply would otherwise be read as the next one.
        max_message_bytes: the largest reply accepted.
        api_key: sent as ``Authorization: Api-Key <key>`` (as openpi's client does) to a server
            started with one.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = 8000,
        timeout: float = 30.0,
        max_message_bytes: int = wire.DEFAULT_MAX_BYTES,
        api_key: str | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._exit_stack = ExitStack()  # connect() is a context manager from websockets 17 on
        try:
            self._connection: ClientConnection = self._exit_stack.enter_context(
                connect(
                    f"ws://{self.address}",
                    compression=None,
                    max_size=max_message_bytes,
                    open_timeout=timeout,
                    additional_headers={"Authorization": f"Api-Key {api_key}"} if api_key else None,
                )
            )
        except InvalidStatus as error:
            body = error.response.body.decode("utf-8", "replace").strip()[:300]
            raise ConnectionError(
                f"the policy server at {self.address} refused the connection (HTTP "
                f"{error.response.status_code}): {body}"
            ) from error
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as error:
            raise ConnectionError(
                f"cannot reach a policy server at {self.address} ({type(error).__name__}: "
                f"{error}); is `policy-accel serve` running there?"
            ) from error
        metadata = self._receive()
        if not isinstance(metadata, dict):
            self.close()
            raise ConnectionError(
                f"{self.address} sent {type(metadata).__name__} metadata, not a map: it does "
                "not speak the openpi policy protocol."
            )
        self._metadata = metadata

    @property
    def metadata(self) -> dict[str, Any]:
        """What the server sent on connect (policy, observation spec, solver settings)."""
        return self._metadata

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation step; returns the reply (``actions``, timings)."""
        return self._request(obs)

    def observe(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send an observation step to record in the server's history without planning (the
        steps between plans, so the history stays consecutive); returns ``{"observed": True}``."""
        return self._request({**obs, wire.OBSERVE_KEY: True})

    def reset(self) -> dict[str, Any]:
        """Start a new episode on the server (empty history, cold start); returns its reply."""
        return self._request({wire.RESET_KEY: True})

    def close(self) -> None:
        self._exit_stack.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, payload: dict[str, Any]) -> dict[str, Any]:
        data = wire.pack(payload)
        try:
            self._connection.send(data)
        except ConnectionClosed as error:
            raise ConnectionError(
                f"the policy server at {self.address} closed the connection ({error})."
            ) from error
        reply = self._receive()
        if not isinstance(reply, dict):
            raise ServerError(f"expected a map reply, got {type(reply).__name__}.")
        return reply

    def _receive(self) -> Any:
        try:
            message = self._connection.recv(timeout=self.timeout)
        except TimeoutError as error:
            self.close()
            raise TimeoutError(
                f"no reply from {self.address} within {self.timeout} s; the connection is "
                "closed (lockstep is lost), open a new client."
            ) from error
        except ConnectionClosed as error:
            raise ConnectionError(
                f"the policy server at {self.address} closed the connection ({error})."
            ) from error
        if isinstance(message, str):
            raise ServerError(message)
        return wire.unpack(message, max_bytes=self.max_message_bytes)
