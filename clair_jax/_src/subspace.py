"""Shared-subspace fitting and projection (the `subspace` and `refine` arrows)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stack_clients(updates: jax.Array) -> jax.Array:
  """Stacks client blocks side by side: ``(K, m, n) -> M = [D_1, ..., D_K]`` of shape ``(m, K*n)``."""
  num_clients, m, n = updates.shape
  return jnp.transpose(updates, (1, 0, 2)).reshape(m, num_clients * n)


def unstack_clients(stacked: jax.Array, num_clients: int) -> jax.Array:
  """Inverse of :func:`stack_clients`: ``(m, K*n) -> (K, m, n)``."""
  m, width = stacked.shape
  return jnp.transpose(stacked.reshape(m, num_clients, width // num_clients), (1, 0, 2))


def fit_subspace(updates: jax.Array, mask: jax.Array | None, rank: int) -> jax.Array:
  """Top-``rank`` left singular vectors of the stacked updates of the clients in ``mask``.

  .. math::
    \\hat U = \\operatorname{top}_r \\operatorname{left-sv}\\big([D_k]_{k: \\text{mask}_k}\\big)

  Clients outside ``mask`` are zeroed, which leaves the left singular vectors of the
  others unchanged, so the shapes stay static under ``jit``.

  Args:
    updates: ``(K, m, n)`` client updates.
    mask: ``(K,)`` bool, clients to fit on; ``None`` means all.
    rank: number of columns ``r`` of the subspace, ``1 <= r <= min(m, K*n)``.

  Returns:
    ``(m, r)`` matrix with orthonormal columns.
  """
  if mask is not None:
    updates = jnp.where(mask[:, None, None], updates, 0)
  left, _, _ = jnp.linalg.svd(stack_clients(updates), full_matrices=False)
  return left[:, :rank]


def project_onto_subspace(updates: jax.Array, subspace: jax.Array) -> jax.Array:
  """Projects each client's update onto the column space: ``U U^T D_k`` for every ``k``."""
  coefficients = jnp.einsum("mr,kmn->krn", subspace, updates)
  return jnp.einsum("mr,krn->kmn", subspace, coefficients)
