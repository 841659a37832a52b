"""Factored (LoRA) client updates and the exact reduction that solves CLAIR on them.

Client ``k`` sends ``D_k = A_k B_k`` with ``A_k = left[k]`` (``m x q``) and
``B_k = right[k]`` (``q x n``). Let ``Q`` (``m x p``, ``p <= min(m, K q)``) be an orthonormal
basis of ``span(A_1, ..., A_K)`` and ``B_k^T = P_k T_k`` a thin QR (``P_k`` is ``n x q'``
with orthonormal columns, ``q' = min(q, n)``). Then

.. math::
  D_k = Q Z_k P_k^\\top,\\qquad Z_k = Q^\\top A_k T_k^\\top \\in \\mathbb{R}^{p \\times q'},\\qquad
  M = [D_1, \\ldots, D_K] = Q\\, [Z_1, \\ldots, Z_K]\\, \\operatorname{blockdiag}(P_k^\\top).

``Q`` has orthonormal columns and ``blockdiag(P_k^T)`` orthonormal rows, so Frobenius norms
(whole and per block), the nuclear norm, SVT, block soft-thresholding, the Gram spectrum,
left singular vectors and off-subspace residuals all commute with the embedding
``Z -> Q Z blockdiag(P_k^T)``. Every iterate of the convex solver and every split of the
trimming loop therefore stays in that embedding, and running CLAIR on the ``(K, p, q')``
blocks ``Z_k`` and mapping back is *exact* (up to rounding): the dense ``m x K n`` matrix
never exists. The cost drops from ``O(m^2 K n)`` per iteration to ``O(p^2 K q')``.

The one place where the shapes enter beyond norms is the noise model: the noise level per
entry is ``sigma = median residual / sqrt((m - r) n)`` and the nuclear weight is
``1.1 sigma (sqrt(m) + sqrt(K n))``, just above the spectral norm of i.i.d. ``m x K n``
noise. A LoRA
update's noise is not i.i.d. over ``m x n``: it has rank ``q`` and lives in the
``p x K q'`` reduced coordinates, where the same formula with ``(p, q')`` is the calibrated
one. With the dense ``(m, n)`` the nuclear threshold falls far below the noise spectrum
(``m = n = 4096, K = 64, q = 16``: ~1e-2 of the noise singular values), ``L`` keeps almost
every direction and the solver needs hundreds of ``p x p`` eigen-decompositions. So:

* default (``dense_weights=False``): the weights and ``noise_level`` are those of the
  reduced ``(K, p, q')`` problem; ``noise_level`` is the std per reduced degree of
  freedom, ``median residual / sqrt((p - r) q')`` (a user-supplied ``noise_level`` means
  the same). The *detection thresholds are unchanged*: scores are residual ratios
  ``||(I - U U^T) D_k||_F / median``, and residual norms are exact in the reduced space;
  ``lam_sparse = threshold_ratio * median residual`` is the same too. Detection, subspace
  and refined updates agree with the dense call whenever the trimming loop settles on the
  same set (it does on every test problem); ``low_rank``/``sparse``/``lam_low_rank``
  differ because ``lambda_L`` does.
* ``dense_weights=True``: ``clair_core(..., weight_shape=(m, n))`` uses the dense
  ``(m, n)`` for the convex weights and ``noise_level``, so the convex program (weights,
  iterates, ``low_rank``/``sparse``) is the dense one, only cheaper per iteration.

The per-client noise estimate of the detection's structure test (a client's spectral
tail over ``(m - r)(n - r)``) is always taken in the reduced ``(p, q')`` coordinates: a
factored client's spectrum has only ``q'`` nonzero values, so the reduced count is the
meaningful one (scores are benign-normalised, so the constant cancels in them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src import client_stack
from clair_jax._src import estimator
from clair_jax._src import robust
from clair_jax._src import validate


class FactoredUpdates(NamedTuple):
  """Client updates in factored form: ``update_k = left[k] @ right[k]``.

  Clients of different ranks are zero-padded to a common ``q`` (zero columns of ``left``
  and/or zero rows of ``right``), which changes no product.

  Attributes:
    left: ``(K, m, q)``, the ``m`` side (the column space CLAIR shares with ``side="left"``).
    right: ``(K, q, n)``.
  """

  left: jax.Array
  right: jax.Array

  @property
  def shape(self) -> tuple[int, int, int]:
    """``(K, m, n)``: the shape of the dense stack this represents."""
    return (self.left.shape[0], self.left.shape[1], self.right.shape[2])

  @property
  def rank_width(self) -> int:
    """``q``, the common (padded) inner dimension."""
    return self.left.shape[2]

  def dense(self) -> jax.Array:
    """Materialises the ``(K, m, n)`` stack (for tests and small problems only)."""
    return jnp.einsum("kmq,kqn->kmn", self.left, self.right)

  def transpose(self) -> FactoredUpdates:
    """``update_k^T = right[k]^T left[k]^T``: swaps the roles of ``m`` and ``n``."""
    return FactoredUpdates(jnp.swapaxes(self.right, 1, 2), jnp.swapaxes(self.left, 1, 2))


def from_flax_lora(lora_a, lora_b) -> FactoredUpdates:
  """Builds factored updates from Flax ``nnx.LoRA`` adapters (``y = x @ lora_a @ lora_b``).

  The weight delta of a Flax kernel (``in x out``, applied as ``x @ W``) is
  ``Delta W_k = lora_a[k] @ lora_b[k]``, so ``m = in`` (the input side) and ``n = out``:
  ``left = lora_a``, ``right = lora_b``.

  Args:
    lora_a: ``(K, in, r)``.
    lora_b: ``(K, r, out)``.

  Returns:
    :class:`FactoredUpdates` of dense shape ``(K, in, out)``.
  """
  return check_factored(FactoredUpdates(jnp.asarray(lora_a), jnp.asarray(lora_b)),
                        names=("lora_a", "lora_b"))


def from_peft_lora(lora_a, lora_b) -> FactoredUpdates:
  """Builds factored updates from PEFT (PyTorch) LoRA weights ``A (r, in)``, ``B (out, r)``.

  A PyTorch ``Linear`` weight is ``out x in`` (``y = x W^T``) and PEFT's delta is
  ``Delta W_k = B_k A_k``, so ``m = out`` (the output side) and ``n = in``:
  ``left = B``, ``right = A``. (Transpose the result for the ``in`` side, or call
  :func:`clair` with ``side="right"``.)

  Args:
    lora_a: PEFT ``lora_A`` weights stacked over clients, ``(K, r, in)``.
    lora_b: PEFT ``lora_B`` weights, ``(K, out, r)``.

  Returns:
    :class:`FactoredUpdates` of dense shape ``(K, out, in)``.
  """
  return check_factored(FactoredUpdates(jnp.asarray(lora_b), jnp.asarray(lora_a)),
                        names=("B (lora_b)", "A (lora_a)"))


def check_factored(factored: FactoredUpdates,
                   names: tuple[str, str] = ("left", "right")) -> FactoredUpdates:
  """Validates ``left (K, m, q)`` and ``right (K, q, n)``; raises ``ValueError`` naming shapes."""
  left, right = factored
  left_name, right_name = names
  for name, x in ((left_name, left), (right_name, right)):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3:
      raise ValueError(f"{name} must be a 3-D array (clients first); got shape "
                       f"{None if shape is None else tuple(shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype; got {x.dtype} with shape "
                       f"{tuple(shape)}.")
  if left.shape[0] != right.shape[0]:
    raise ValueError(f"{left_name} and {right_name} must have the same number of clients; "
                     f"got {left_name}.shape={tuple(left.shape)}, "
                     f"{right_name}.shape={tuple(right.shape)}.")
  if left.shape[2] != right.shape[1]:
    raise ValueError(f"inner (LoRA rank) dimensions differ: {left_name}.shape="
                     f"{tuple(left.shape)} has q={left.shape[2]} but {right_name}.shape="
                     f"{tuple(right.shape)} has q={right.shape[1]}; zero-pad clients of "
                     f"different ranks to a common q.")
  num_clients, m, q = left.shape
  if num_clients < validate.MIN_CLIENTS:
    raise ValueError(f"CLAIR needs at least {validate.MIN_CLIENTS} clients; got K="
                     f"{num_clients} ({left_name}.shape={tuple(left.shape)}).")
  if min(m, q, right.shape[2]) < 1:
    raise ValueError(f"empty axis: {left_name}.shape={tuple(left.shape)}, "
                     f"{right_name}.shape={tuple(right.shape)}.")
  return FactoredUpdates(left, right)


class ColumnBasis(NamedTuple):
  r"""An orthonormal basis ``Q = stacked @ inverse`` (``m x p``) of ``span(stacked)``, kept
  as its two factors: ``Q`` itself is never formed (:func:`reduce_columns`).

  Attributes:
    stacked: ``(m, N)`` the clients' factors side by side, each column scaled to unit norm.
    inverse: ``(N, p)``.
  """

  stacked: jax.Array
  inverse: jax.Array

  def lift(self, x: jax.Array) -> jax.Array:
    """``Q x`` for ``x`` of shape ``(p, ...)``: two thin products, no ``m x p`` matrix."""
    return jnp.tensordot(self.stacked, jnp.tensordot(self.inverse, x, axes=(1, 0)),
                         axes=(1, 0))

  def dense(self) -> jax.Array:
    """``Q`` (``m x p``), for tests."""
    return self.stacked @ self.inverse


class Reduction(NamedTuple):
  """The exact reduction ``D_k = Q Z_k P_k^T`` (see the module docstring)."""

  blocks: jax.Array       # (K, p, q') Z_k, NaN for clients with non-finite factors
  basis: ColumnBasis | None  # Q (m x p), orthonormal on the span; None: the identity (p = m)
  right_bases: jax.Array  # (K, n, q') P_k, orthonormal columns
  active: jax.Array       # (K,) bool, clients whose factors are finite
  left_coordinates: jax.Array  # (K, p, q) Q^T A_k (zero for inactive clients)


def lift(basis: ColumnBasis | None, x: jax.Array) -> jax.Array:
  """``Q x`` (``None`` is the identity)."""
  return x if basis is None else basis.lift(x)


def column_basis(left: jax.Array) -> ColumnBasis | None:
  """Orthonormal ``Q`` (``m x p``) with ``span(Q) = span(A_1, ..., A_K)`` (or containing it).

  ``p = min(m, K q)``; when ``K q >= m``, ``None`` stands for the identity (no
  factorisation, and no ``m x m`` products: at ``m = 4096, K q = 8192`` each would be a
  275 GFLOP GEMM).
  """
  return reduce_columns(left)[0]


def orthonormal_coordinates(stacked: jax.Array) -> tuple[ColumnBasis, jax.Array]:
  r"""Coordinates ``F`` (``N x N``) of the columns of ``S`` (``m x N``) in an orthonormal
  basis ``Q = S_1 C`` of their span, from the ``N x N`` Gram (one GEMM) instead of a QR.

  With ``S = S_1 D`` (``D`` the column norms, found without overflow, so that any finite
  scale works and the Gram has a unit diagonal):

  .. math::
    S_1^	op S_1 = L L^	op\ (	ext{Cholesky}),\qquad F = L^	op D,\qquad C = L^{-	op},
    \qquad Q = S_1 L^{-	op},\quad Q^	op Q = I,\quad Q F = S.

  Cholesky QR loses orthogonality like ``eps kappa^2``: it is used while every pivot
  ``L_ii`` (the sine of column ``i``'s angle to the columns before it) is at least
  ``eps^{1/4}``, i.e. ``eps kappa^2 <~ sqrt(eps)``. Otherwise (nearly dependent columns:
  duplicated clients, zero padding) the Gram's eigen-decomposition
  ``S_1^T S_1 = V Lambda V^T`` gives ``F = Lambda^{1/2} V^T D`` and
  ``C = V Lambda^{-1/2}`` (directions below ``N eps lambda_max``, round-off, dropped): the
  accuracy of a Gram, ``sqrt(eps)`` of the largest singular value, as the Gram paths
  elsewhere. Zero columns get zero coordinates on both paths.

  Returns:
    ``(ColumnBasis(S_1, C), F)``.
  """
  dtype = stacked.dtype
  largest = jnp.max(jnp.abs(stacked), axis=0)
  zero = ~(largest > 0)
  unit = stacked / jnp.where(zero, 1.0, largest)[None, :]
  norms = jnp.sqrt(jnp.sum(unit * unit, axis=0))
  unit = unit / jnp.where(zero, 1.0, norms)[None, :]
  scale = jnp.where(zero, 0.0, largest * norms)                        # D
  gram = unit.T @ unit
  # A zero column gets a unit pivot (its row and column of L are e_i), zeroed in F below.
  gram = jnp.where(jnp.diag(zero), 1.0, gram)
  eps = jnp.finfo(dtype).eps

  def by_cholesky(gram):
    factor = jnp.linalg.cholesky(gram)                                   # L
    inverse = jax.scipy.linalg.solve_triangular(
        factor, jnp.eye(gram.shape[0], dtype=dtype), lower=True).T     # L^{-T}
    return factor.T, inverse

  def by_eigh(gram):
    values, vectors = jnp.linalg.eigh(gram)
    keep = values > gram.shape[0] * eps * jnp.max(values)
    root = jnp.sqrt(jnp.where(keep, values, 0.0))
    inverse_root = jnp.where(keep, 1.0 / jnp.where(keep, root, 1.0), 0.0)
    return root[:, None] * vectors.T, vectors * inverse_root[None, :]

  triangle, inverse = by_cholesky(gram)
  pivots = jnp.diagonal(triangle)
  accurate = jnp.all(jnp.isfinite(triangle)) & jnp.all(jnp.isfinite(inverse)) & (
      jnp.min(pivots) >= eps**0.25)
  triangle, inverse = jax.lax.cond(accurate, lambda g: (triangle, inverse), by_eigh, gram)
  coordinates = triangle * scale[None, :]                              # F = L^T D
  return ColumnBasis(unit, inverse), coordinates


def reduce_columns(left: jax.Array) -> tuple[ColumnBasis | None, jax.Array]:
  """``Q`` of :func:`column_basis` and the clients' coordinates ``Q^T A_k`` ``(K, p, q)``.

  The coordinates are the blocks of ``F`` (:func:`orthonormal_coordinates`,
  ``[A_1, ..., A_K] = Q F``, so ``Q^T A_k = F[:, k q:(k + 1) q]``): one Gram GEMM and an
  ``N x N`` Cholesky, no QR and no ``m``-long product beyond the Gram.
  """
  num_clients, m, q = left.shape
  if num_clients * q >= m:
    return None, left
  stacked = jnp.transpose(left, (1, 0, 2)).reshape(m, num_clients * q)
  basis, coordinates = orthonormal_coordinates(stacked)
  return basis, jnp.transpose(coordinates.reshape(-1, num_clients, q), (1, 0, 2))


def reduce_factored(factored: FactoredUpdates) -> Reduction:
  """Computes ``Q``, the ``P_k`` and the reduced blocks ``Z_k = Q^T A_k T_k^T``.

  Clients with a non-finite factor are zeroed before ``Q`` is built (so they cannot spoil
  the basis) and their block is set to NaN, so that the core flags them exactly as the
  dense path would.

  Args:
    factored: ``left (K, m, q)``, ``right (K, q, n)``.

  Returns:
    :class:`Reduction` with ``blocks (K, p, min(q, n))``.
  """
  dtype = validate.compute_dtype(jnp.result_type(factored.left.dtype, factored.right.dtype))
  left = factored.left.astype(dtype)
  right = factored.right.astype(dtype)
  active = robust.finite_clients(left) & robust.finite_clients(right)
  left = jnp.where(active[:, None, None], left, 0.0)
  right = jnp.where(active[:, None, None], right, 0.0)
  basis, coefficients = reduce_columns(left)                          # (m, p), Q^T A_k
  right_bases, triangles = jnp.linalg.qr(jnp.swapaxes(right, 1, 2))  # (K,n,q'), (K,q',q)
  blocks = jnp.einsum("kpq,ksq->kps", coefficients, triangles)       # Q^T A_k T_k^T
  blocks = jnp.where(active[:, None, None], blocks, jnp.nan)
  return Reduction(blocks, basis, right_bases, active, coefficients)


def _embed(reduction: Reduction, blocks: jax.Array, data_dtype) -> FactoredUpdates:
  """Reduced ``(K, p, q')`` blocks ``X_k`` -> factored ``(Q X_k) P_k^T``."""
  left = jnp.moveaxis(lift(reduction.basis, jnp.moveaxis(blocks, 1, 0)), 0, 1)
  return FactoredUpdates(left.astype(data_dtype),
                         jnp.swapaxes(reduction.right_bases, 1, 2).astype(data_dtype))


def refine_factored(factored: FactoredUpdates, subspace: jax.Array,
                    keep_as_sent: jax.Array) -> FactoredUpdates:
  """Refined updates, still factored: ``U (U^T A_k B_k)`` or the client's own factors.

  Width ``w = max(r, q)``: a refined client is ``left = [U, 0]`` (``m x w``, the shared
  factor) and ``right = [(U^T A_k) B_k; 0]`` (``w x n``, its own coefficients), so its
  dense update is ``U U^T D_k``; a client kept as sent is ``[A_k, 0]``, ``[B_k; 0]``.

  Args:
    factored: ``left (K, m, q)``, ``right (K, q, n)``.
    subspace: ``(m, r)`` orthonormal.
    keep_as_sent: ``(K,)`` bool.

  Returns:
    :class:`FactoredUpdates` with ``left (K, m, w)``, ``right (K, w, n)``.
  """
  num_clients, m, q = factored.left.shape
  rank = subspace.shape[1]
  width = max(rank, q)
  dtype = factored.left.dtype
  compute = subspace.dtype
  left, right = factored.left.astype(compute), factored.right.astype(compute)
  coefficients = jnp.einsum("mr,kmq,kqn->krn", subspace, left, right)
  pad = lambda x, axis: jnp.pad(x, [(0, width - x.shape[axis]) if a == axis else (0, 0)
                                    for a in range(3)])
  shared = jnp.broadcast_to(subspace, (num_clients, m, rank))
  keep = keep_as_sent[:, None, None]
  out_left = jnp.where(keep, pad(factored.left, 2), pad(shared.astype(dtype), 2))
  out_right = jnp.where(keep, pad(factored.right, 1), pad(coefficients.astype(dtype), 1))
  return FactoredUpdates(out_left, out_right)


def clair_factored(factored: FactoredUpdates, rank: int | None = None, *,
                   client_weights=None, dense_weights: bool = False,
                   **options) -> estimator.ClairResult:
  """:func:`clair_jax.clair` on factored updates, by the exact reduction (never dense).

  Same decomposition, detection and subspace as ``clair(factored.dense(), rank, ...)`` up
  to rounding, at cost ``O(m p K q + p^2 K q)`` per solve instead of ``O(m^2 K n)``.

  Args:
    factored: :class:`FactoredUpdates`, ``left (K, m, q)``, ``right (K, q, n)``.
    rank: shared rank ``1 <= r <= min(m, K min(q, n))`` (the stack has no larger rank),
      or ``None`` to choose it from data (needs concrete input).
    client_weights: optional ``(K,)`` group-penalty weights.
    dense_weights: calibrate the convex weights and ``noise_level`` on the dense
      ``(m, n)`` (exactly the dense solve) instead of the reduced ``(p, q')`` (default;
      see the module docstring for why).
    **options: fields of :class:`clair_jax.ClairOptions`. ``side="right"`` shares the
      ``n`` side (the factors are transposed).

  Returns:
    :class:`clair_jax.ClairResult` where ``subspace`` is ``(m, r)`` (``(n, r)`` for
    ``side="right"``), ``refined`` is a :class:`FactoredUpdates` of width ``max(r, q)``
    (see :func:`refine_factored`: benign clients ``[U, 0] @ [U^T D_k; 0]``, kept clients
    as sent, zero-padded), and ``low_rank`` / ``sparse`` are :class:`FactoredUpdates` of
    width ``min(q, n)`` (``left = Q L_k``, ``right = P_k^T``). Every other field is as for
    dense input, ``noise_level`` included (per entry of the dense ``m x n`` update).

  Raises:
    ValueError: bad factor shapes or dtypes, bad rank or options, or (concrete input) no
      client with finite factors.
  """
  factored = check_factored(FactoredUpdates(*factored))
  opts = estimator.resolve_options(None, **options)
  if opts.side == "right":
    factored = factored.transpose()
  num_clients, m, n = factored.shape
  inner = min(factored.rank_width, n)
  limit = min(m, num_clients * inner)
  if rank is not None:
    rank = validate.check_rank(rank, factored.shape)
    if rank > limit:
      raise ValueError(f"rank={rank} exceeds the rank of the factored stack, min(m, K*min(q, "
                       f"n)) = min({m}, {num_clients}*{inner}) = {limit} (left.shape="
                       f"{tuple(factored.left.shape)}, right.shape="
                       f"{tuple(factored.right.shape)}).")
  traced = validate.is_traced(factored.left) or validate.is_traced(factored.right)
  client_weights = validate.check_client_weights(client_weights, num_clients,
                                                 factored.left.dtype)
  if not traced:
    validate.check_any_finite(robust.finite_clients(factored.left)
                              & robust.finite_clients(factored.right),
                              factored.shape, "factors")
  if rank is None:
    if traced:
      raise ValueError("rank=None chooses the rank from data and needs concrete factors; "
                       "pass an int rank inside jit/vmap.")
    # Singular values of each D_k and of the stack are those of Z_k and of [Z_k].
    blocks = _reduce_jit(factored).blocks
    rank = estimator.estimate_rank(blocks, max_rank=max(1, min(m, num_clients * n) // 2),
                                   options=opts)
    rank = min(rank, limit)
  result = _clair_factored_jit(factored, client_weights, rank, opts, dense_weights)
  if opts.side == "right":
    result = result._replace(refined=result.refined.transpose(),
                             low_rank=result.low_rank.transpose(),
                             sparse=result.sparse.transpose())
  return result


_reduce_jit = jax.jit(reduce_factored)


def _clair_factored_jit(factored: FactoredUpdates, client_weights, rank: int,
                        opts: estimator.ClairOptions,
                        dense_weights: bool = False) -> estimator.ClairResult:
  static, values = estimator.split_options(opts)
  return _clair_factored_compiled(factored, client_weights, values, rank, static,
                                  dense_weights)


@functools.partial(jax.jit, static_argnames=("rank", "static", "dense_weights"))
def _clair_factored_compiled(factored: FactoredUpdates, client_weights, values: dict,
                             rank: int, static: estimator.ClairOptions,
                             dense_weights: bool) -> estimator.ClairResult:
  return clair_factored_core(factored, client_weights, rank,
                             estimator.merge_options(static, values), dense_weights)


def clair_factored_core(factored: FactoredUpdates, client_weights, rank: int,
                        opts: estimator.ClairOptions,
                        dense_weights: bool = False) -> estimator.ClairResult:
  """Traced body: reduce -> :func:`clair_core` on ``Z`` (dense weights) -> map back."""
  num_clients, m, n = factored.shape
  data_dtype = jnp.result_type(factored.left.dtype, factored.right.dtype)
  reduction = reduce_factored(factored)
  # The refine pools clients, so it needs coordinates shared by all clients on the right
  # side too: W_k = (Q^T A_k)(B_k P) with P an orthonormal basis of span(B_1^T, ..., B_K^T)
  # (D_k = Q W_k P^T exactly; p x min(n, K q) per client), kept as factors: the refine
  # never forms the W_k (client_stack.FactoredClients).
  compute = reduction.blocks.dtype
  right = jnp.where(reduction.active[:, None, None], factored.right.astype(compute), 0.0)
  row_basis, right_coordinates = reduce_columns(jnp.swapaxes(right, 1, 2))  # P, P^T B_k^T
  left_reduced = reduction.left_coordinates
  right_reduced = jnp.swapaxes(right_coordinates, 1, 2)            # (K, q, n') B_k P
  core = estimator.clair_core(reduction.blocks, client_weights, rank, opts,
                              weight_shape=(m, n) if dense_weights else None,
                              refine_clients=client_stack.FactoredClients(left_reduced,
                                                                          right_reduced))
  subspace = lift(reduction.basis, core.subspace)                   # (m, r)
  if opts.contaminated_output == "project":
    keep_as_sent = ~reduction.active
  else:
    keep_as_sent = core.contaminated
  return core._replace(
      subspace=subspace,
      refined=refine_pooled_factored(factored, core, reduction.basis, row_basis, left_reduced,
                                     right, core.contaminated, keep_as_sent, subspace),
      consensus=_consensus_factored(core, reduction.basis, row_basis, data_dtype),
      refine_subspace=lift(reduction.basis, core.refine_subspace),
      low_rank=_embed(reduction, core.low_rank, data_dtype),
      sparse=_embed(reduction, core.sparse, data_dtype),
  )


def _consensus_factored(core, column_basis_, row_basis, data_dtype) -> FactoredUpdates:
  """The consensus ``U_R C_bar`` as one factored update (``K = 1``), lifted from the
  shared coordinates: ``left = Q U_R``, ``right = C_bar P^T``."""
  left = lift(column_basis_, core.refine_subspace)                            # (m, w)
  centre = core.refine_subspace.T @ core.consensus                            # (w, n')
  right = lift(row_basis, centre.T).T                                         # (w, n)
  return FactoredUpdates(left[None].astype(data_dtype), right[None].astype(data_dtype))


def refine_pooled_factored(factored, core, column_basis_, row_basis, left_reduced,
                           finite_right, contaminated, keep_as_sent,
                           detection_subspace) -> FactoredUpdates:
  """Refined updates, still factored, from the pooled refine of :func:`clair_core`.

  A benign client is ``left = Q U_R`` (``m x w``, shared) and ``right = (C_bar + S (C_k -
  C_bar)) P^T`` (``w x n``, its own), with ``C_k = U_R^T Q^T D_k P`` (so ``C_k P^T =
  (U_R^T Q^T A_k) B_k``: ``P`` spans every ``B_k``'s rows, and no ``n``-long lift per
  client is needed); width
  ``max(w, q)``; a client kept as sent is ``[A_k, 0]``, ``[B_k; 0]``; a contaminated
  client not kept (``contaminated_output="project"``) is projected on the detection
  subspace (:func:`refine_factored`). With ``refine="projection"`` the refine subspace is
  the detection subspace and ``S = 1``.
  """
  num_clients, m, q = factored.left.shape
  subspace = core.refine_subspace                                     # (p, w), reduced
  width = subspace.shape[1]
  out_width = max(width, q)
  dtype = factored.left.dtype
  coefficients = jnp.einsum("pw,kpq,kqn->kwn", subspace, left_reduced,
                            finite_right)                            # C_k P^T
  centre = lift(row_basis, (subspace.T @ core.consensus).T).T         # C_bar P^T (w, n)
  strength = core.refine_strength
  own = centre[None] + strength[None, :, None] * (coefficients - centre[None])
  shared = jnp.broadcast_to(lift(column_basis_, subspace), (num_clients, m, width))
  pad = lambda x, axis: jnp.pad(x, [(0, out_width - x.shape[axis]) if a == axis else (0, 0)
                                    for a in range(3)])
  projected = refine_factored(factored, detection_subspace, keep_as_sent)
  projected_left, projected_right = pad(projected.left, 2), pad(projected.right, 1)
  benign = (~contaminated)[:, None, None]
  out_left = jnp.where(benign, pad(shared.astype(dtype), 2), projected_left)
  out_right = jnp.where(benign, pad(own.astype(dtype), 1), projected_right)
  return FactoredUpdates(out_left, out_right)
