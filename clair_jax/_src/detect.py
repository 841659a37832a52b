"""Detection: robust starts and the rank-aware trimming (concentration) loop.

The convex program alone absorbs a *coherent* contaminated group into ``L``, and any
SVD-based start is outvoted by a coherent group with larger norms (see CLAIR.md,
"Parameters"). Two ideas fix this, both counting clients rather than energy:

* **Consensus start**: every client proposes the subspace of its own block; a proposal is
  scored by the sum of the ``h = floor(K/2) + 1`` smallest *fractions* of client energy it
  leaves unexplained (a least-trimmed-squares criterion, scale-free per client), so the
  subspace that explains a majority of clients wins whatever the norms.
* **Concentration**: fit ``U`` on the current benign set, score every client by its
  off-subspace residual relative to the benign median, re-split, repeat until stable
  (C-steps as in FAST-MCD / least trimmed squares).

All functions take an ``active`` mask (finite clients); inactive clients never enter a
median, a count or a fit, so dropping a NaN client changes nothing for the others.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src.subspace import fit_subspace
from clair_jax._src.subspace import project_onto_subspace

# Consistency constant turning a median absolute deviation into a Gaussian std.
MAD_TO_STD = 1.4826


def masked_median(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of ``values[mask]`` with a static shape (``mask`` may be traced)."""
  count = jnp.sum(mask)
  ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
  low = ordered[jnp.maximum((count - 1) // 2, 0)]
  high = ordered[jnp.maximum(count // 2, 0)]
  return jnp.where(count > 0, 0.5 * (low + high), 0.0)


def smallest_sum(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """Sum of the ``count`` smallest entries of ``values[mask]``."""
  ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
  return jnp.sum(jnp.where(jnp.arange(values.shape[0]) < count, ordered, 0.0))


def smallest_mask(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """Boolean mask of the ``count`` smallest entries of ``values[mask]`` (ties by index)."""
  ranks = jnp.argsort(jnp.argsort(jnp.where(mask, values, jnp.inf)))
  return mask & (ranks < count)


def majority_size(active: jax.Array) -> jax.Array:
  """``h = floor(K_active / 2) + 1``: the smallest benign set that is a majority."""
  return jnp.sum(active) // 2 + 1


def residual_norms(updates: jax.Array, subspace: jax.Array) -> jax.Array:
  """Off-subspace residual ``||(I - U U^T) D_k||_F`` for each client, ``(K,)``."""
  return jnp.sqrt(jnp.sum((updates - project_onto_subspace(updates, subspace)) ** 2, (1, 2)))


def unexplained_fraction(updates: jax.Array, subspace: jax.Array) -> jax.Array:
  """``||(I - U U^T) D_k||_F^2 / ||D_k||_F^2`` (0 for a zero block), ``(K,)``."""
  energy = jnp.sum(updates**2, (1, 2))
  explained = jnp.sum(jnp.einsum("mr,kmn->krn", subspace, updates) ** 2, (1, 2))
  return jnp.where(energy > 0, 1.0 - explained / jnp.where(energy > 0, energy, 1.0), 0.0)


class Split(NamedTuple):
  """A benign/contaminated split and what it implies."""

  benign: jax.Array      # (K,) bool
  subspace: jax.Array    # (m, r), fitted on `benign`
  scores: jax.Array      # (K,) residual / benign median residual
  threshold: jax.Array   # scalar, in score units
  scale: jax.Array       # benign median residual (normalised units, floored)
  objective: jax.Array   # trimmed sum of unexplained fractions (lower is better)
  num_steps: jax.Array   # C-steps taken


def consensus_start(
    updates: jax.Array, active: jax.Array, rank: int, num_candidates: int
) -> jax.Array:
  """Benign set proposed by the single-client subspace that explains the most clients.

  Candidate ``j`` is the top-``rank`` left singular subspace of client ``j``'s block (of
  ``ceil(rank / n)`` consecutive clients when ``n < rank``). Its cost is the sum of the
  ``h`` smallest unexplained fractions over active clients; the best candidate's ``h``
  best-explained clients are returned.

  Args:
    updates: ``(K, m, n)`` normalised updates, inactive clients zeroed.
    active: ``(K,)`` bool.
    rank: subspace dimension.
    num_candidates: how many clients (evenly spaced) propose a subspace.

  Returns:
    ``(K,)`` bool benign mask of size ``h``.
  """
  num_clients, m, n = updates.shape
  group = math.ceil(rank / n)
  candidate_ids = jnp.round(jnp.linspace(0, num_clients - 1, num_candidates)).astype(jnp.int32)
  offsets = jnp.arange(group)
  members = (candidate_ids[:, None] + offsets[None, :]) % num_clients  # (C, group)
  proposals = jnp.transpose(updates[members], (0, 2, 1, 3)).reshape(num_candidates, m, group * n)
  left, _, _ = jnp.linalg.svd(proposals, full_matrices=False)
  subspaces = left[:, :, :rank]                                          # (C, m, r)
  h = majority_size(active)
  fractions = jax.vmap(lambda u: unexplained_fraction(updates, u))(subspaces)  # (C, K)
  costs = jax.vmap(lambda f: smallest_sum(f, active, h))(fractions)
  costs = jnp.where(jnp.all(active[members], axis=1), costs, jnp.inf)
  best = jnp.argmin(costs)
  return smallest_mask(fractions[best], active, h)


def score_split(
    updates: jax.Array,
    active: jax.Array,
    benign: jax.Array,
    rank: int,
    *,
    threshold_ratio: float,
    mad_multiplier: float,
    scale_floor: float,
    fixed_scale: jax.Array | None = None,
) -> Split:
  """Fits ``U`` on ``benign``, scores every client and returns the implied split.

  .. math::
    s_k = \\frac{\\|(I - \\hat U \\hat U^\\top) D_k\\|_F}
               {\\max(\\operatorname{med}_{j \\in B} \\|(I - \\hat U \\hat U^\\top) D_j\\|_F,\\ \\epsilon)}
    ,\\qquad
    \\tau = \\max\\big(\\rho,\\ 1 + z\\, 1.4826\\, \\operatorname{MAD}_{j \\in B}(s_j)\\big)

  A client is benign when ``s_k <= tau``; at least a majority ``h`` of active clients is
  kept (the ``h`` lowest scores), since a contaminated majority is not identifiable.
  ``fixed_scale`` replaces the benign median residual (a known noise level).
  """
  subspace = fit_subspace(updates, benign, rank)
  residuals = residual_norms(updates, subspace)
  if fixed_scale is None:
    scale = jnp.maximum(masked_median(residuals, benign), scale_floor)
  else:
    scale = jnp.asarray(fixed_scale, residuals.dtype)
  scores = jnp.where(active, residuals / scale, jnp.inf)
  spread = MAD_TO_STD * masked_median(jnp.abs(scores - masked_median(scores, benign)), benign)
  threshold = jnp.maximum(threshold_ratio, 1.0 + mad_multiplier * spread)
  h = majority_size(active)
  new_benign = active & (scores <= threshold)
  new_benign = jnp.where(jnp.sum(new_benign) >= h, new_benign, smallest_mask(scores, active, h))
  objective = smallest_sum(unexplained_fraction(updates, subspace), active, h)
  return Split(new_benign, subspace, scores, threshold, scale, objective,
               jnp.asarray(0, jnp.int32))


def concentrate(
    updates: jax.Array,
    active: jax.Array,
    start: jax.Array,
    rank: int,
    *,
    max_steps: int,
    threshold_ratio: float,
    mad_multiplier: float,
    scale_floor: float,
    fixed_scale: jax.Array | None = None,
) -> Split:
  """C-steps from ``start`` until the benign set stops changing (or ``max_steps``).

  Returns the split scored on the final benign set, so ``scores``, ``threshold`` and
  ``subspace`` are consistent with each other.
  """
  score = lambda benign: score_split(
      updates, active, benign, rank, threshold_ratio=threshold_ratio,
      mad_multiplier=mad_multiplier, scale_floor=scale_floor, fixed_scale=fixed_scale)
  first = score(start)
  state = (jnp.asarray(1, jnp.int32), start, first)

  def cond(state):
    step, previous, split = state
    return (step < max_steps) & jnp.any(previous != split.benign)

  def body(state):
    step, _, split = state
    return step + 1, split.benign, score(split.benign)

  steps, _, split = jax.lax.while_loop(cond, body, state)
  return split._replace(num_steps=steps)
