"""Closed-loop control: the Controller (receding horizon, warm starts, deadlines), the
asynchronous runtime, and the openpi-compatible server and client."""

from policy_accel.control.controller import Controller, PlanRecord, latency_stats

__all__ = ["Controller", "PlanRecord", "latency_stats"]
