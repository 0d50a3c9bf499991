"""Delay estimation: a windowed high percentile, warm-up excluded, never below the last delay."""

import pytest

from policy_accel.control import DelayEstimator


def test_a_warm_up_spike_does_not_inflate_the_estimate():
    estimator = DelayEstimator(period_s=0.1, window=10, percentile=95, warmup=2)
    estimator.record(2.0)  # first plan: allocation, kernel selection
    assert estimator.steps == 20  # before anything else is known: the last delay
    estimator.record(0.9)
    for _ in range(8):
        estimator.record(0.25)
    assert estimator.steps == 3  # 0.25 s at 10 Hz: the actions are ready in the third step


def test_a_slower_plan_is_believed_at_once_a_faster_one_when_the_window_forgets():
    estimator = DelayEstimator(period_s=0.1, window=4, percentile=100, warmup=0)
    for _ in range(4):
        estimator.record(0.15)
    assert estimator.steps == 2
    estimator.record(0.42)
    assert estimator.steps == 5  # never below the last observed delay
    estimator.record(0.15)
    assert estimator.steps == 5  # the 0.42 s plan is still in the window
    for _ in range(3):
        estimator.record(0.15)
    assert estimator.steps == 2


def test_the_percentile_ignores_rare_outliers_in_a_long_window():
    estimator = DelayEstimator(period_s=0.1, window=40, percentile=90, warmup=0)
    for k in range(40):
        estimator.record(0.8 if k == 5 else 0.12)
    assert estimator.steps == 2


def test_no_measurement_gives_the_initial_estimate():
    assert DelayEstimator(period_s=0.05, initial_steps=3).steps == 3
    assert DelayEstimator(period_s=0.05).steps == 0


def test_bad_settings_and_latencies_are_refused():
    with pytest.raises(ValueError, match="period_s must be positive"):
        DelayEstimator(period_s=0)
    with pytest.raises(ValueError, match="window must be a positive int"):
        DelayEstimator(period_s=0.1, window=0)
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\]"):
        DelayEstimator(period_s=0.1, percentile=101)
    with pytest.raises(ValueError, match="warmup must be a non-negative int"):
        DelayEstimator(period_s=0.1, warmup=-1)
    with pytest.raises(ValueError, match="latency_s must be a finite non-negative number"):
        DelayEstimator(period_s=0.1).record(float("nan"))
