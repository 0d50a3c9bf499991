"""Every way a checkpoint can be refused, under one base class.

``except CheckpointError`` catches them all (the CLI turns one into a one-line message and exit
code 2); each message names the file and, where there is one, the config key.
"""

from __future__ import annotations

import pickle


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint file that is truncated, corrupt, too large or not in the expected layout."""


class CheckpointContentError(CheckpointError):
    """A checkpoint whose configuration or weights do not describe a supported policy."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that asks the loader to run code or build objects it never needs (a pickle
    global outside the allow-list, an allowed function with an argument that would allocate
    memory out of proportion to the file, a config interpolation)."""


class LeRobotCheckpointError(CheckpointError):
    """A LeRobot checkpoint directory that is missing a file or holds a malformed one."""
