"""What every study and CLI writes: strict JSON, README tables between markers, numbers.

One writer of each kind, so that every ``report.json`` parses with any JSON reader (no
``NaN`` / ``Infinity``: non-finite floats become ``null``) and every README table is
replaced the same way (the lines between a begin and an end marker).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
  """``value`` with numpy scalars and arrays made plain, and non-finite floats ``None``."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def write_json(path: str, report: Any, indent: int = 1) -> None:
  """Writes ``report`` as strict JSON (:func:`json_safe`; ``allow_nan=False`` checks it)."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(json_safe(report), f, indent=indent, allow_nan=False)
    f.write("\n")


def replace_between_markers(path: str, text: str, begin: str, end_marker: str) -> None:
  """Replaces what lies between the marker lines ``begin`` and ``end_marker`` in ``path``.

  Raises:
    ValueError: if the markers are missing or out of order.
  """
  with open(path, encoding="utf-8") as f:
    content = f.read()
  start = content.find(begin)
  end = content.find(end_marker)
  if start < 0 or end < 0 or end < start:
    raise ValueError(
        f"{path} must contain the lines {begin!r} and {end_marker!r} (in that order)")
  head = content[: start + len(begin)]
  with open(path, "w", encoding="utf-8") as f:
    f.write(head + "\n" + text.rstrip("\n") + "\n" + content[end:])


def format_number(value) -> str:
  """Table cells: 3 significant figures at most (``n/a`` for missing, ``inf``)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if math.isinf(value):
    return "inf"
  if value >= 100:
    return f"{value:.0f}"
  if value >= 10:
    return f"{value:.1f}"
  return f"{value:.2f}"


def geometric_mean(values) -> float:
  """Geometric mean (``nan`` for none, ``inf`` if any value is not finite)."""
  values = np.asarray(list(values), np.float64)
  if values.size == 0:
    return float("nan")
  if np.any(~np.isfinite(values)):
    return float("inf")
  return float(np.exp(np.mean(np.log(np.maximum(values, 1e-300)))))


def pyplot():
  """``matplotlib.pyplot`` on the off-screen Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt
