"""Boundary checks: shapes, dtypes and ranks are rejected with the offending values named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIN_CLIENTS = 3


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half precisions (bf16/f16), the input dtype otherwise."""
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def check_updates(updates) -> jax.Array:
  """Validates the ``(K, m, n)`` update stack; returns it as a JAX array.

  Raises:
    ValueError: wrong ``ndim``, fewer than 3 clients, an empty axis, or a non-float dtype.
  """
  shape = getattr(updates, "shape", None)
  dtype = getattr(updates, "dtype", None)
  if shape is None or dtype is None:
    updates = np.asarray(updates)
    shape, dtype = updates.shape, updates.dtype
  if len(shape) != 3:
    raise ValueError(
        f"updates must have shape (K, m, n) = (clients, rows, cols); got ndim={len(shape)}, "
        f"shape={tuple(shape)}. Stack client updates on axis 0 (e.g. jnp.stack(list_of_updates))."
    )
  num_clients, m, n = shape
  if num_clients < MIN_CLIENTS:
    raise ValueError(
        f"CLAIR needs at least {MIN_CLIENTS} clients to tell a majority; got K={num_clients} "
        f"(updates.shape={tuple(shape)})."
    )
  if m < 1 or n < 1:
    raise ValueError(f"updates has an empty axis: shape={tuple(shape)}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"updates must be a floating dtype (float16/bfloat16/float32/float64); got {dtype} "
        f"with shape={tuple(shape)}. Cast first, e.g. updates.astype(jnp.float32)."
    )
  return jnp.asarray(updates)


def check_rank(rank: int, shape: tuple[int, int, int]) -> int:
  """Checks ``1 <= rank <= min(m, K*n)`` and returns it as an ``int``."""
  num_clients, m, n = shape
  limit = min(m, num_clients * n)
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(f"rank must be an int or None; got {rank!r} of type {type(rank).__name__}.")
  if not 1 <= rank <= limit:
    raise ValueError(
        f"rank must satisfy 1 <= rank <= min(m, K*n) = min({m}, {num_clients}*{n}) = {limit}; "
        f"got rank={rank} for updates.shape={tuple(shape)}."
    )
  return int(rank)


def is_traced(x) -> bool:
  """Whether ``x`` is an abstract value (inside jit/vmap), where value checks cannot raise."""
  return isinstance(x, jax.core.Tracer)


def check_client_weights(client_weights, num_clients: int, dtype) -> jax.Array:
  """``(K,)`` group-penalty weights: ones by default; concrete ones finite and >= 0.

  A weight scales how much a client may deviate before the group penalty lets it go, so
  a negative or NaN weight has no meaning (the convex program would be unbounded).
  """
  if client_weights is None:
    return jnp.ones((num_clients,), compute_dtype(dtype))
  client_weights = jnp.asarray(client_weights)
  if client_weights.shape != (num_clients,):
    raise ValueError(f"client_weights must have shape (K,) = ({num_clients},); "
                     f"got {client_weights.shape}.")
  if not is_traced(client_weights):
    values = np.asarray(client_weights, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
    if bad.size:
      raise ValueError(
          f"client_weights must be finite and >= 0; clients {bad.tolist()} have "
          f"{values[bad].tolist()}.")
  return client_weights


def check_any_finite(finite, shape, what: str) -> None:
  """Raises the one error for input with no finite client (``finite``: ``(K,)`` bool)."""
  if not np.asarray(finite).any():
    raise ValueError(f"all {shape[0]} client {what} contain NaN or Inf (shape="
                     f"{tuple(shape)}); there is nothing to aggregate.")
