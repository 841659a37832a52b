"""Proximal operators: singular value thresholding and block soft-thresholding.

Both are pure, jittable functions of the point and the threshold. They are safe at zero:
a zero block or a zero singular value yields finite values *and* finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clair_jax._src.svt import gram_svt_factors
from clair_jax._src.svt import svt_from_svd


def safe_norm(x: jax.Array, min_norm: float = 0.0, axis=None, keepdims: bool = False):
  """Euclidean/Frobenius norm whose gradient at ``x = 0`` is ``0`` rather than NaN.

  ``sqrt`` has an infinite derivative at 0; the double ``where`` keeps the NaN out of the
  backward pass (same idea as ``optax.safe_norm``).

  Args:
    x: input array.
    min_norm: value returned where the norm is at most ``min_norm``.
    axis: axes to reduce over (all by default).
    keepdims: keep reduced axes.

  Returns:
    ``max(||x||, min_norm)`` with a well-defined gradient.
  """
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = squared > min_norm**2
  safe_squared = jnp.where(positive, squared, 1.0)
  return jnp.where(positive, jnp.sqrt(safe_squared), min_norm)


def prox_group_lasso(x: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """Block soft-thresholding: the prox of ``t * ||.||_F`` for one block.

  .. math::
    \\operatorname{prox}_{t\\|\\cdot\\|_F}(X)
      = \\arg\\min_Z \\tfrac12 \\|Z - X\\|_F^2 + t \\|Z\\|_F
      = \\max\\big(0, 1 - t / \\|X\\|_F\\big)\\, X

  (Yuan & Lin 2006). A block whose norm is at most ``t`` is set exactly to zero.

  Args:
    x: one block, any shape.
    threshold: ``t >= 0``, scalar.

  Returns:
    Array like ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> from clair_jax import prox_group_lasso
    >>> prox_group_lasso(jnp.array([3.0, 4.0]), 1.0).tolist()  # norm 5 -> 4
    [2.4000000953674316, 3.200000047683716]
    >>> prox_group_lasso(jnp.array([0.3, 0.4]), 1.0).tolist()  # norm 0.5 <= 1 -> zero
    [0.0, 0.0]
  """
  norm = safe_norm(x)
  keep = norm > threshold
  safe = jnp.where(keep, norm, 1.0)
  return jnp.where(keep, 1.0 - threshold / safe, 0.0) * x


def prox_group_lasso_blocks(blocks: jax.Array, thresholds: jax.Array | float) -> jax.Array:
  """:func:`prox_group_lasso` applied to every client block, ``jax.vmap``-ed on axis 0.

  Solves, independently for each ``k``,
  ``argmin_Z 1/2 ||Z - X_k||_F^2 + t_k ||Z||_F``.

  Args:
    blocks: ``(K, ...)`` stacked blocks.
    thresholds: scalar or ``(K,)`` per-block thresholds ``t_k``.

  Returns:
    ``(K, ...)`` thresholded blocks.
  """
  thresholds = jnp.broadcast_to(jnp.asarray(thresholds, blocks.dtype), blocks.shape[:1])
  return jax.vmap(prox_group_lasso)(blocks, thresholds)


@jax.custom_jvp
def prox_nuclear(x: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """Singular value thresholding (SVT): the prox of ``t * ||.||_*``.

  .. math::
    \\operatorname{SVT}_t(X) = \\arg\\min_Z \\tfrac12 \\|Z - X\\|_F^2 + t \\|Z\\|_*
      = U \\operatorname{diag}\\big((s_i - t)_+\\big) V^\\top,
    \\qquad X = U \\operatorname{diag}(s) V^\\top

  (Cai, Candes & Shen 2010). The derivative is given in closed form (Candes, Sing-Long &
  Trzasko 2013) so that repeated or zero singular values, where the SVD's own derivative
  divides by zero, give finite gradients.

  Args:
    x: ``(m, N)`` matrix.
    threshold: ``t >= 0``, scalar.

  Returns:
    ``(m, N)`` matrix of rank ``#{i : s_i > t}``.

  Example:
    >>> import jax.numpy as jnp
    >>> from clair_jax import prox_nuclear
    >>> x = jnp.diag(jnp.array([3.0, 1.0, 0.5]))
    >>> jnp.linalg.svd(prox_nuclear(x, 0.8), compute_uv=False).round(3).tolist()
    [2.200000047683716, 0.20000000298023224, 0.0]
  """
  return svt_from_svd(x, jnp.asarray(threshold, x.dtype))[0]


@prox_nuclear.defjvp
def _prox_nuclear_jvp(primals, tangents):
  x, threshold = primals
  dx, dthreshold = tangents
  threshold = jnp.asarray(threshold, x.dtype)
  out, (left, s, right_t, shrunk) = svt_from_svd(x, threshold)
  right = right_t.T
  active = (s > threshold).astype(x.dtype)
  tiny = jnp.finfo(x.dtype).eps * jnp.maximum(s[0], 1.0) * 8

  # Divided differences of f(s) = (s - t)_+ ; where s_i ~ s_j use f' (the limit).
  diff = s[:, None] - s[None, :]
  close = jnp.abs(diff) <= tiny
  sym_coef = jnp.where(close, 0.5 * (active[:, None] + active[None, :]),
                       (shrunk[:, None] - shrunk[None, :]) / jnp.where(close, 1.0, diff))
  total = s[:, None] + s[None, :]
  zero_sum = total <= tiny
  skew_coef = jnp.where(zero_sum, 0.0,
                        (shrunk[:, None] + shrunk[None, :]) / jnp.where(zero_sum, 1.0, total))
  ratio = jnp.where(s > tiny, shrunk / jnp.where(s > tiny, s, 1.0), 0.0)  # f(s)/s

  a = left.T @ dx @ right
  sym, skew = 0.5 * (a + a.T), 0.5 * (a - a.T)
  core = left @ (sym_coef * sym + skew_coef * skew) @ right_t
  left_perp = dx @ right - left @ a                # (I - U U^T) dX V
  right_perp = left.T @ dx - a @ right_t           # U^T dX (I - V V^T)
  d_out = core + (left_perp * ratio[None, :]) @ right_t + left @ (ratio[:, None] * right_perp)
  if dthreshold is not None and not isinstance(dthreshold, jax.custom_derivatives.SymbolicZero):
    d_out = d_out - (left * active[None, :]) @ right_t * jnp.asarray(dthreshold, x.dtype)
  return out, d_out


def prox_nuclear_gram(x: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """SVT through the eigen-decomposition of the ``m x m`` Gram matrix ``X X^T``.

  .. math::
    \\operatorname{SVT}_t(X) = V \\operatorname{diag}\\big(\\max(1 - t/s_i, 0)\\big) V^\\top X,
    \\qquad X X^\\top = V \\operatorname{diag}(s_i^2) V^\\top

  Cheaper than an SVD when ``m << N`` (one ``m x N x m`` GEMM and an ``m x m`` ``eigh``),
  and the Gram is a sum over client blocks, so it needs one all-reduce when the columns
  are sharded. Squaring the spectrum loses precision for singular values below
  ``sqrt(eps) * s_max``: use :func:`prox_nuclear` (or ``svt_method="auto"`` in the
  solver, which falls back) when such values survive the threshold.

  Args:
    x: ``(m, N)`` matrix.
    threshold: ``t >= 0``, scalar.

  Returns:
    ``(m, N)`` matrix, equal to :func:`prox_nuclear` up to the precision noted above.
  """
  gram = x @ x.T
  vectors, _, factor = gram_svt_factors(gram, jnp.asarray(threshold, x.dtype))
  return (vectors * factor[None, :]) @ (vectors.T @ x)


