"""Where the benchmarks write their results and read the shipped checkpoints and the golden
fixtures: one home for all three.

No path is derived from this package's location alone: installed without ``-e`` the package
lives in ``site-packages``, where none of ``benchmarks/results``, ``checkpoints/`` or the
fixtures is.

* Results: a benchmark's ``--output`` when given; else ``$POLICY_ACCEL_RESULTS``; else
  ``benchmarks/results`` under the working directory (the repository's tables, when run from its
  root). The folder is created.
* Shipped checkpoints (not part of an installed package): ``$POLICY_ACCEL_CHECKPOINTS``; else
  ``checkpoints`` under the working directory; else the source checkout's (an editable install
  run from elsewhere).
* Golden fixtures: ``$POLICY_ACCEL_FIXTURES`` (as the tests read it); else ``shared/fixtures``
  beside the working directory (``../shared``, as CI lays it out) or inside it; else beside the
  source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_ENV = "POLICY_ACCEL_RESULTS"
CHECKPOINTS_ENV = "POLICY_ACCEL_CHECKPOINTS"
FIXTURES_ENV = "POLICY_ACCEL_FIXTURES"
RESULTS = Path("benchmarks") / "results"
CHECKPOINTS = Path("checkpoints")
FIXTURES = Path("shared") / "fixtures"


def results_dir() -> Path:
    """The results folder (``$POLICY_ACCEL_RESULTS``, else ``./benchmarks/results``), created."""
    directory = Path(os.environ.get(RESULTS_ENV) or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def result_path(name: str | Path, output: str | Path | None = None) -> Path:
    """Where a benchmark writes ``name``: ``output`` when the caller gave one, else ``name`` in
    :func:`results_dir`; the file's folder is created."""
    path = Path(output) if output is not None else results_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def checkpoints_dir() -> Path:
    """The shipped checkpoints' folder (searched as the module docstring says)."""
    checkout = _source_checkout()
    return _first_folder(
        "shipped checkpoints",
        CHECKPOINTS_ENV,
        [CHECKPOINTS] + ([checkout / CHECKPOINTS] if checkout else []),
        "run from the repository root, or pass the checkpoint path",
    )


def fixtures_dir() -> Path:
    """The golden fixtures' folder (searched as the module docstring says)."""
    checkout = _source_checkout()
    return _first_folder(
        "golden fixtures",
        FIXTURES_ENV,
        [Path("..") / FIXTURES, FIXTURES] + ([checkout.parent / FIXTURES] if checkout else []),
        "pass --fixtures",
    )


def _source_checkout() -> Path | None:
    """The repository this package was imported from, when it is one (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def _first_folder(what: str, variable: str, candidates: list[Path], otherwise: str) -> Path:
    given = os.environ.get(variable)
    if given:
        if not Path(given).is_dir():
            raise FileNotFoundError(f"${variable}={given} is not a folder: fix or unset it.")
        return Path(given)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no {what}: none of {[str(c) for c in candidates]} is a folder (working directory "
        f"{Path.cwd()}); set ${variable}, {otherwise}."
    )
