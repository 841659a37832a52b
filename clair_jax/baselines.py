"""Baseline aggregators over a leading client axis, comparable with CLAIR's ``refined``.

Every function takes client updates ``(K, m, n)`` and returns per-client estimates
``(K, m, n)``: a global rule (FedAvg, median, ...) gives every client the same aggregate,
``local`` gives each client its own update, and ``oracle`` projects each benign client onto
the subspace fitted on the *true* benign set (a lower reference no real method can beat
systematically). ``selected`` marks the clients that entered the estimate; rules without a
notion of selection report every client they used.

Non-finite clients (any NaN/Inf entry):

- ``fedavg`` is the non-robust reference and propagates them (every client's estimate
  gets the non-finite coordinates; this is what happens in practice).
- ``coordinate_median``, ``trimmed_mean``, ``krum``/``multi_krum`` and ``geometric_median``
  drop them before aggregating (``selected`` is ``False`` for them); if no client is finite
  the estimate is NaN.
- ``local`` returns them unchanged; ``oracle`` fits on the benign set only and returns
  contaminated clients as sent (like CLAIR).

All functions are pure and ``jit``-able; integer options that fix shapes are Python ints.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src.subspace import fit_subspace
from clair_jax._src.subspace import project_onto_subspace


class BaselineResult(NamedTuple):
  """Output of a baseline aggregator.

  Attributes:
    estimates: ``(K, m, n)`` per-client estimates.
    selected: ``(K,)`` bool, clients that entered the estimate (the others were rejected).
  """

  estimates: jax.Array
  selected: jax.Array


class OracleResult(NamedTuple):
  """Output of :func:`oracle`.

  Attributes:
    estimates: ``(K, m, n)``: benign clients projected, contaminated ones as sent.
    selected: ``(K,)`` bool, the true benign set it was given.
    subspace: ``(m, r)`` orthonormal basis fitted on the benign clients.
  """

  estimates: jax.Array
  selected: jax.Array
  subspace: jax.Array


def _check_updates(updates: jax.Array, name: str) -> None:
  if updates.ndim != 3:
    raise ValueError(f"{name} expects updates of shape (K, m, n), got {updates.shape}")


def finite_clients(updates: jax.Array) -> jax.Array:
  """``(K,)`` bool: clients whose update has only finite entries."""
  return jnp.all(jnp.isfinite(updates), axis=(1, 2))


def _broadcast(aggregate: jax.Array, updates: jax.Array) -> jax.Array:
  return jnp.broadcast_to(aggregate[None], updates.shape)


def local(updates: jax.Array) -> BaselineResult:
  """Each client keeps its own preliminary estimate, ``Dtilde_k = Dhat_k``.

  Args:
    updates: ``(K, m, n)``.

  Returns:
    :class:`BaselineResult` with ``estimates = updates`` and every client selected.
  """
  _check_updates(updates, "local")
  return BaselineResult(updates, jnp.ones(updates.shape[:1], bool))


def fedavg(updates: jax.Array) -> BaselineResult:
  """FedAvg: every client receives the plain mean ``(1/K) sum_k Dhat_k``.

  Not robust: a single non-finite client puts its NaN/Inf into every client's estimate.

  Args:
    updates: ``(K, m, n)``.

  Returns:
    :class:`BaselineResult`, every client selected.
  """
  _check_updates(updates, "fedavg")
  return BaselineResult(
      _broadcast(jnp.mean(updates, axis=0), updates), jnp.ones(updates.shape[:1], bool)
  )


def coordinate_median(updates: jax.Array) -> BaselineResult:
  """Coordinate-wise median over the finite clients (Yin et al., 2018).

  .. math::
    [\\tilde D]_{ij} = \\operatorname{median}_{k \\in F} [\\hat D_k]_{ij}, \\qquad
    F = \\{k : \\hat D_k \\text{ finite}\\}

  Args:
    updates: ``(K, m, n)``.

  Returns:
    :class:`BaselineResult`; ``selected`` is ``F``.
  """
  _check_updates(updates, "coordinate_median")
  keep = finite_clients(updates)
  masked = jnp.where(keep[:, None, None], updates, jnp.nan)
  return BaselineResult(_broadcast(jnp.nanmedian(masked, axis=0), updates), keep)


def trimmed_mean(updates: jax.Array, trim: float = 0.1) -> BaselineResult:
  """Coordinate-wise trimmed mean over the finite clients (Yin et al., 2018).

  For each coordinate the ``b = floor(trim * |F|)`` largest and ``b`` smallest values among
  the finite clients ``F`` are removed and the rest averaged (``b`` is capped so at least
  one value remains).

  Args:
    updates: ``(K, m, n)``.
    trim: fraction removed at each end, in ``[0, 0.5)`` (may be traced; checked only when
      it is a Python number).

  Returns:
    :class:`BaselineResult`; ``selected`` is ``F``.
  """
  _check_updates(updates, "trimmed_mean")
  if isinstance(trim, (int, float)) and not 0.0 <= trim < 0.5:
    raise ValueError(f"trim must be in [0, 0.5), got {trim}")
  keep = finite_clients(updates)
  count = jnp.sum(keep)
  cut = jnp.minimum(jnp.floor(trim * count).astype(jnp.int32), (count - 1) // 2)
  values = jnp.sort(jnp.where(keep[:, None, None], updates, jnp.nan), axis=0)  # NaN last
  position = jnp.arange(updates.shape[0])[:, None, None]
  window = (position >= cut) & (position < count - cut)
  total = jnp.sum(jnp.where(window, values, 0.0), axis=0)
  aggregate = total / (count - 2 * cut).astype(updates.dtype)
  return BaselineResult(_broadcast(aggregate, updates), keep)


def krum_scores(updates: jax.Array, num_byzantine: int | jax.Array) -> jax.Array:
  """Krum score of every client (Blanchard et al., 2017).

  .. math::
    s(k) = \\sum_{j \\in N_k} \\|\\hat D_k - \\hat D_j\\|_F^2

  where ``N_k`` are the ``|F| - f - 2`` nearest finite neighbours of ``k`` (at least one),
  ``F`` the finite clients and ``f = num_byzantine``. Non-finite clients score ``+inf``.

  Args:
    updates: ``(K, m, n)``.
    num_byzantine: ``f``, the number of attackers the rule assumes.

  Returns:
    ``(K,)`` scores, smaller is more central.
  """
  _check_updates(updates, "krum_scores")
  num_clients = updates.shape[0]
  keep = finite_clients(updates)
  flat = jnp.where(keep[:, None, None], updates, 0.0).reshape(num_clients, -1)
  distances = jax.vmap(lambda x: jnp.sum(jnp.square(flat - x[None]), axis=1))(flat)
  valid = keep[:, None] & keep[None, :] & ~jnp.eye(num_clients, dtype=bool)
  distances = jnp.sort(jnp.where(valid, distances, jnp.inf), axis=1)
  count = jnp.sum(keep)
  neighbours = jnp.clip(count - num_byzantine - 2, 1, jnp.maximum(count - 1, 1))
  in_window = jnp.arange(num_clients)[None, :] < neighbours
  scores = jnp.sum(jnp.where(in_window, distances, 0.0), axis=1)
  return jnp.where(keep, scores, jnp.inf)


def multi_krum(
    updates: jax.Array, num_byzantine: int | jax.Array, num_selected: int | None = None
) -> BaselineResult:
  """Multi-Krum: average of the ``num_selected`` clients with the smallest Krum scores.

  Args:
    updates: ``(K, m, n)``.
    num_byzantine: ``f``, the number of attackers the rule assumes.
    num_selected: clients averaged; ``None`` means ``K - f`` (Blanchard et al.). Capped at
      the number of finite clients.

  Returns:
    :class:`BaselineResult`; ``selected`` marks the averaged clients.
  """
  _check_updates(updates, "multi_krum")
  num_clients = updates.shape[0]
  if num_selected is None:
    num_selected = num_clients - num_byzantine
  scores = krum_scores(updates, num_byzantine)
  order = jnp.argsort(scores)
  ranks = jnp.zeros((num_clients,), jnp.int32).at[order].set(
      jnp.arange(num_clients, dtype=jnp.int32)
  )
  limit = jnp.clip(jnp.minimum(num_selected, jnp.sum(jnp.isfinite(scores))), 1, num_clients)
  selected = ranks < limit
  safe = jnp.where(selected[:, None, None], updates, 0.0)
  aggregate = jnp.sum(safe, axis=0) / jnp.sum(selected).astype(updates.dtype)
  return BaselineResult(_broadcast(aggregate, updates), selected)


def krum(updates: jax.Array, num_byzantine: int | jax.Array) -> BaselineResult:
  """Krum: every client receives the single client with the smallest Krum score.

  Args:
    updates: ``(K, m, n)``.
    num_byzantine: ``f``, the number of attackers the rule assumes.

  Returns:
    :class:`BaselineResult`; ``selected`` is one-hot.
  """
  return multi_krum(updates, num_byzantine, num_selected=1)


def geometric_median(
    updates: jax.Array,
    *,
    smoothing: float = 1e-6,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> BaselineResult:
  """Smoothed geometric median of the finite clients (Weiszfeld; RFA, Pillutla et al.).

  Approximates :math:`\\arg\\min_z \\sum_{k \\in F} \\|z - \\hat D_k\\|_F` by the smoothed
  Weiszfeld iteration

  .. math::
    z \\leftarrow \\frac{\\sum_k \\beta_k \\hat D_k}{\\sum_k \\beta_k}, \\qquad
    \\beta_k = \\frac{1}{\\max(\\nu, \\|z - \\hat D_k\\|_F)},

  started at the mean of the finite clients and stopped when
  ``||z_new - z|| <= tol * ||z||`` or after ``max_iters`` steps.

  Args:
    updates: ``(K, m, n)``.
    smoothing: ``nu > 0``, guards the division when ``z`` hits a client.
    max_iters: iteration cap.
    tol: relative tolerance on the step.

  Returns:
    :class:`BaselineResult`; ``selected`` is the finite clients.
  """
  _check_updates(updates, "geometric_median")
  if smoothing <= 0:
    raise ValueError(f"smoothing must be > 0, got {smoothing}")
  keep = finite_clients(updates)
  points = jnp.where(keep[:, None, None], updates, 0.0)
  weights = keep.astype(updates.dtype)
  start = jnp.sum(points, axis=0) / jnp.sum(weights)

  def step(z):
    distances = jnp.sqrt(jnp.sum(jnp.square(points - z[None]), axis=(1, 2)))
    beta = weights / jnp.maximum(distances, smoothing)
    return jnp.einsum("k,kmn->mn", beta, points) / jnp.sum(beta)

  def cond(state):
    i, _, change = state
    return (i < max_iters) & (change > tol)

  def body(state):
    i, z, _ = state
    z_new = step(z)
    change = jnp.linalg.norm(z_new - z) / jnp.maximum(jnp.linalg.norm(z), smoothing)
    return i + 1, z_new, change

  _, median, _ = jax.lax.while_loop(cond, body, (0, start, jnp.asarray(jnp.inf, start.dtype)))
  return BaselineResult(_broadcast(median, updates), keep)


def oracle(updates: jax.Array, benign_mask: jax.Array, rank: int) -> OracleResult:
  """Oracle refinement: subspace fitted on the true benign set, benign clients projected.

  .. math::
    U_\\star = \\operatorname{top}_r \\operatorname{left-sv}([\\hat D_k]_{k \\in B}), \\qquad
    \\tilde D_k = U_\\star U_\\star^T \\hat D_k \\ (k \\in B), \\qquad
    \\tilde D_k = \\hat D_k \\ (k \\notin B).

  Args:
    updates: ``(K, m, n)``.
    benign_mask: ``(K,)`` bool, the true benign set ``B``.
    rank: ``r``.

  Returns:
    :class:`OracleResult`.
  """
  _check_updates(updates, "oracle")
  if benign_mask.shape != updates.shape[:1]:
    raise ValueError(
        f"oracle expects benign_mask of shape ({updates.shape[0]},), got {benign_mask.shape}"
    )
  benign_mask = benign_mask.astype(bool)
  subspace = fit_subspace(updates, benign_mask, rank)
  safe = jnp.where(benign_mask[:, None, None], updates, 0.0)
  projected = project_onto_subspace(safe, subspace)
  estimates = jnp.where(benign_mask[:, None, None], projected, updates)
  return OracleResult(estimates, benign_mask, subspace)
