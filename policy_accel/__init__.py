"""policy_accel: exact parallel-in-time sampling for diffusion robot policies."""

from policy_accel.policies.loading import load_policy
from policy_accel.sampling import DenoisingProblem, SampleResult, sample

__all__ = ["DenoisingProblem", "SampleResult", "load_policy", "sample"]
__version__ = "0.1.0"
