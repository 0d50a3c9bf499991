"""Closed-loop control: the Controller (receding horizon, warm starts, deadlines), the
asynchronous runtime, and the openpi-compatible server and client."""

from policy_accel.control.client import PolicyClient, ServerError
from policy_accel.control.controller import Controller, PlanRecord, latency_stats
from policy_accel.control.runtime import AsyncController, RunStats
from policy_accel.control.server import PolicyServer, RequestError, serve
from policy_accel.control.wire import WireError

__all__ = [
    "AsyncController",
    "Controller",
    "PlanRecord",
    "PolicyClient",
    "PolicyServer",
    "RequestError",
    "RunStats",
    "ServerError",
    "WireError",
    "latency_stats",
    "serve",
]
