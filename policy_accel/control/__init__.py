"""Closed-loop control: one planning core (:class:`Planner`) behind the Controller (receding
horizon, warm starts, deadlines), the BatchController (many envs, one batched call), the
asynchronous runtime, and the openpi-compatible server and client. Importing it needs neither
gymnasium nor the simulated tasks, and the server and client (websockets) are imported when first
named."""

from policy_accel.control.batch import BatchController
from policy_accel.control.config import SamplerConfig
from policy_accel.control.controller import Controller, ControlStep
from policy_accel.control.delay import DelayEstimator
from policy_accel.control.history import ObservationHistory
from policy_accel.control.planner import Plan, Planner, RowState
from policy_accel.control.records import PlanRecord, batch_stats, latency_stats
from policy_accel.control.runtime import AsyncController, RunStats
from policy_accel.control.wire import WireError

_TRANSPORT = {
    "PolicyClient": "client",
    "ServerError": "client",
    "PolicyServer": "server",
    "RequestError": "server",
    "serve": "server",
}


def __getattr__(name: str):
    """The server and client on first use: planning alone does not import websockets."""
    if name in _TRANSPORT:
        import importlib

        module = importlib.import_module(f"policy_accel.control.{_TRANSPORT[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'policy_accel.control' has no attribute {name!r}")

__all__ = [
    "AsyncController",
    "BatchController",
    "ControlStep",
    "Controller",
    "DelayEstimator",
    "ObservationHistory",
    "Plan",
    "PlanRecord",
    "Planner",
    "PolicyClient",
    "PolicyServer",
    "RequestError",
    "RowState",
    "RunStats",
    "SamplerConfig",
    "ServerError",
    "WireError",
    "batch_stats",
    "latency_stats",
    "serve",
]
