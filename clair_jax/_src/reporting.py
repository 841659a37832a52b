"""What every study and CLI writes: strict JSON, README tables between markers, numbers.

One writer of each kind, so that every ``report.json`` parses with any JSON reader (no
``NaN`` / ``Infinity``: non-finite floats become ``null``), every README table is
replaced the same way (the lines between a begin and an end marker) and every report
describes where it ran with the same keys (:func:`environment`, :func:`runtime_text`).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
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


def _version(package: str) -> str | None:
  """The installed version of ``package`` (``None`` when it is not installed)."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict:
  """Where a run happened: package versions, the JAX backend and device, the host.

  Every study stores this as its ``report.json``'s ``"environment"``, so the keys are the
  same in every report. Keys: ``jax``, ``jaxlib``, ``numpy``, ``clair_jax`` (versions),
  ``backend`` (``jax.default_backend()``), ``device_kind`` and ``device_count`` (the
  default backend's devices), ``python``, ``machine`` (``platform.machine()``) and
  ``cpus`` (``os.cpu_count()``).
  """
  # Imported here: the JSON and table writers above are used where JAX is not needed.
  import jax  # pylint: disable=import-outside-toplevel

  from clair_jax import __version__  # pylint: disable=import-outside-toplevel

  devices = jax.devices()
  return {
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "numpy": np.__version__,
      "clair_jax": __version__,
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "cpus": os.cpu_count(),
  }


def runtime_text(runtime_s: float, env: dict | None = None, *, host: bool = False) -> str:
  """A table's runtime note: ``"84 s (cpu)"``, or with ``host``
  ``"84 s on x86_64 (cpu, 16 cores)"``.

  Args:
    runtime_s: the run's wall time in seconds.
    env: an :func:`environment` dict (computed when ``None``).
    host: also name the machine and its CPU count.
  """
  env = environment() if env is None else env
  if host:
    return (f"{runtime_s:.0f} s on {env['machine']} ({env['backend']}, "
            f"{env['cpus']} cores)")
  return f"{runtime_s:.0f} s ({env['backend']})"
