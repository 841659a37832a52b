"""Baseline aggregators over a leading client axis, comparable with CLAIR's ``refined``.

Every function takes client updates ``(K, m, n)`` and returns per-client estimates
``(K, m, n)`` (``nnm`` returns the mixed updates, a pre-aggregation step): a global rule
(FedAvg, median, ...) gives every client the same aggregate, ``local`` gives each client
its own update, and ``oracle`` projects each benign client onto
the subspace fitted on the *true* benign set (a lower reference no real method can beat
systematically). ``selected`` marks the clients that entered the estimate; rules without a
notion of selection report every client they used.

Non-finite clients (any NaN/Inf entry):

- ``fedavg`` is the non-robust reference and propagates them (every client's estimate
  gets the non-finite coordinates; this is what happens in practice).
- ``coordinate_median``, ``trimmed_mean``, ``krum``/``multi_krum``, ``geometric_median``
  and the peer defences ``nnm_trimmed_mean``, ``centered_clipping`` and ``bucketing`` drop
  them before aggregating (``selected`` is ``False`` for them); if no client is finite the
  estimate is NaN. ``nnm`` never mixes them into a finite client's output and returns them
  as sent.
- ``local`` returns them unchanged; ``oracle`` fits on the benign set only and returns
  contaminated clients as sent (like CLAIR).

Peer defences from the Byzantine-robust FL literature, for comparison: nearest-neighbour
mixing (``nnm``, ``nnm_trimmed_mean``), ``centered_clipping`` and ``bucketing``.

All functions are pure and ``jit``-able; integer options that fix shapes are Python ints.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src import robust
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
  return robust.finite_clients(updates)


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
  aggregate = _trimmed_mean_by_count(updates, keep, jnp.floor(trim * count).astype(jnp.int32))
  return BaselineResult(_broadcast(aggregate, updates), keep)


def _trimmed_mean_by_count(
    updates: jax.Array, keep: jax.Array, cut: int | jax.Array
) -> jax.Array:
  """``(m, n)``: coordinate-wise mean of the ``keep`` rows after removing ``cut`` per end.

  ``cut`` is capped at ``(|keep| - 1) // 2`` so at least one value remains.
  """
  count = jnp.sum(keep)
  cut = jnp.minimum(jnp.asarray(cut, jnp.int32), (count - 1) // 2)
  values = jnp.sort(jnp.where(keep[:, None, None], updates, jnp.nan), axis=0)  # NaN last
  position = jnp.arange(updates.shape[0])[:, None, None]
  window = (position >= cut) & (position < count - cut)
  total = jnp.sum(jnp.where(window, values, 0.0), axis=0)
  return total / (count - 2 * cut).astype(updates.dtype)


def krum_scores(updates: jax.Array, num_byzantine: int | jax.Array) -> jax.Array:
  """Krum score of every client (Blanchard et al., 2017).

  .. math::
    s(k) = \\sum_{j \\in N_k} \\|\\hat D_k - \\hat D_j\\|_F^2

  where ``N_k`` are the ``|F| - f - 2`` nearest finite neighbours of ``k`` (at least one),
  ``F`` the finite clients and ``f = num_byzantine``. Non-finite clients score ``+inf``; a
  single finite client scores ``0``.

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
  scores = jnp.where(count > 1, scores, 0.0)  # a lone finite client has no neighbour: it wins
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


def _check_num_byzantine(num_byzantine: int | jax.Array, num_clients: int, name: str) -> None:
  """Raise when a concrete ``num_byzantine`` is not an integer in ``[0, K/2)``."""
  try:
    value = float(num_byzantine)
  except TypeError:  # traced inside jit: checked by the caller, if at all
    return
  if value != int(value) or not 0 <= value < num_clients / 2:
    raise ValueError(
        f"{name} requires num_byzantine to be an integer in [0, K/2) with K={num_clients}, "
        f"got {num_byzantine}"
    )


def _pairwise_sq_distances(flat: jax.Array) -> jax.Array:
  """``(K, K)`` squared Euclidean distances between the rows of ``flat`` ``(K, d)``."""
  return jax.vmap(lambda x: jnp.sum(jnp.square(flat - x[None]), axis=1))(flat)


def _frobenius_norms(blocks: jax.Array) -> jax.Array:
  """``(K,)`` Frobenius norms of ``(K, m, n)`` blocks, scaled so huge entries do not overflow."""
  scale = jnp.max(jnp.abs(blocks), axis=(1, 2))
  safe = jnp.where(scale > 0, scale, 1.0)
  return safe * jnp.sqrt(jnp.sum(jnp.square(blocks / safe[:, None, None]), axis=(1, 2)))


def nnm(updates: jax.Array, num_byzantine: int | jax.Array) -> jax.Array:
  """Nearest-neighbour mixing (NNM; Allouah et al., AISTATS 2023, "Fixing by Mixing").

  Each finite client is replaced by the average of its ``K - f`` nearest finite clients in
  Frobenius distance, itself included:

  .. math::
    y_k = \\frac{1}{|N_k|} \\sum_{j \\in N_k} \\hat D_j, \\qquad
    N_k = \\text{the } \\min(K - f, |F|) \\text{ clients of } F
    \\text{ closest to } \\hat D_k \\ (k \\in N_k).

  NNM is a pre-aggregation step: a robust rule (e.g. a trimmed mean, see
  :func:`nnm_trimmed_mean`) is then applied to the ``y_k``. Mixing shrinks the spread of the
  benign inputs while bounding how far ``f`` attackers can pull any mixed vector, which
  lifts classical rules to the optimal robustness under heterogeneity.

  Non-finite clients are treated as known attackers: they are never anybody's neighbour, and
  with ``d`` of them the neighbourhood is ``min(K - f, K - d)``, which is ``n' - f'`` for the
  remaining ``n' = K - d`` clients and ``f' = max(f - d, 0)`` attackers among them. Their own
  rows are returned as sent. Ties in distance are broken by client index.

  Args:
    updates: ``(K, m, n)``.
    num_byzantine: ``f``, the number of attackers the rule assumes, ``0 <= f < K/2``.
      ``f = 0`` gives every finite client the mean of the finite clients.

  Returns:
    ``(K, m, n)`` mixed updates.

  References:
    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for
    Optimal Byzantine ML under Heterogeneity", AISTATS 2023, https://arxiv.org/abs/2302.01772
  """
  _check_updates(updates, "nnm")
  num_clients = updates.shape[0]
  _check_num_byzantine(num_byzantine, num_clients, "nnm")
  keep = finite_clients(updates)
  flat = jnp.where(keep[:, None, None], updates, 0.0).reshape(num_clients, -1)
  valid = keep[:, None] & keep[None, :]
  eye = jnp.eye(num_clients, dtype=bool)
  distances = jnp.where(valid, _pairwise_sq_distances(flat), jnp.inf)
  distances = jnp.where(eye, -1.0, distances)  # a client is always its own first neighbour
  ranks = jnp.argsort(jnp.argsort(distances, axis=1, stable=True), axis=1)
  count = jnp.sum(keep)
  neighbours = jnp.clip(num_clients - num_byzantine, 1, jnp.maximum(count, 1))
  weights = ((ranks < neighbours) & valid).astype(updates.dtype) / neighbours
  mixed = jnp.einsum("kj,jd->kd", weights, flat, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(keep[:, None, None], mixed.reshape(updates.shape), updates)


def nnm_trimmed_mean(updates: jax.Array, num_byzantine: int | jax.Array) -> BaselineResult:
  """NNM followed by the coordinate-wise trimmed mean (Allouah et al., AISTATS 2023).

  .. math::
    [\\tilde D]_{ij} = \\operatorname{TM}_f\\big([y_k]_{ij} : k \\in F\\big),

  where ``y = nnm(updates, f)`` and ``TM_f`` removes the ``f`` largest and ``f`` smallest
  values of each coordinate and averages the rest (``f`` capped at ``(|F| - 1) // 2`` so a
  value remains). ``f`` is not reduced by the number of dropped non-finite clients: the
  trim is the one the rule was configured with.

  Args:
    updates: ``(K, m, n)``.
    num_byzantine: ``f``, ``0 <= f < K/2``.

  Returns:
    :class:`BaselineResult`; ``selected`` is the finite clients ``F`` (all are mixed in).

  References:
    Allouah et al., "Fixing by Mixing", AISTATS 2023, https://arxiv.org/abs/2302.01772;
    Yin et al., ICML 2018 (trimmed mean).
  """
  _check_updates(updates, "nnm_trimmed_mean")
  _check_num_byzantine(num_byzantine, updates.shape[0], "nnm_trimmed_mean")
  keep = finite_clients(updates)
  aggregate = _trimmed_mean_by_count(nnm(updates, num_byzantine), keep, num_byzantine)
  return BaselineResult(_broadcast(aggregate, updates), keep)


def centered_clipping(
    updates: jax.Array,
    *,
    radius: float | jax.Array | None = None,
    num_iters: int = 3,
    start: jax.Array | None = None,
) -> BaselineResult:
  """Centered clipping (Karimireddy, He, Jaggi, ICML 2021).

  Starting from ``v_0``, ``num_iters`` steps of

  .. math::
    v \\leftarrow v + \\frac{1}{|F|} \\sum_{k \\in F} \\operatorname{clip}_\\tau(\\hat D_k - v),
    \\qquad \\operatorname{clip}_\\tau(z) = z \\min\\big(1, \\tau / \\|z\\|_F\\big),

  over the finite clients ``F``. With ``tau = inf`` one step from any start is the mean; a
  client farther than ``tau`` moves ``v`` by at most ``tau / |F|``.

  Start: the paper centres on the previous round's aggregated momentum, a point that is
  already close to the benign mean. A one-shot aggregation has no history, so the default
  start is the coordinate-wise median of the finite clients, a robust point that fewer than
  half the clients cannot move arbitrarily far.

  Radius: the paper sets ``tau`` from the (unknown) benign variance and, in practice, tunes
  it. The default here is data-driven: the median over ``F`` of ``||Dhat_k - v_0||_F``. With
  fewer than half the clients contaminated this is at most a benign client's distance to the
  start, so it scales with the benign spread (noise and heterogeneity), is invariant to how
  far away attackers are, and scales with the data (``tau`` for ``c * updates`` is ``c``
  times ``tau``). If more than half the clients coincide with the start it is ``0`` and the
  result is the start.

  Args:
    updates: ``(K, m, n)``.
    radius: ``tau > 0`` (``inf`` allowed); ``None`` for the data-driven default.
    num_iters: number of clipping steps, ``>= 1`` (the paper uses 1 to 3).
    start: ``(m, n)`` starting point ``v_0``; ``None`` for the coordinate median.

  Returns:
    :class:`BaselineResult`; ``selected`` is the finite clients ``F`` (all enter, clipped).

  References:
    Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
    ICML 2021, https://arxiv.org/abs/2012.10333
  """
  _check_updates(updates, "centered_clipping")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"centered_clipping requires num_iters to be an int >= 1, got {num_iters}")
  if radius is not None:
    try:
      concrete = float(radius)
    except TypeError:  # traced
      concrete = None
    if concrete is not None and not concrete > 0:
      raise ValueError(f"centered_clipping requires radius > 0 (or None), got {radius}")
  if start is not None and jnp.shape(start) != updates.shape[1:]:
    raise ValueError(
        f"centered_clipping expects start of shape {updates.shape[1:]}, got {jnp.shape(start)}"
    )
  keep = finite_clients(updates)
  points = jnp.where(keep[:, None, None], updates, 0.0)
  weights = keep.astype(updates.dtype)
  count = jnp.sum(weights)
  if start is None:
    start = coordinate_median(updates).estimates[0]
  start = jnp.asarray(start, updates.dtype)
  if radius is None:
    distances = _frobenius_norms(points - start[None])
    radius = robust.masked_median(distances, keep)
  radius = jnp.asarray(radius, updates.dtype)
  tiny = jnp.finfo(updates.dtype).tiny

  def body(_, v):
    diff = points - v[None]
    scale = jnp.minimum(1.0, radius / jnp.maximum(_frobenius_norms(diff), tiny))
    return v + jnp.einsum("k,kmn->mn", weights * scale, diff) / count

  center = jax.lax.fori_loop(0, num_iters, body, start)
  return BaselineResult(_broadcast(center, updates), keep)


BUCKETING_AGGREGATORS = (
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "geometric_median",
    "centered_clipping",
)
_NEEDS_NUM_BYZANTINE = ("trimmed_mean", "krum", "multi_krum")


def _aggregate_buckets(
    means: jax.Array, aggregator: str, num_byzantine: int | jax.Array | None
) -> BaselineResult:
  if aggregator == "median":
    return coordinate_median(means)
  if aggregator == "trimmed_mean":
    keep = finite_clients(means)
    aggregate = _trimmed_mean_by_count(means, keep, num_byzantine)
    return BaselineResult(_broadcast(aggregate, means), keep)
  if aggregator == "krum":
    return krum(means, num_byzantine)
  if aggregator == "multi_krum":
    return multi_krum(means, num_byzantine)
  if aggregator == "geometric_median":
    return geometric_median(means)
  return centered_clipping(means)


def bucketing(
    updates: jax.Array,
    *,
    key: jax.Array,
    bucket_size: int = 2,
    aggregator: str = "geometric_median",
    num_byzantine: int | jax.Array | None = None,
) -> BaselineResult:
  """Bucketing (Karimireddy, He, Jaggi, ICLR 2022) in front of a robust aggregator.

  The finite clients are put in a random order ``pi`` (drawn from ``key``), cut into
  consecutive buckets of ``s = bucket_size`` clients, and each bucket is averaged,

  .. math::
    y_b = \\frac{1}{|B_b|} \\sum_{i \\in B_b} \\hat D_{\\pi(i)}, \\qquad
    B_b = \\{bs, \\dots, \\min((b+1)s, |F|) - 1\\},

  then ``aggregator`` is applied to the bucket means. Averaging random groups shrinks the
  benign spread by about ``sqrt(s)`` (heterogeneity is what lets attackers hide) while ``f``
  attackers still spoil at most ``f`` buckets, a fraction up to ``s`` times larger: the rule
  needs ``f * s`` well under half of ``K``.

  The number of buckets ``ceil(K / s)`` is static; non-finite clients are ordered after the
  finite ones and left out, so with ``d`` of them the last buckets may be empty. Empty
  buckets are NaN and the aggregator drops them like any non-finite input.

  ``aggregator`` (one of :data:`BUCKETING_AGGREGATORS`): ``"median"``
  (:func:`coordinate_median`), ``"trimmed_mean"`` (trims ``f`` bucket means at each end,
  capped so one remains), ``"krum"`` / ``"multi_krum"`` (with ``f`` attackers among the
  buckets; Multi-Krum averages ``#buckets - f`` of them, at least one),
  ``"geometric_median"`` and ``"centered_clipping"``, each with its defaults.

  Args:
    updates: ``(K, m, n)``.
    key: PRNG key for the permutation.
    bucket_size: ``s >= 1`` (Python int; ``s = 1`` is the aggregator on the permuted clients).
    aggregator: name of the rule applied to the bucket means.
    num_byzantine: ``f``, ``0 <= f < K/2``; required for ``"trimmed_mean"``, ``"krum"`` and
      ``"multi_krum"``, ignored by the others.

  Returns:
    :class:`BaselineResult`; ``selected`` marks the finite clients whose bucket the
    aggregator selected (all of them, except for Krum / Multi-Krum).

  References:
    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022, https://arxiv.org/abs/2006.09365
  """
  _check_updates(updates, "bucketing")
  if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
    raise ValueError(f"bucketing requires bucket_size to be an int >= 1, got {bucket_size!r}")
  if aggregator not in BUCKETING_AGGREGATORS:
    raise ValueError(
        f"bucketing aggregator must be one of {BUCKETING_AGGREGATORS}, got {aggregator!r}"
    )
  num_clients = updates.shape[0]
  if num_byzantine is None:
    if aggregator in _NEEDS_NUM_BYZANTINE:
      raise ValueError(f"bucketing with aggregator={aggregator!r} requires num_byzantine")
  else:
    _check_num_byzantine(num_byzantine, num_clients, "bucketing")
  num_buckets = -(-num_clients // bucket_size)
  keep = finite_clients(updates)
  permutation = jax.random.permutation(key, num_clients)
  order = permutation[jnp.argsort(~keep[permutation], stable=True)]  # finite clients first
  position = jnp.zeros((num_clients,), jnp.int32).at[order].set(
      jnp.arange(num_clients, dtype=jnp.int32)
  )
  bucket = position // bucket_size
  members = (bucket[None, :] == jnp.arange(num_buckets)[:, None]) & keep[None, :]
  sizes = jnp.sum(members, axis=1)
  flat = jnp.where(keep[:, None, None], updates, 0.0).reshape(num_clients, -1)
  sums = jnp.einsum(
      "bk,kd->bd", members.astype(updates.dtype), flat, precision=jax.lax.Precision.HIGHEST
  )
  means = jnp.where(sizes[:, None] > 0, sums / jnp.maximum(sizes, 1)[:, None], jnp.nan)
  result = _aggregate_buckets(
      means.reshape((num_buckets,) + updates.shape[1:]), aggregator, num_byzantine
  )
  return BaselineResult(_broadcast(result.estimates[0], updates), result.selected[bucket] & keep)


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


def clair_given_benign(updates: jax.Array, benign_mask: jax.Array, rank: int,
                       **options) -> OracleResult:
  """CLAIR's refinement given the *true* benign set: the reference CLAIR's detection aims at.

  Runs the same refine stage as :func:`clair_jax.clair` (partial pooling inside a
  data-chosen subspace by default; ``refine="projection"`` for ``U U^T D_k``) on
  ``benign_mask`` instead of a detected set. Contaminated clients are returned as sent.

  Args:
    updates: ``(K, m, n)``.
    benign_mask: ``(K,)`` bool, the true benign set.
    rank: detection rank ``r`` (used by ``refine="projection"``).
    **options: refine options of :class:`clair_jax.ClairOptions` (``refine``,
      ``refine_strength``, ``refine_rank``, ``refine_max_rank``, ``subspace_noise``).

  Returns:
    :class:`OracleResult` (``subspace``: the refine subspace, or the rank-``r`` fit).
  """
  from clair_jax._src import estimator  # pylint: disable=g-import-not-at-top
  _check_updates(updates, "clair_given_benign")
  opts = estimator.resolve_options(None, **options)
  benign = jnp.asarray(benign_mask).astype(bool) & finite_clients(updates)
  safe = jnp.where(benign[:, None, None], updates, 0.0)
  scale = jnp.median(jnp.where(benign, jnp.sqrt(jnp.sum(safe**2, axis=(1, 2))), jnp.nan))
  scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)
  x_n = jnp.where(finite_clients(updates)[:, None, None], updates, 0.0) / scale
  subspace = fit_subspace(jnp.where(benign[:, None, None], x_n, 0.0), benign, rank)
  refinement = estimator.refine_stage(x_n, benign, benign, subspace, opts, scale)
  estimates = jnp.where(benign[:, None, None], refinement.refined * scale, updates)
  return OracleResult(estimates.astype(updates.dtype), benign, refinement.subspace)
