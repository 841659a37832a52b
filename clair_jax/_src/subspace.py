"""Shared-subspace fitting and projection (the `subspace` and `refine` arrows)."""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def stack_clients(updates: jax.Array) -> jax.Array:
  """Stacks client blocks side by side: ``(K, m, n) -> M = [D_1, ..., D_K]``, ``(m, K*n)``."""
  num_clients, m, n = updates.shape
  return jnp.transpose(updates, (1, 0, 2)).reshape(m, num_clients * n)


def unstack_clients(stacked: jax.Array, num_clients: int) -> jax.Array:
  """Inverse of :func:`stack_clients`: ``(m, K*n) -> (K, m, n)``."""
  m, width = stacked.shape
  return jnp.transpose(stacked.reshape(m, num_clients, width // num_clients), (1, 0, 2))


def to_columns(blocks: jax.Array) -> jax.Array:
  """Client blocks ``(K, m, n)`` -> column layout ``(m, K, n)`` (one transpose).

  ``x.reshape(m, K * n)`` is then the stacked matrix of :func:`stack_clients`, but the
  products (:func:`cross_of`) contract ``(K, n)`` in place, so clients sharded on ``K``
  are never gathered.
  """
  return jnp.transpose(blocks, (1, 0, 2))


def from_columns(columns: jax.Array) -> jax.Array:
  """Column layout ``(m, K, n)`` -> client blocks ``(K, m, n)``."""
  return jnp.transpose(columns, (1, 0, 2))


class RitzPairs(NamedTuple):
  """Ritz approximation of the top singular triplets of ``X`` (``m x N``) on a basis.

  ``vectors[:, i]`` approximates the ``i``-th left singular vector of ``X`` and
  ``singular_values[i]`` its singular value (descending).
  """

  vectors: jax.Array          # (m, s) orthonormal Ritz vectors V
  singular_values: jax.Array  # (s,) sqrt of the Ritz values of X X^T, descending
  coefficients: jax.Array     # (s, N) V^T X
  residuals: jax.Array        # (s,) ||X X^T v_i - theta_i v_i|| / theta_1
  next_basis: jax.Array       # (m, s) orth(X X^T V): one more power step, the next warm start
  num_iters: jax.Array        # int32, power steps taken


def rayleigh_ritz(stacked: jax.Array, basis: jax.Array,
                  refine_below: jax.Array | None = None,
                  column_mask: jax.Array | None = None) -> RitzPairs:
  r"""Ritz pairs of ``G = X X^T`` on ``range(basis)`` without forming ``G``.

  .. math::
    B = Q^\top X,\quad Q^\top G Q = B B^\top = W \Theta W^\top,
    \quad V = Q W,\quad r_i = \|G v_i - \theta_i v_i\| / \theta_1

  Two thin GEMMs against ``X`` (``Q^T X`` and ``G Q = X B^T``) and an ``s x s`` ``eigh``:
  ``O(m N s)`` instead of the Gram's ``O(m^2 N)``. For client blocks, ``X`` is the stacked
  ``[X_1, ..., X_K]`` (:func:`stack_clients`) and the ``(m, s)`` and ``(s, s)`` products
  are sums over clients: with clients sharded, the only cross-device traffic.

  The ``eigh`` gives singular values to ``eps s_1^2 / s_i``. With ``refine_below = t``,
  where that is coarse at ``t`` (``eps (s_1 / t)^2 > 1e-4``), ``W`` and ``sqrt(Theta)``
  are taken from :func:`accurate_rotation` instead (to ``eps s_1``): a solver thresholding
  at ``t`` needs them (see :func:`clair_jax._src.svt.svt_warm`).

  ``column_mask`` (0/1, of ``stacked``'s rank with a leading 1, e.g. ``(1, K, 1)`` for
  clients in the column layout) restricts ``X`` to the masked columns, ``G = X W X^T``,
  without copying ``X``: ``B = Q^T X W`` and ``G Q = X B^T``.
  """
  coefficients = jnp.tensordot(basis, stacked, axes=(0, 0))            # (s, ...)
  if column_mask is not None:
    coefficients = coefficients * column_mask
  theta, rotation = jnp.linalg.eigh(gram_of(coefficients))
  theta, rotation = jnp.maximum(theta[::-1], 0.0), rotation[:, ::-1]
  if refine_below is not None:
    coarse = jnp.finfo(theta.dtype).eps * theta[0] > 1e-4 * refine_below**2

    def refine(_):
      rotation, singular_values = accurate_rotation(coefficients)
      return singular_values**2, rotation

    theta, rotation = jax.lax.cond(coarse, refine, lambda _: (theta, rotation), None)
  vectors = basis @ rotation
  gram_vectors = cross_of(stacked, coefficients) @ rotation
  scale = jnp.maximum(theta[0], jnp.finfo(theta.dtype).tiny)
  residuals = jnp.linalg.norm(gram_vectors - vectors * theta[None, :], axis=0) / scale
  return RitzPairs(vectors, jnp.sqrt(theta), jnp.tensordot(rotation, coefficients, (0, 0)),
                   residuals, jnp.linalg.qr(gram_vectors)[0], jnp.asarray(1, jnp.int32))


def accurate_rotation(coefficients: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Left singular vectors ``W`` and singular values of ``B`` (``(s, ...)``, ``s <= N``).

  .. math::
    B^\top = Q R\ (\text{thin QR}),\quad R = P \Sigma W^\top\ \Rightarrow\
    B = W \Sigma (Q P)^\top

  Backward stable: singular values to ``eps s_1``, where the ``eigh`` of ``B B^T`` gives
  them to ``eps s_1^2 / s_i`` (in float32, percents at ``s_i ~ s_1 / 300``). Cost: one
  Householder QR of ``N x s`` (no ``Q`` formed) and an ``s x s`` SVD. ``B`` is stacked,
  so this gathers sharded clients.
  """
  stacked = coefficients.reshape(coefficients.shape[0], -1)
  triangle = jnp.linalg.qr(stacked.T, mode="r")
  _, singular_values, rotation_t = jnp.linalg.svd(triangle, full_matrices=False)
  return rotation_t.T, singular_values


def cross_of(x: jax.Array, y: jax.Array) -> jax.Array:
  """``X Y^T`` for ``(m, ...)`` and ``(p, ...)`` arrays, contracting all trailing axes.

  On the column layout ``(m, K, n)`` the trailing axes are contiguous, so this is one GEMM
  without a transpose, and with clients sharded on ``K`` a partial sum plus an
  all-reduce (a reshape to ``(m, K n)`` would gather).
  """
  axes = tuple(range(1, x.ndim))
  return jnp.tensordot(x, y, axes=(axes, axes))


def gram_of(x: jax.Array) -> jax.Array:
  """``X X^T`` for an ``(m, ...)`` array (see :func:`cross_of`)."""
  return cross_of(x, x)


def subspace_iteration(
    stacked: jax.Array,
    basis: jax.Array,
    converged: Callable[[RitzPairs], jax.Array],
    max_iters: int,
    refine_below: jax.Array | None = None,
    error: Callable[[RitzPairs], jax.Array] | None = None,
    tol: float | jax.Array | None = None,
    column_mask: jax.Array | None = None,
) -> RitzPairs:
  """Warm-started block power iteration with Rayleigh-Ritz, until ``converged(pairs)``.

  ``Q_{t+1} = orth(X X^T Q_t)`` (Rutishauser's subspace iteration; the top-``j`` Ritz pairs
  converge like ``(s_{s+1} / s_j)^{2t}``). From a basis close to the answer (the previous
  iterate of a solver, the previous benign set of the trimming loop) one or two steps
  suffice. Stops after ``max_iters`` Rayleigh-Ritz evaluations; the caller checks
  ``converged`` on the result and falls back to a full eigen-decomposition if needed.

  Args:
    stacked: ``(m, N)`` matrix ``X``, or ``(m, K, n)`` client blocks in the column
      layout (trailing axes are contracted together).
    basis: ``(m, s)`` orthonormal start.
    converged: predicate on :class:`RitzPairs` (traced).
    max_iters: cap on power steps (static).
    refine_below: threshold at which Ritz values must be accurate (see
      :func:`rayleigh_ritz`); ``None``: the ``eigh``'s are enough.
    error, tol: optional scalar error of the pairs that ``converged`` wants below ``tol``;
      given both, the iteration also stops (unconverged) once the mean observed rate
      ``(e_t / e_1)^(1 / (t - 1))`` cannot bring ``e`` below ``tol`` in the steps left:
      the caller's fallback is then cheaper than more steps. (The mean over all steps,
      since the largest residual can stall for a step or two and then fall again.)
    column_mask: optional 0/1 mask of the columns of ``X`` (see :func:`rayleigh_ritz`).

  Returns:
    :class:`RitzPairs` of the last step.
  """
  pairs = rayleigh_ritz(stacked, basis, refine_below, column_mask)
  error = (lambda _: jnp.asarray(0.0, pairs.residuals.dtype)) if error is None else error

  def hopeless(pairs, first_error):
    if tol is None:
      return jnp.asarray(False)
    current = error(pairs)
    steps_taken = jnp.maximum(pairs.num_iters - 1, 1).astype(current.dtype)
    ratio = current / jnp.maximum(first_error, jnp.finfo(current.dtype).tiny)
    rate = ratio ** (1.0 / steps_taken)
    steps_left = (max_iters - pairs.num_iters).astype(current.dtype)
    return (pairs.num_iters >= 2) & ((rate >= 1.0) | (current * rate**steps_left > tol))

  def cond(carry):
    pairs, first_error = carry
    return ((pairs.num_iters < max_iters) & ~converged(pairs)
            & ~hopeless(pairs, first_error))

  def body(carry):
    pairs, first_error = carry
    pairs_next = rayleigh_ritz(stacked, pairs.next_basis, refine_below, column_mask)
    return pairs_next._replace(num_iters=pairs.num_iters + 1), first_error

  return jax.lax.while_loop(cond, body, (pairs, error(pairs)))[0]


def start_basis(m: int, width: int, dtype) -> jax.Array:
  """A fixed (seeded) random orthonormal ``(m, width)`` start for :func:`subspace_iteration`.

  Built with NumPy at trace time, so it is a constant of the compiled program: a
  data-independent LAPACK call inside it could run concurrently with the batched ones,
  and jaxlib's CPU LAPACK kernels can deadlock a 2-thread pool when they overlap.
  """
  gaussian = np.random.default_rng(0).standard_normal((m, width))
  return jnp.asarray(np.linalg.qr(gaussian)[0], dtype)


# Iterative top-r fits: Ritz residual tolerance (relative to the top eigenvalue) and the
# number of extra columns that speed convergence (rate s_{r+p+1}^2 / s_r^2 per step).
FIT_TOL = 1e-5
FIT_MAX_ITERS = 40
FIT_METHODS = ("gram", "svd", "iterative", "auto")


def fit_width(m: int, width: int, rank: int) -> int:
  """Basis width ``s`` for an iterative top-``rank`` fit: ``rank + max(rank, 8)`` capped."""
  return min(m, width, rank + max(rank, 8))


def use_iterative(m: int, width: int, rank: int) -> bool:
  """Whether the iterative fit beats a full ``m x m`` ``eigh`` (``m >= 8 s``)."""
  return m >= 8 * fit_width(m, width, rank)


def fit_subspace(
    updates: jax.Array, mask: jax.Array | None, rank: int, method: str = "auto",
    basis: jax.Array | None = None,
) -> jax.Array:
  r"""Top-``rank`` left singular vectors of the stacked updates of the clients in ``mask``.

  .. math::
    \hat U = \operatorname{top}_r \operatorname{eigvec}\Big(\sum_{k \in \text{mask}}
      D_k D_k^\top\Big) = \operatorname{top}_r \operatorname{left-sv}\big([D_k]_{k \in
      \text{mask}}\big)

  Clients outside ``mask`` are zeroed, which leaves the left singular vectors of the
  others unchanged, so the shapes stay static under ``jit``.

  ``method="gram"`` eigen-decomposes the ``m x m`` Gram, a sum over clients
  (one all-reduce when clients are sharded); its subspace error is about
  ``eps * s_1^2 / (s_r^2 - s_{r+1}^2)``, ~1e-6 in float32 for well-conditioned signals.
  ``method="svd"`` takes the SVD of the stacked ``m x K n`` matrix: error
  ``eps * s_1 / (s_r - s_{r+1})``, slower, and gathers sharded clients.
  ``method="iterative"`` runs :func:`subspace_iteration` (never forms the Gram; warm
  start ``basis``, default a seeded random one) until the top-``rank`` Ritz residuals are
  below ``1e-5`` of ``s_1^2``, falling back to ``"gram"`` if they are not within 40 steps.
  ``method="auto"`` (default) is ``"iterative"`` when a warm ``basis`` is given or ``m`` is
  at least 8 times the basis width, else ``"gram"``.
  See :func:`fit_subspace_and_basis` for the warm start of the next call.

  Args:
    updates: ``(K, m, n)`` client updates.
    mask: ``(K,)`` bool, clients to fit on; ``None`` means all.
    rank: number of columns ``r`` of the subspace, ``1 <= r <= min(m, K*n)``.
    method: ``"gram"``, ``"svd"``, ``"iterative"`` or ``"auto"``.
    basis: optional ``(m, s)`` orthonormal warm start for ``"iterative"``, ``s >= rank``.

  Returns:
    ``(m, r)`` matrix with orthonormal columns.
  """
  return fit_subspace_and_basis(updates, mask, rank, method, basis)[0]


def fit_subspace_and_basis(
    updates: jax.Array, mask: jax.Array | None, rank: int, method: str = "auto",
    basis: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """:func:`fit_subspace` plus the warm start for the next iterative fit (``None`` if none)."""
  if mask is not None:
    # (where, not a product: clients outside the mask may hold NaN/Inf)
    updates = jnp.where(mask[:, None, None], updates, 0)
  return fit_columns(to_columns(updates), None, rank, method, basis)


def fit_columns(
    columns: jax.Array, mask: jax.Array | None, rank: int, method: str = "auto",
    basis: jax.Array | None = None, converge: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """:func:`fit_subspace_and_basis` on the column layout ``(m, K, n)`` (:func:`to_columns`).

  ``mask`` weights the products of the iterative path (:func:`rayleigh_ritz`'s
  ``column_mask``), so the data are neither copied nor transposed per fit; every column
  must be finite (a masked-out NaN would still enter ``Q^T X``). A nonnegative float
  ``mask`` fits the weighted Gram ``sum_k w_k D_k D_k^T`` on every path.

  ``converge`` (default ``rank``): on the iterative path only the top ``converge``
  directions must reach the Ritz tolerance (else the exact ``eigh`` is taken). The
  directions after them are refined by further power steps while they converge at a rate
  that can reach the tolerance within the cap, and are returned as they stand when they
  cannot: a direction inside the noise bulk has no eigen-gap, so no number of steps
  pins it down, while a direction standing out of the bulk (what a caller looks for among
  the extra candidates) has a gap and converges geometrically.
  """
  m, num_clients, n = columns.shape
  if method not in FIT_METHODS:
    raise ValueError(f"method must be one of {FIT_METHODS}; got {method!r}")
  if method == "auto":
    iterative = basis is not None or use_iterative(m, num_clients * n, rank)
    method = "iterative" if iterative else "gram"
  converge = rank if converge is None else min(converge, rank)
  column_mask = None if mask is None else mask[None, :, None].astype(columns.dtype)

  def masked(columns):  # X W^{1/2}, so that G = X W X^T as on the iterative path
    return columns if column_mask is None else columns * jnp.sqrt(column_mask)

  def by_gram(columns):
    _, vectors = jnp.linalg.eigh(gram_of(masked(columns)))
    return vectors[:, ::-1]

  if method == "gram":
    return by_gram(columns)[:, :rank], None
  if method == "svd":
    left, _, _ = jnp.linalg.svd(masked(columns).reshape(m, -1), full_matrices=False)
    return left[:, :rank], None
  if basis is None:
    basis = start_basis(m, fit_width(m, num_clients * n, rank), columns.dtype)
  if basis.shape[0] != m or not rank <= basis.shape[1]:
    raise ValueError(f"basis must be (m, s) = ({m}, s >= {rank}); got {basis.shape}")
  leading = lambda pairs: jnp.max(pairs.residuals[:converge])
  converged = lambda pairs: leading(pairs) <= FIT_TOL
  pairs = subspace_iteration(columns, basis, converged, FIT_MAX_ITERS, column_mask=column_mask)
  if converge < rank:
    # Phase two: the directions after the first `converge`, stopped once hopeless.
    trailing = lambda pairs: jnp.max(pairs.residuals[:rank])
    more = subspace_iteration(columns, pairs.next_basis, lambda p: trailing(p) <= FIT_TOL,
                              FIT_MAX_ITERS, error=trailing, tol=FIT_TOL,
                              column_mask=column_mask)
    # Keep phase one's pairs if the extra steps lost the leading directions (round-off).
    pairs = jax.tree.map(lambda a, b: jnp.where(converged(more), a, b), more, pairs)
  # Not converged (tiny eigen-gap, or a start orthogonal to the answer): exact fallback.
  width = basis.shape[1]
  vectors, next_basis = jax.lax.cond(
      converged(pairs), lambda _: (pairs.vectors, pairs.next_basis),
      lambda c: (lambda v: (v, v))(by_gram(c)[:, :width]), columns)
  return vectors[:, :rank], next_basis


def top_singular_triplets(x: jax.Array, count: int, above: jax.Array) -> tuple[
    jax.Array, jax.Array, jax.Array]:
  r"""The top ``count`` singular triplets of ``x`` (``m x N``), accurate above ``above``.

  Returns ``(U, s, V^T)`` shaped ``(m, count)``, ``(count,)``, ``(count, N)`` as
  ``jnp.linalg.svd(x, full_matrices=False)`` cut to ``count``. The smaller Gram
  (``x x^T`` if ``m <= N``, else ``x^T x``) is eigen-decomposed (the other side is
  ``x^T u_i / s_i``): about half an SVD's time at ``1024 x 1024``. Its singular values
  are off by about ``eps s_1^2 / s``, so the Gram is used only while ``above >= sqrt(eps)
  s_1`` (:func:`clair_jax._src.svt.gram_is_accurate`'s rule) and the SVD is taken
  otherwise; callers read only the values above ``above``. (A subspace iteration cannot
  stand in here: certifying that no value of a noise bulk exceeds a level just above
  its edge needs the bulk's top value converged, and a bulk has no gap.)
  """
  m, columns = x.shape
  count = min(count, m, columns)

  def exact(x):
    left, values, right_t = jnp.linalg.svd(x, full_matrices=False)
    return left[:, :count], values[:count], right_t[:count]

  if min(m, columns) < 8 * count:  # small: the SVD is cheap
    return exact(x)
  wide = m <= columns
  gram = x @ x.T if wide else x.T @ x
  eigenvalues, vectors = jnp.linalg.eigh(gram)
  values = jnp.sqrt(jnp.maximum(eigenvalues[::-1][:count], 0.0))
  vectors = vectors[:, ::-1][:, :count]
  eps = jnp.finfo(x.dtype).eps

  def from_gram(x):
    other = (vectors.T @ x) if wide else (x @ vectors).T                # (count, N|m) s V^T
    safe = jnp.where(values > 0, values, 1.0)
    other = jnp.where((values > 0)[:, None], other / safe[:, None], 0.0)
    return (vectors, values, other) if wide else (other.T, values, vectors.T)

  accurate = (above >= jnp.sqrt(eps) * values[0]) | (values[0] <= 0)
  return jax.lax.cond(accurate, from_gram, exact, x)


def subspace_coefficients(columns: jax.Array, subspace: jax.Array) -> jax.Array:
  """``U^T X_k`` for every client, ``(r, K, n)``, from the column layout (one GEMM)."""
  return jnp.tensordot(subspace, columns, axes=(0, 0))


def project_onto_subspace(updates: jax.Array, subspace: jax.Array) -> jax.Array:
  """Projects each client's update onto the column space: ``U U^T D_k`` for every ``k``."""
  coefficients = jnp.einsum("mr,kmn->krn", subspace, updates)
  return jnp.einsum("mr,krn->kmn", subspace, coefficients)
