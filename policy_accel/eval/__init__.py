"""Rollout evaluation of policies in the simulated tasks of :mod:`envs` (``policy-accel eval``)."""

from policy_accel.eval.config import EvalConfig, eval_config_from_dict
from policy_accel.eval.evaluate import evaluate, rollout

__all__ = ["EvalConfig", "eval_config_from_dict", "evaluate", "rollout"]
