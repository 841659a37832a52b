r"""The ``K`` client updates the refine reads, dense or factored, behind one set of operations.

The refine (:mod:`clair_jax._src.refine`) needs a handful of statistics of the client
updates ``X_k`` (``m x n``): their Gram ``sum_k X_k X_k^T``, squared norms, coefficients
``U^T X_k`` in a basis, a weighted combination ``sum_k c_k X_k``, bilinear forms
``u_i^T X_k v_i`` and distances to a point. :class:`DenseClients` computes them on the
``(K, m, n)`` stack. :class:`FactoredClients` computes the same quantities from factors
``X_k = L_k R_k`` (``L_k`` ``m x q``, ``R_k`` ``q x n``) without forming any ``X_k``:

.. math::
  \sum_k X_k X_k^\top = \sum_k L_k (R_k R_k^\top) L_k^\top,\qquad
  \|X_k\|_F^2 = \langle L_k^\top L_k,\ R_k R_k^\top\rangle,\qquad
  U^\top X_k = (U^\top L_k) R_k,

and client inner products ``<X_k, X_j> = <L_k^T L_j, R_k R_j^T>`` (a ``K x K`` kernel), so
a LoRA module of ``K = 64`` clients at ``4096 x 4096`` costs ``q x q`` and ``K q x K q``
products instead of a ``(K, m, n)`` stack (a 137 GFLOP Gram in the shared coordinates).

Both are pytrees (NamedTuples), so the refine compiles once per kind and shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src import robust


class DenseClients(NamedTuple):
  """Client updates as a dense ``(K, m, n)`` stack."""

  updates: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.updates.shape

  @property
  def dtype(self):
    return self.updates.dtype

  def astype(self, dtype) -> DenseClients:
    return DenseClients(self.updates.astype(dtype))

  def finite(self) -> jax.Array:
    """``(K,)`` bool: every entry of ``X_k`` is finite."""
    return robust.finite_clients(self.updates)

  def masked(self, keep: jax.Array) -> DenseClients:
    """Clients outside ``keep`` set to zero."""
    return DenseClients(jnp.where(keep[:, None, None], self.updates, 0.0))

  def scaled(self, factor) -> DenseClients:
    return DenseClients(self.updates * factor)

  def gram(self) -> jax.Array:
    """``sum_k X_k X_k^T`` (``m x m``)."""
    return jnp.einsum("kmn,kpn->mp", self.updates, self.updates)

  def sq_norms(self) -> jax.Array:
    """``(K,)`` ``||X_k||_F^2``."""
    return jnp.sum(jnp.square(self.updates), axis=(1, 2))

  def coefficients(self, basis: jax.Array) -> jax.Array:
    """``(K, w, n)`` ``basis^T X_k`` for ``basis`` ``(m, w)``."""
    return jnp.einsum("mw,kmn->kwn", basis, self.updates)

  def combination(self, weights: jax.Array) -> jax.Array:
    """``sum_k weights_k X_k`` (``m x n``)."""
    return jnp.einsum("k,kmn->mn", weights, self.updates)

  def bilinear(self, left_vectors: jax.Array, right_vectors_t: jax.Array) -> jax.Array:
    """``(K, e)`` ``u_i^T X_k v_i`` for ``u`` ``(m, e)`` and ``v^T`` ``(e, n)``."""
    return jnp.einsum("mi,kmn,in->ki", left_vectors, self.updates, right_vectors_t)

  def distances(self, point: jax.Array) -> jax.Array:
    """``(K,)`` ``||X_k - point||_F``."""
    return jnp.sqrt(jnp.sum(jnp.square(self.updates - point[None]), axis=(1, 2)))

  def combination_distances(self):
    """``c -> (K,)`` ``||X_k - sum_j c_j X_j||_F`` (the Weiszfeld steps' distances)."""
    return lambda weights: self.distances(self.combination(weights))

  def project(self, basis: jax.Array, coefficients: jax.Array) -> jax.Array:
    """``(K, m, n)`` ``basis @ coefficients_k`` (only the dense form can hold it)."""
    return jnp.einsum("mw,kwn->kmn", basis, coefficients)


class FactoredClients(NamedTuple):
  """Client updates ``X_k = left[k] @ right[k]``: ``left (K, m, q)``, ``right (K, q, n)``.

  Distances to a combination of clients use the ``K x K`` kernel ``<X_k, X_j>``
  (``||X_k - z||^2 = <X_k, X_k> - 2 <X_k, z> + <z, z>``): exact in exact arithmetic, with
  a rounding error of ``eps ||X||^2`` on the squared distance (the dense form's is
  ``eps d^2``), which only moves the Weiszfeld weights of clients far closer together than
  their norms.
  """

  left: jax.Array
  right: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.left.shape[0], self.left.shape[1], self.right.shape[2])

  @property
  def dtype(self):
    return jnp.result_type(self.left.dtype, self.right.dtype)

  def astype(self, dtype) -> FactoredClients:
    return FactoredClients(self.left.astype(dtype), self.right.astype(dtype))

  def finite(self) -> jax.Array:
    return robust.finite_clients(self.left) & robust.finite_clients(self.right)

  def masked(self, keep: jax.Array) -> FactoredClients:
    keep = keep[:, None, None]
    return FactoredClients(jnp.where(keep, self.left, 0.0), jnp.where(keep, self.right, 0.0))

  def scaled(self, factor) -> FactoredClients:
    return FactoredClients(self.left * factor, self.right)

  def _right_grams(self) -> jax.Array:
    """``(K, q, q)`` ``R_k R_k^T``."""
    return jnp.einsum("kqn,ksn->kqs", self.right, self.right)

  def gram(self) -> jax.Array:
    inner = jnp.einsum("kmq,kqs->kms", self.left, self._right_grams())
    num_clients, m, q = self.left.shape
    return (inner.transpose(1, 0, 2).reshape(m, num_clients * q)
            @ self.left.transpose(1, 0, 2).reshape(m, num_clients * q).T)

  def sq_norms(self) -> jax.Array:
    left_grams = jnp.einsum("kmq,kms->kqs", self.left, self.left)
    return jnp.sum(left_grams * self._right_grams(), axis=(1, 2))

  def coefficients(self, basis: jax.Array) -> jax.Array:
    return jnp.einsum("kwq,kqn->kwn", jnp.einsum("mw,kmq->kwq", basis, self.left), self.right)

  def combination(self, weights: jax.Array) -> jax.Array:
    num_clients, m, q = self.left.shape
    weighted = (self.left * weights[:, None, None]).transpose(1, 0, 2)
    return weighted.reshape(m, num_clients * q) @ self.right.reshape(num_clients * q, -1)

  def bilinear(self, left_vectors: jax.Array, right_vectors_t: jax.Array) -> jax.Array:
    along_left = jnp.einsum("mi,kmq->kiq", left_vectors, self.left)
    along_right = jnp.einsum("kqn,in->kqi", self.right, right_vectors_t)
    return jnp.einsum("kiq,kqi->ki", along_left, along_right)

  def distances(self, point: jax.Array) -> jax.Array:
    cross = jnp.einsum("kmq,mn,kqn->k", self.left, point, self.right)
    squared = self.sq_norms() - 2.0 * cross + jnp.sum(jnp.square(point))
    return jnp.sqrt(jnp.maximum(squared, 0.0))

  def kernel(self) -> jax.Array:
    """``(K, K)`` client inner products ``<X_k, X_j>_F = <L_k^T L_j, R_k R_j^T>``."""
    num_clients, m, q = self.left.shape
    left = self.left.transpose(1, 0, 2).reshape(m, num_clients * q)
    right = self.right.reshape(num_clients * q, -1)
    products = (left.T @ left) * (right @ right.T)
    return products.reshape(num_clients, q, num_clients, q).sum(axis=(1, 3))

  def combination_distances(self):
    kernel = self.kernel()  # once, outside the caller's iterations
    return lambda weights: kernel_distances(kernel, weights)


def kernel_distances(kernel: jax.Array, weights: jax.Array) -> jax.Array:
  """``(K,)`` ``||X_k - sum_j w_j X_j||`` from the client kernel ``<X_k, X_j>``."""
  along = kernel @ weights
  squared = jnp.diagonal(kernel) - 2.0 * along + weights @ along
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def as_clients(updates) -> DenseClients | FactoredClients:
  """A client stack as is, or a ``(K, m, n)`` array as :class:`DenseClients`."""
  if isinstance(updates, (DenseClients, FactoredClients)):
    return updates
  return DenseClients(updates)
