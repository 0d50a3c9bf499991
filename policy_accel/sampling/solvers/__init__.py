"""The solver family. Each solver is a plain function
``solver(problem, init, executor, options) -> SampleResult`` with a frozen options dataclass;
:data:`SOLVERS` registers them and :func:`policy_accel.sample` is the front door."""

from policy_accel.sampling.solvers.chord import ChordOptions, chord
from policy_accel.sampling.solvers.newton import NewtonOptions, newton
from policy_accel.sampling.solvers.paradigms import ParadigmsOptions, paradigms
from policy_accel.sampling.solvers.picard import PicardOptions, picard
from policy_accel.sampling.solvers.sequential import SequentialOptions, sequential
from policy_accel.sampling.solvers.srds import SRDSOptions, srds
from policy_accel.sampling.solvers.taa import TAAOptions, taa

SOLVERS = {
    "sequential": (sequential, SequentialOptions),
    "paradigms": (paradigms, ParadigmsOptions),
    "picard": (picard, PicardOptions),
    "taa": (taa, TAAOptions),
    "srds": (srds, SRDSOptions),
    "newton": (newton, NewtonOptions),
    "chord": (chord, ChordOptions),
}

__all__ = [
    "SOLVERS",
    "ChordOptions",
    "NewtonOptions",
    "ParadigmsOptions",
    "PicardOptions",
    "SequentialOptions",
    "SRDSOptions",
    "TAAOptions",
]
