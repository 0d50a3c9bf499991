"""The exact parallel sampling engine: problems, step rules, solvers, warm starts."""

from policy_accel.sampling.errors import NonFiniteDenoiserOutput, SolverOptionError
from policy_accel.sampling.jacobians import Jacobians, estimate_jacobians
from policy_accel.sampling.problem import DenoisingProblem
from policy_accel.sampling.result import SampleResult
from policy_accel.sampling.rules import UnsupportedSchedulerError, rule_from_scheduler
from policy_accel.sampling.sample import sample, solver_options
from policy_accel.sampling.solvers import SOLVERS

__all__ = [
    "DenoisingProblem",
    "Jacobians",
    "NonFiniteDenoiserOutput",
    "SOLVERS",
    "SampleResult",
    "SolverOptionError",
    "estimate_jacobians",
    "UnsupportedSchedulerError",
    "rule_from_scheduler",
    "sample",
    "solver_options",
]
