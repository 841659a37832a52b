r"""Singular value thresholding kernels: exact (SVD or Gram ``eigh``) and warm-started.

.. math::
  \operatorname{SVT}_t(X) = \arg\min_Z \tfrac12 \|Z - X\|_F^2 + t \|Z\|_*
    = U \operatorname{diag}\big((s_i - t)_+\big) V^\top

The public prox (:func:`clair_jax.prox_nuclear`) and the solver's step both come here:
:func:`svt_warm` is the step's SVT (a warm-started subspace iteration that falls back to
the exact one when it cannot certify the result), :func:`svt_blocks` the same on client
blocks, and the exact pieces below (the SVD path :func:`svt_from_svd`, the Gram path
:func:`gram_svt_factors`, :func:`shrink_factors`) serve both.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src import subspace
from clair_jax._src.subspace import stack_clients
from clair_jax._src.subspace import unstack_clients

def svt_from_svd(x: jax.Array, threshold: jax.Array):
  """``(SVT_t(x), (U, s, V^T, (s - t)_+))`` from one SVD (no custom derivative)."""
  left, singular_values, right_t = jnp.linalg.svd(x, full_matrices=False)
  shrunk = jnp.maximum(singular_values - threshold, 0.0)
  return (left * shrunk[None, :]) @ right_t, (left, singular_values, right_t, shrunk)


def gram_svt_factors(gram: jax.Array, threshold: jax.Array):
  """From ``X X^T = V diag(s^2) V^T``: ``(V, s, max(1 - t/s, 0))``.

  ``SVT_t(X) = V diag(factor) V^T X``; shared by :func:`prox_nuclear_gram` and the
  solver's block-wise Gram path.
  """
  eigenvalues, vectors = jnp.linalg.eigh(gram)
  singular_values = jnp.sqrt(jnp.maximum(eigenvalues, 0.0))
  return vectors, singular_values, shrink_factors(singular_values, threshold)


def shrink_factors(singular_values: jax.Array, threshold: jax.Array) -> jax.Array:
  """``max(1 - t/s, 0)``: SVT as a rescaling of the singular directions (0 where
  ``s <= t``, no division by zero)."""
  keep = singular_values > threshold
  return jnp.where(keep, 1.0 - threshold / jnp.where(keep, singular_values, 1.0), 0.0)


def gram_is_accurate(singular_values_max: jax.Array, threshold: jax.Array, dtype) -> jax.Array:
  """Whether Gram-based SVT is accurate at this threshold.

  Eigenvalues of ``X X^T`` carry an absolute error of about ``eps * s_max^2``, so a kept
  singular value ``s > t`` is off by about ``eps * s_max^2 / (2 s) <= eps * s_max^2 / (2 t)``.
  We accept the Gram path while ``t >= sqrt(eps) * s_max`` (each kept component then off by
  at most ``sqrt(eps) / 2`` of ``s_max``, ~2e-4 in float32) and fall back to the SVD otherwise.
  """
  eps = jnp.finfo(dtype).eps
  return threshold >= singular_values_max * jnp.sqrt(eps)


SVT_METHODS = ("auto", "subspace", "gram", "svd")
# Warm-started SVT: Ritz residual tolerance (relative to s_1^2) and power steps per call.
SVT_TOL = 1e-5
SVT_MAX_ITERS = 8
# Default SVT basis width (see basis_width): 32 columns below m = 512, else min(m / 8, 512).
DEFAULT_SVT_WIDTH = 32
WIDE_BASIS_FROM = 512
MAX_SVT_WIDTH = 512


class WarmSvt(NamedTuple):
  """Result of :func:`svt_warm`."""

  value: jax.Array      # SVT_t(x), shaped like x
  basis: jax.Array      # (m, s) next warm start
  saturated: jax.Array  # bool: more than s - max(2, s/4) singular values exceed t


def svt_blocks(blocks: jax.Array, threshold: jax.Array, method: str = "auto") -> jax.Array:
  """SVT of the stacked matrix ``[X_1, ..., X_K]``, taking and returning ``(K, m, n)`` blocks.

  ``method="gram"`` eigen-decomposes ``sum_k X_k X_k^T`` (with clients sharded, the sum is
  the only cross-device reduction). ``"auto"`` uses the Gram when the stacked matrix is
  wide (``m <= K*n``) and falls back to the SVD when the threshold is too small for the
  Gram spectrum to be accurate (:func:`clair_jax._src.gram_is_accurate`).
  ``"subspace"`` needs the solver's warm start (see :func:`svt_warm`); here it is
  ``"auto"``.
  """
  if method not in SVT_METHODS:
    raise ValueError(f"svt_method must be one of {SVT_METHODS}, got {method!r}")
  return unstack_clients(svt_warm(stack_clients(blocks), threshold, None, method).value,
                         blocks.shape[0])


def _saturation_guard(width: int) -> int:
  """Spare basis columns required beyond the kept directions (see :func:`svt_warm`)."""
  return max(2, width // 4)


def _full_svt(x, threshold, method, gather, width):
  """Exact SVT of ``x`` (``m x N``, or ``(m, K, n)`` columns; Gram ``eigh`` or SVD) as a
  :class:`WarmSvt` whose basis is the top-``width`` left singular vectors."""
  m = x.shape[0]
  if method in ("auto", "subspace"):
    # Sharded clients (gather=False): the Gram is a sum over clients; the SVD would stack.
    method = ("gram_checked" if m <= x.size // m else "svd") if gather else "gram"
  # With no basis (width 0) nothing saturates: every step is exact anyway.
  limit = width - _saturation_guard(width) if width else m

  def by_svd(x):
    out, (left, _, _, shrunk) = svt_from_svd(x.reshape(m, -1), threshold)
    return WarmSvt(out.reshape(x.shape), left[:, :width], jnp.sum(shrunk > 0) > limit)

  if method == "svd":
    return by_svd(x)
  vectors, singular_values, factor = gram_svt_factors(subspace.gram_of(x), threshold)

  top, top_factor = vectors[:, ::-1][:, :width], factor[::-1][:width]
  kept = jnp.sum(factor > 0)

  def by_projector(x):
    projector = (vectors * factor[None, :]) @ vectors.T
    return WarmSvt(jnp.tensordot(projector, x, axes=(1, 0)), top, kept > limit)

  def by_top(x):
    value = jnp.tensordot(top * top_factor[None, :], jnp.tensordot(top, x, axes=(0, 0)),
                          axes=(1, 0))
    return WarmSvt(value, top, kept > limit)

  def by_gram(x):
    if not 0 < 2 * width < m:
      return by_projector(x)
    # When the basis holds every kept direction, two thin (m x s) GEMMs apply the SVT
    # instead of the m x m projector: m / (2 s) times fewer flops.
    return jax.lax.cond(kept <= width, by_top, by_projector, x)

  if method == "gram":
    return by_gram(x)
  accurate = gram_is_accurate(singular_values[-1], threshold, x.dtype)
  # Only kept singular values need accuracy; if none is kept the Gram answer (0) is exact.
  accurate = accurate | ~jnp.any(factor > 0)
  return jax.lax.cond(accurate, by_gram, by_svd, x)


def svt_warm(
    x: jax.Array,
    threshold: jax.Array,
    basis: jax.Array | None,
    method: str = "auto",
    *,
    gather: bool = True,
    exact: jax.Array | bool = False,
) -> WarmSvt:
  """SVT of ``x`` (``m x N``, or ``(m, K, n)`` columns) from a warm-started subspace.

  With an ``(m, s)`` orthonormal ``basis`` (the previous FISTA step's), ``"auto"`` and
  ``"subspace"`` run :func:`clair_jax._src.subspace.subspace_iteration` and use the Ritz
  pairs: ``SVT_t(X) = V diag((1 - t/s_i)_+) V^T X`` (``V``, ``s_i`` from
  :func:`clair_jax._src.subspace.accurate_rotation` where ``eps (s_1 / t)^2 > 1e-4``,
  unless clients are sharded: the squared spectrum leaves shrink factors near ``t`` off
  by about that, which stalls FISTA above its tolerance), three thin GEMMs instead of
  the Gram GEMM, an ``m x m`` ``eigh`` and the apply GEMM. The result is accepted when

  * at most ``s - max(2, s/4)`` Ritz values exceed ``t`` (a saturated basis could miss a
    kept direction), and
  * the top and every kept Ritz pair have residual ``||G v - s^2 v|| <= 1e-5 s_1^2``
    (within 8 power steps) and the threshold passes
    :func:`clair_jax._src.gram_is_accurate`;

  otherwise the exact SVT is taken (Gram ``eigh``, or the SVD where the Gram is not
  accurate and ``gather`` allows stacking the clients). The power steps also stop early
  when their observed convergence rate cannot meet the tolerance within the cap (the
  exact SVT is then cheaper than more steps). ``exact=True`` (traced) skips the subspace
  iteration: the solver sets it after a saturated step, whose ``L`` the basis could not
  hold. ``basis=None`` or ``s = 0`` means exact SVT with ``method`` (``"auto"``: Gram
  when wide, else SVD).

  Returns:
    :class:`WarmSvt`: ``SVT_t(x)`` shaped like ``x``, the next basis ``(m, s)`` and
    whether the kept directions saturate it.
  """
  width = 0 if basis is None else basis.shape[1]
  if method not in ("auto", "subspace") or width == 0:
    return _full_svt(x, threshold, method, gather, width)
  limit = width - _saturation_guard(width)
  exact_svt = lambda x: _full_svt(x, threshold, method, gather, width)

  def saturated(pairs):
    return jnp.sum(pairs.singular_values > threshold) > limit

  def kept_residual(pairs):
    # The top pair is always checked: Ritz values only bound the singular values from
    # below, so "nothing above t" needs a converged s_1 (a cold basis sees only a part).
    checked = (pairs.singular_values > threshold).at[0].set(True)
    return jnp.max(jnp.where(checked, pairs.residuals, 0.0))

  def converged(pairs):
    kept = pairs.singular_values > threshold
    accurate = gram_is_accurate(pairs.singular_values[0], threshold, x.dtype)
    return (kept_residual(pairs) <= SVT_TOL) & (accurate | ~jnp.any(kept))

  def warm(x):
    pairs = subspace.subspace_iteration(
        x, basis, lambda p: saturated(p) | converged(p), SVT_MAX_ITERS,
        refine_below=threshold if gather else None, error=kept_residual, tol=SVT_TOL)

    def from_pairs(x):
      factor = shrink_factors(pairs.singular_values, threshold)
      value = jnp.tensordot(pairs.vectors * factor[None, :], pairs.coefficients, axes=(1, 0))
      return WarmSvt(value, pairs.next_basis, jnp.asarray(False))

    accept = converged(pairs) & ~saturated(pairs)
    return jax.lax.cond(accept, from_pairs, exact_svt, x)

  return jax.lax.cond(exact, exact_svt, warm, x)


def basis_width(shape: tuple[int, int, int], method: str = "auto",
              width: int | None = None) -> int:
  """Columns ``s`` of the warm-started SVT basis; 0 means exact SVT every step.

  ``"subspace"`` uses ``width`` (default 32 for ``m < 512``, else ``min(m / 8, 512)``;
  at most ``m`` and ``K n``): while ``L`` has more than ``3 s / 4`` directions the step
  falls back to the ``m x m`` Gram ``eigh``, which at ``m = 4096`` costs ~10 times a
  512-wide iteration and, in float32, is coarse near the threshold (FISTA can then stall
  just above its tolerance). Many contaminated clients leave ``L`` holding ~9% of ``m``
  directions at ``c = 1`` (their residuals, shrunk by the group penalty: 88 of 1024 at
  ``K = 128``, 20% contaminated LoRA clients), which ``3/4`` of ``m / 8`` holds (LoRA
  problems at ``m = 768`` with 20-40% contaminated clients converge in 20-24 steps, as
  fast as with ``m / 4``; the dense ``m = 512`` benchmark, whose ``L`` holds 39
  directions, runs 1.4x faster with 64 columns than with 128); below ``m = 512`` the
  32-column basis is the cheaper one and held ``L`` in every problem we ran.
  ``"auto"`` does the same when the thin products win, i.e. ``m >= 4 s``, and is exact
  SVT otherwise.
  """
  num_clients, m, n = shape
  if method not in ("auto", "subspace"):
    return 0
  if not width:
    width = DEFAULT_SVT_WIDTH if m < WIDE_BASIS_FROM else min(m // 8, MAX_SVT_WIDTH)
  width = min(width, m, num_clients * n)
  if method == "auto" and m < 4 * width:
    return 0
  return width
