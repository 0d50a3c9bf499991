"""Where the golden fixtures are: ``$POLICY_ACCEL_FIXTURES``, else ``shared/fixtures`` beside the
checkout (``../shared``, as CI lays it out) or inside it.

Tests that need them skip when they are absent, except under CI (``CI`` set), where an absent
fixture directory is an error: a green run must not silently skip the reference checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_fixtures() -> Path:
    candidates = [ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures"]
    if os.environ.get("POLICY_ACCEL_FIXTURES"):
        candidates.insert(0, Path(os.environ["POLICY_ACCEL_FIXTURES"]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


FIXTURES = shared_fixtures()


def require(path: Path) -> None:
    """Skip the calling module when ``path`` is missing (fail under CI)."""
    if path.exists():
        return
    message = f"golden fixtures not found at {path} (set POLICY_ACCEL_FIXTURES)"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)
