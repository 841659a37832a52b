r"""Robust statistics shared by detection, refinement, the joint verdict and the baselines.

Every function here takes a static-shape array and a mask (or weights), so it runs inside
``jit``/``vmap`` with the benign set traced:

* :func:`finite_clients`: which clients (leading axis) are entirely finite;
* :func:`masked_quantile` / :func:`masked_median`: order statistics of ``values[mask]``;
* :func:`weighted_median`: the median under nonnegative client weights (near-duplicate
  groups count once);
* :func:`mad` and :func:`upper_fence`: ``med + z * 1.4826 * MAD``, the outlier bound every
  robust cut in the package uses (the Gaussian consistency constant turns a median
  absolute deviation into a standard deviation);
* :func:`robust_threshold`: the same bound on a log scale for ratio scores, floored.

Breakdown point 1/2 for all of them: fewer than half the (weighted) values cannot move
the result outside the range of the others.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# 1 / Phi^{-1}(3/4): turns a median absolute deviation into a Gaussian standard deviation.
MAD_TO_STD = 1.482602218505602


def finite_clients(x: jax.Array) -> jax.Array:
  """``(K,)`` bool: every entry of client ``k`` (``x[k]``, any trailing shape) is finite."""
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def masked_quantile(values: jax.Array, mask: jax.Array, quantile: float) -> jax.Array:
  """Linear-interpolated ``quantile`` of ``values[mask]`` with a static shape (0 if empty)."""
  count = jnp.sum(mask)
  ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
  position = quantile * jnp.maximum(count - 1, 0)
  low = jnp.floor(position).astype(jnp.int32)
  high = jnp.minimum(low + 1, jnp.maximum(count - 1, 0))
  weight = position - low
  value = (1 - weight) * ordered[low] + weight * jnp.where(weight > 0, ordered[high], 0.0)
  return jnp.where(count > 0, value, 0.0)


def masked_median(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of ``values[mask]`` with a static shape (``mask`` may be traced; 0 if empty)."""
  return masked_quantile(values, mask, 0.5)


def weighted_median(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Median of ``values`` under nonnegative ``weights`` (zero weight: left out).

  Each value stands at the centre of its weight on a line of total length ``W``; the
  median interpolates at ``W / 2``. With 0/1 weights it is the usual median of the
  weighted values (:func:`masked_median`).
  """
  valid = weights > 0
  order = jnp.argsort(jnp.where(valid, values, jnp.inf))
  ordered, mass = values[order], jnp.where(valid, weights, 0.0)[order]
  cumulative = jnp.cumsum(mass)
  total = cumulative[-1]
  largest = jnp.max(jnp.where(valid, values, -jnp.inf))
  centres = jnp.where(mass > 0, cumulative - mass / 2, total)
  ordered = jnp.where(mass > 0, ordered, largest)
  return jnp.where(total > 0, jnp.interp(total / 2, centres, ordered), 0.0)


def mad(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(median, median absolute deviation)`` of ``values[mask]``."""
  centre = masked_median(values, mask)
  return centre, masked_median(jnp.abs(values - centre), mask)


def upper_fence(values: jax.Array, mask: jax.Array, multiplier) -> jax.Array:
  r"""``med + multiplier * 1.4826 * MAD`` of ``values[mask]``: the robust outlier bound.

  .. math::
    \operatorname{med}_{k \in S} v_k + z \cdot 1.4826\,
    \operatorname{med}_{k \in S} |v_k - \operatorname{med}_{j \in S} v_j|

  For Gaussian values ``z = 3.09`` leaves out 0.1% of them.
  """
  centre, deviation = mad(values, mask)
  return centre + multiplier * MAD_TO_STD * deviation


def robust_threshold(scores, benign, threshold_ratio, mad_multiplier, weights=None):
  """``max(rho, exp(med_B log s + z * 1.4826 * MAD_B(log s)))``.

  Scores are ratios (benign median ~1) and benign clients differ multiplicatively (one
  client's noise twice another's), so the band is set on the log scale: it reduces to the
  floor ``rho`` when benign clients agree and widens as they spread. ``weights`` (default
  the benign mask) count near-duplicate clients once.
  """
  logs = jnp.log(jnp.maximum(scores, jnp.finfo(scores.dtype).tiny))
  weights = benign.astype(scores.dtype) if weights is None else jnp.where(benign, weights, 0.0)
  centre = weighted_median(logs, weights)
  spread = MAD_TO_STD * weighted_median(jnp.abs(logs - centre), weights)
  return jnp.maximum(threshold_ratio, jnp.exp(centre + mad_multiplier * spread))
