"""diffusers image pipelines (Stable Diffusion, DiT) -> :class:`DenoisingProblem`, and the
``generate`` front door that samples them with any registered solver."""

from policy_accel.adapters.dit import GuidedDiTDenoiser, dit_pipeline_noise, dit_problem
from policy_accel.adapters.generate import generate
from policy_accel.adapters.stable_diffusion import GuidedUNetDenoiser, stable_diffusion_problem

__all__ = [
    "GuidedDiTDenoiser",
    "GuidedUNetDenoiser",
    "dit_pipeline_noise",
    "dit_problem",
    "generate",
    "stable_diffusion_problem",
]
