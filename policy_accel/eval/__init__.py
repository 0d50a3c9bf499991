"""Rollout evaluation of policies in the simulated tasks of :mod:`envs`."""

from policy_accel.eval.rollout import EpisodeResult, replan_noise, run_episodes, summarize

__all__ = ["EpisodeResult", "replan_noise", "run_episodes", "summarize"]
