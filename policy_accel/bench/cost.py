"""A cost model of a replan on the hardware at hand.

A replan's latency is its rounds' model calls plus host work:
``latency = sum over rounds of t(P_r) + host``, with ``t(P)`` one batched call over ``P`` window
positions of one sample, measured on this device and dtype (``bench.gpu.call_times``), ``P_r``
the positions round ``r`` evaluated (a solver records them as ``stats["window_sizes"]``; captured
rounds evaluate all ``N``), and ``host`` the time outside model calls: per round, measured on the
shipped policy (:class:`TimedExecutor`) and assumed the same for a larger network (the Python
work does not depend on its size). So a configuration measured once predicts its latency for any
network whose ``t(P)`` is measured: what a budget tuner needs to pick the window, the solver and
the dtype.
"""

from __future__ import annotations

import bisect
import time

import numpy as np
import torch

from policy_accel.bench.episode import as_observation, load_episode
from policy_accel.control import Controller, SamplerConfig
from policy_accel.execution import LocalExecutor


class TimedExecutor(LocalExecutor):
    """A local executor that adds up the wall time inside model calls (synchronised on a GPU),
    so that a replan's host time is the rest of its latency."""

    def __init__(self, device=None) -> None:
        super().__init__(device)
        self.model_s = 0.0

    def evaluate(self, denoiser, x, t):
        return self._timed(super().evaluate, denoiser, x, t)

    def jvp(self, denoiser, x, t, tangents):
        return self._timed(super().jvp, denoiser, x, t, tangents)

    def _timed(self, call, *args):
        start = time.perf_counter()
        try:
            out = call(*args)
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return out
        finally:
            self.model_s += time.perf_counter() - start


def call_time(table: list[dict], positions: int, *, dtype: str, mode: str) -> float:
    """``t(P)`` in ms from measured rows (``{"dtype", "mode", "positions", "ms"}``),
    interpolated linearly between the measured sizes (and extrapolated from the last two)."""
    points = sorted((r["positions"], r["ms"]) for r in table
                    if r["dtype"] == dtype and r["mode"] == mode)  # fmt: skip
    if not points:
        raise KeyError(f"no t(P) measured for dtype={dtype}, mode={mode}")
    sizes = [p for p, _ in points]
    index = bisect.bisect_left(sizes, positions)
    if index < len(points) and sizes[index] == positions:
        return points[index][1]
    if len(points) == 1:
        return points[0][1]
    low = max(0, min(index - 1, len(points) - 2))
    (p0, t0), (p1, t1) = points[low], points[low + 1]
    return t0 + (t1 - t0) * (positions - p0) / (p1 - p0)


def model_time_ms(table: list[dict], window_sizes: list[int], *, dtype: str, mode: str) -> float:
    """The model calls of one replan: ``sum_r t(P_r)``."""
    return sum(call_time(table, size, dtype=dtype, mode=mode) for size in window_sizes)


CONFIG_MODE = {"eager": "eager", "captured": "graphs"}


def predicted_latency_ms(report: dict) -> list[dict]:
    """For every closed-loop configuration measured on the shipped policy: its host time
    (measured latency minus its model calls), then every model's predicted latency at that
    configuration's rounds and window sizes, per dtype; the shipped policy's row carries the
    measured latency beside the prediction."""
    rows = []
    shipped = next(iter(report["t_ms"]))
    for configuration, measured in report["closed_loop"].items():
        mode = CONFIG_MODE[configuration.split()[-1]]
        windows = typical_windows(measured)
        if not windows:
            continue
        available = {(r["dtype"], r["mode"]) for r in report["t_ms"][shipped]}
        if ("float32", mode) not in available:
            continue
        model_ms = model_time_ms(report["t_ms"][shipped], windows, dtype="float32", mode=mode)
        host = max(measured["p50_ms"] - model_ms, 0.0)
        for model, table in report["t_ms"].items():
            for dtype in sorted({r["dtype"] for r in table if r["mode"] == mode}):
                predicted = model_time_ms(table, windows, dtype=dtype, mode=mode) + host
                rows.append({
                    "model": model, "configuration": configuration, "dtype": dtype,
                    "rounds": len(windows), "host_ms": host, "predicted_ms": predicted,
                    "measured_ms": measured["p50_ms"] if model == shipped and dtype == "float32"
                    else None,
                })  # fmt: skip
    return rows


def typical_windows(measured: dict) -> list[int]:
    """A representative replan's window sizes: the recorded replan whose round count is
    closest to the mean."""
    recorded = [w for w in measured.get("window_sizes", []) if w]
    if not recorded:
        return []
    target = measured["rounds_mean"]
    return min(recorded, key=lambda sizes: abs(len(sizes) - target))


def validate(policy, model: str, report: dict, host_per_round_ms: float | None, device,
             replans: int) -> dict:  # fmt: skip
    """The cost model against a measurement: ``replans`` warm eager chord replans of ``policy``
    on the recorded episode, each predicted as the sum of ``t(P)`` over its own rounds' window sizes
    plus ``host_per_round_ms`` a round (None: measured here, on this policy, and returned in
    the row: the shipped policy's calibration)."""
    episode = load_episode()
    n = policy.n_action_steps
    executor = TimedExecutor(device)
    controller = Controller(policy, SamplerConfig(), seed=0, executor=executor)
    measured, model_ms, rounds, host = [], [], [], []
    for index, obs in enumerate(episode[: (replans + 1) * n]):
        executor.model_s = 0.0
        step = controller.step(as_observation(policy, obs))
        if step.plan is None or index < n:  # the first (cold) replan is not timed
            continue
        windows = step.plan.result.stats["window_sizes"]
        measured.append(step.plan.record.latency_ms)
        model_ms.append(model_time_ms(report["t_ms"][model], windows, dtype="float32",
                                      mode="eager"))  # fmt: skip
        rounds.append(len(windows))
        host.append(step.plan.record.latency_ms - executor.model_s * 1e3)
    calibration = host_per_round_ms is None
    if calibration:
        host_per_round_ms = float(np.sum(host) / np.sum(rounds))
    predicted = np.array(model_ms) + host_per_round_ms * np.array(rounds)
    error = (predicted.mean() - np.mean(measured)) / np.mean(measured)
    return {"model": model, "configuration": "chord eager", "replans": len(measured),
            "rounds_mean": float(np.mean(rounds)), "measured_ms_mean": float(np.mean(measured)),
            "predicted_ms_mean": float(predicted.mean()), "host_ms_mean": float(np.mean(host)),
            "host_per_round_ms": host_per_round_ms, "calibration": calibration,
            "relative_error": float(error)}  # fmt: skip
