"""Save and reload the base model and the client adapters (a documented ``.npz`` format).

Format: one ``numpy.savez`` archive per state. Every array leaf of the pure-dict state
(``nnx.to_pure_dict``) is stored under its path joined with ``/`` (integer keys, such as
layer indices, are written as ``#<int>`` so they round-trip), plus a ``__meta__`` entry
holding a JSON string (the model config and anything the caller adds). Stacked client
adapters are stored the same way with their leading ``(K, ...)`` axis. Loading needs
nothing but numpy and gives back the pure dict, ready for ``nnx.replace_by_pure_dict``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

_META = "__meta__"


def _encode(key: Any) -> str:
  if isinstance(key, int):
    return f"#{key}"
  key = str(key)
  if "/" in key or key.startswith("#") or key == _META:
    raise ValueError(f"cannot store state key {key!r}")
  return key


def _decode(token: str) -> Any:
  return int(token[1:]) if token.startswith("#") else token


def flatten(pure: dict, prefix: tuple = ()) -> dict[str, np.ndarray]:
  """``{"a": {0: x}} -> {"a/#0": x}`` for a nested pure dict."""
  out = {}
  for key, value in pure.items():
    path = prefix + (_encode(key),)
    if isinstance(value, dict):
      out.update(flatten(value, path))
    else:
      out["/".join(path)] = np.asarray(value)
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """Inverse of :func:`flatten`."""
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = [_decode(t) for t in name.split("/")]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def save_state(path: str, state, meta: dict | None = None) -> str:
  """Writes an ``nnx.State`` (or a pure dict) to ``path`` (``.npz``).

  Args:
    path: file name; ``.npz`` is appended when missing.
    state: ``nnx.State`` or pure dict of arrays.
    meta: JSON-serialisable metadata.

  Returns:
    the path written.
  """
  pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  flat = flatten(jax.device_get(pure))
  flat[_META] = np.asarray(json.dumps(meta or {}))
  if not path.endswith(".npz"):
    path += ".npz"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **flat)
  return path


def load_state(path: str) -> tuple[dict, dict]:
  """Reads a file written by :func:`save_state`.

  Returns:
    ``(pure_dict, meta)``.
  """
  with np.load(path, allow_pickle=False) as archive:
    flat = {k: archive[k] for k in archive.files if k != _META}
    meta = json.loads(str(archive[_META])) if _META in archive.files else {}
  return unflatten(flat), meta


def restore_into(state, pure: dict):
  """Returns a copy of ``state`` (``nnx.State``) with values from ``pure``; shapes must match.

  Raises:
    ValueError: when a shape differs.
  """
  current = nnx.to_pure_dict(state)
  shapes = jax.tree.map(np.shape, current)
  loaded = jax.tree.map(np.shape, pure)
  if shapes != loaded:
    raise ValueError(f"checkpoint shapes {loaded} do not match the state {shapes}")
  new = jax.tree.map(lambda x: x, state)
  nnx.replace_by_pure_dict(new, jax.tree.map(jax.numpy.asarray, pure))
  return new
