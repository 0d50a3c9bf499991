"""Result files as strict JSON, written atomically.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON: other tools (``jq``,
JavaScript, pandas in strict mode) refuse the file. An undefined statistic (the confidence
interval of one episode, the percentile of no plans) is written as ``null`` instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def strict(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain and non-finite floats made ``None``."""
    if isinstance(value, dict):
        return {str(key): strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    if isinstance(value, np.ndarray):
        return strict(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any) -> str:
    """Strict JSON text of ``value`` (indented; ``NaN`` and infinities as ``null``)."""
    return json.dumps(strict(value), indent=2, allow_nan=False, default=str)


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` to ``path`` as strict JSON through a temporary file, so a reader (or an
    interrupted run) never sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(dumps(value) + "\n")
    temporary.replace(path)
    return path
