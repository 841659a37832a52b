"""Plain NumPy/SciPy implementation of the SAME CLAIR algorithm as ``clair_jax.clair``.

A line-by-line port of the core (``estimator.clair_core``, ``detect``, ``solver``) with
the same normalisation, consensus and complement starts, trimming (C-steps), structure
test, near-duplicate weights (weighted medians, majorities, counts and fits), own-tail
scale floor, leverage inflation, degrees-of-freedom threshold floors, split selection
(residual direction carried, unsupported weight, objective), FISTA with continuation and
adaptive restart, SVT by Gram ``eigh`` with the SVD fallback, and the same thresholds. Used by the benchmarks to time JAX
against NumPy on the same work and to check both give the same detection and subspace.
Eager, float32 like the JAX default; LAPACK through ``scipy.linalg``; every ``einsum`` with
``optimize=True`` so contractions go to BLAS (NumPy's default ``einsum`` loops in C, ~6x
slower here, which would flatter the JAX/NumPy ratio). The SVT is the exact prox through a
full ``eigh`` of the Gram (the textbook implementation); ``clair_jax`` computes the same
prox from a warm-started subspace iteration when it can certify it (see
``clair_jax._src.svt.svt_warm``) and the full ``eigh`` otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg

MAD_TO_STD = 1.4826
NOISE_EDGE_MARGIN = 1.1        # lambda_L above the noise edge, as clair_jax's estimator
LAM_SPARSE_RATIO = 1.5         # default lambda_S / benign median residual (estimator)
TAIL_FRACTION_FLOOR = 1e-5     # own tail below this fraction of the energy: round-off
RANK_FRACTION_FLOOR = 1e-6     # squared singular value below this fraction: round-off
DUPLICATE_ROUNDOFF = 1e-6      # relative distance of two updates that are the same
CANDIDATE_FACTOR = 2           # directions fitted per subspace dimension (2 r)
RESIDUAL_CARRIED_FACTOR = 2.0  # benign median energy on the residual direction / noise
FLOOR_DEVIATIONS = 4.0         # sampling-noise standard deviations of the default floors


def masked_median(values, mask):
  count = int(mask.sum())
  if count == 0:
    return values.dtype.type(0.0)
  ordered = np.sort(np.where(mask, values, np.inf))
  return 0.5 * (ordered[max((count - 1) // 2, 0)] + ordered[max(count // 2, 0)])


def weighted_median(values, weights):
  """Median under nonnegative weights (0: left out): each value sits at the centre of its
  weight on a line of length ``W``, interpolated at ``W / 2``."""
  valid = weights > 0
  if not valid.any():
    return values.dtype.type(0.0)
  order = np.argsort(values[valid], kind="stable")
  ordered, mass = values[valid][order], weights[valid][order]
  cumulative = np.cumsum(mass)
  return np.interp(cumulative[-1] / 2, cumulative - mass / 2, ordered)


def majority_mass(weights):
  """``floor(W / 2) + 1`` (at most ``W``): the weight of the smallest benign majority."""
  total = np.sum(weights)
  return min(np.floor(total / 2) + 1, total)


def _by_value(values, weights):
  """Order of the clients of positive weight by value (ties by index), their weights and
  the weight before each."""
  order = np.argsort(np.where(weights > 0, values, np.inf), kind="stable")
  w = np.maximum(weights[order], 0.0)
  return order, w, np.cumsum(w) - w


def weighted_smallest_sum(values, weights, mass):
  """``sum w_i v_i`` over the smallest values until their weight reaches ``mass``."""
  order, w, before = _by_value(values, weights)
  taken = np.clip(mass - before, 0.0, w)
  return np.sum(np.where(taken > 0, values[order] * taken, 0.0))


def weighted_smallest_mask(values, weights, mass):
  """The clients of smallest values whose weight first reaches ``mass``."""
  order, _, before = _by_value(values, weights)
  chosen = np.zeros(values.shape, bool)
  chosen[order] = before < mass
  return chosen & (weights > 0)


def noise_width(width, n, rank):
  """Columns a client's noise spans, clipped to ``[r + 1, n]``."""
  return np.clip(width, rank + 1, n)


def gram(blocks):
  return np.einsum("kmn,kpn->mp", blocks, blocks, optimize=True)


def coefficients_of(updates, subspace):
  """``U^T D_k`` for every client, ``(K, r, n)``."""
  return np.einsum("mr,kmn->krn", subspace, updates, optimize=True)


def fit_candidates(updates, weights, width):
  """Top-``width`` eigenvectors of the weighted Gram ``sum_k w_k D_k D_k^T``."""
  scaled = updates * np.sqrt(weights)[:, None, None]
  _, vectors = scipy.linalg.eigh(gram(scaled))
  return vectors[:, ::-1][:, :width]


def residual_norms(updates, subspace, coefficients):
  projected = np.einsum("mr,krn->kmn", subspace, coefficients, optimize=True)
  return np.sqrt(np.sum((updates - projected) ** 2, (1, 2)))


def unexplained_fraction(energy, coefficients):
  explained = np.sum(coefficients**2, (1, 2))
  return np.where(energy > 0, 1.0 - explained / np.where(energy > 0, energy, 1.0), 0.0)


def own_subspaces(blocks, rank):
  """Squared singular values (ascending) and top-``rank`` left singular vectors of each
  block from one batched ``eigh`` of its small Gram (zero columns where unresolved)."""
  _, m, p = blocks.shape
  if p <= m:
    squared, right = np.linalg.eigh(np.einsum("kmn,kmp->knp", blocks, blocks, optimize=True))
    projected = np.einsum("kmn,knr->kmr", blocks, right[:, :, ::-1][:, :, :rank],
                          optimize=True)
    norms = np.sqrt(np.sum(projected**2, axis=1, keepdims=True))
    left = projected / np.where(norms > 0, norms, 1.0)
  else:
    squared, vectors = np.linalg.eigh(np.einsum("kmn,kpn->kmp", blocks, blocks, optimize=True))
    left = vectors[:, :, ::-1][:, :, :rank]
  top = squared[:, ::-1][:, :rank]
  resolved = top > np.finfo(blocks.dtype).eps * min(m, p) * top[:, :1]
  return squared, np.where(resolved[:, None, :], left, 0.0)


class Spectra(NamedTuple):
  tail: np.ndarray | None  # (K,) own energy beyond rank r; None if min(m, n) <= r
  left: np.ndarray         # (K, m, r) own top subspaces
  width: np.ndarray        # (K,) columns the noise spans: n, or the numerical rank


def client_spectra(updates, rank):
  """Own spectral tails, top subspaces and noise widths, from one batched eigh."""
  _, m, n = updates.shape
  squared, left = own_subspaces(updates, min(rank, m, n))
  energy = np.sum(squared, axis=1, keepdims=True)
  numerical_rank = np.sum(squared > RANK_FRACTION_FLOOR * energy, axis=1)
  width = np.where(numerical_rank >= min(m, n), n, numerical_rank).astype(updates.dtype)
  if min(m, n) <= rank:
    return Spectra(None, left, width)
  return Spectra(np.maximum(np.sum(squared[:, : min(m, n) - rank], axis=1), 0.0), left, width)


def duplicate_weights(updates, active, energy, own_tail, rank, width):
  """``1 / |G_k|``, ``G_k`` the active clients within half their own-noise distance of
  client ``k`` (near-duplicates count as one client); 0 for inactive clients."""
  num_clients, m, n = updates.shape
  flat = updates.reshape(num_clients, -1)
  distance = energy[:, None] + energy[None, :] - 2.0 * (flat @ flat.T)
  bound = DUPLICATE_ROUNDOFF * (energy[:, None] + energy[None, :])
  if own_tail is not None and min(m, n) > rank:
    spanned = noise_width(width, n, rank)
    noise = own_tail * m * spanned / ((m - rank) * (spanned - rank))
    bound = bound + 0.5 * (noise[:, None] + noise[None, :])
  same = (distance <= bound) & active[:, None] & active[None, :]
  group = np.sum(same | np.diag(active), axis=1)
  return np.where(active, 1.0 / np.maximum(group, 1), 0.0).astype(updates.dtype)


class Clients(NamedTuple):
  updates: np.ndarray          # (K, m, n) normalised, inactive clients zero
  active: np.ndarray           # (K,) bool
  energy: np.ndarray           # (K,) ||D_k||_F^2
  own_tail: np.ndarray | None  # (K,) or None
  weights: np.ndarray          # (K,) 1 / near-duplicate group size; 0 inactive
  width: np.ndarray            # (K,) columns each client's noise spans


def prepare_clients(updates, active, spectra, rank):
  energy = np.sum(updates**2, (1, 2))
  weights = duplicate_weights(updates, active, energy, spectra.tail, rank, spectra.width)
  return Clients(updates, active, energy, spectra.tail, weights, spectra.width)


def consensus_start(clients, rank, num_candidates, own_left=None):
  updates, active, weights = clients.updates, clients.active, clients.weights
  num_clients, m, n = updates.shape
  group = math.ceil(rank / n)
  ids = np.round(np.linspace(0, num_clients - 1, num_candidates)).astype(int)
  members = (ids[:, None] + np.arange(group)[None, :]) % num_clients
  if group == 1:
    own_left = own_subspaces(updates, rank)[1] if own_left is None else own_left
    subspaces = own_left[ids]
  else:
    proposals = np.transpose(updates[members], (0, 2, 1, 3)).reshape(num_candidates, m,
                                                                     group * n)
    subspaces = own_subspaces(proposals, rank)[1]
  h = majority_mass(weights)
  fractions, costs = [], []
  for c in range(num_candidates):
    fractions.append(unexplained_fraction(clients.energy, coefficients_of(updates, subspaces[c])))
    costs.append(weighted_smallest_sum(fractions[-1], weights, h)
                 if active[members[c]].all() else np.inf)
  return weighted_smallest_mask(fractions[int(np.argmin(costs))], weights, h)


def count_unsupported(coefficients, benign, own_tail, floor, weights, width, m, n):
  """Weight of the ``benign`` clients with no signal 4 sd above their own noise in ``U``."""
  if own_tail is None:
    return 0.0
  rank = coefficients.shape[1]
  spanned = noise_width(width, n, rank)
  noise_variance = np.maximum(own_tail / ((m - rank) * (spanned - rank)), floor**2 / (m * n))
  dof = rank * spanned
  energy = np.sum(coefficients**2, axis=(1, 2))
  supported = energy > noise_variance * (dof + 4.0 * np.sqrt(2.0 * dof))
  return np.sum(np.where(benign & ~supported, weights, 0.0))


def residual_direction_carried(residual, weights, noise_variance, noise_columns, rows):
  """Whether the top direction of the benign residual (``residual``: ``(K, c - r, n)``
  coefficients on the candidate directions beyond ``U``) holds, for the weighted median
  benign client, twice the noise energy the best of ``rows`` noise directions would."""
  if residual.shape[1] == 0:
    return False
  _, vectors = scipy.linalg.eigh(np.einsum("k,kan,kbn->ab", weights, residual, residual,
                                           optimize=True))
  energy = np.sum(np.einsum("a,kan->kn", vectors[:, -1], residual, optimize=True) ** 2, axis=1)
  total = max(np.sum(weights), np.finfo(energy.dtype).tiny)
  typical_columns = weighted_median(np.broadcast_to(noise_columns, weights.shape), weights)
  edge = (1.0 + np.sqrt(rows / (total * typical_columns))) ** 2
  known = noise_variance > 0
  ratio = energy / np.where(known, noise_variance * noise_columns * edge, 1.0)
  return bool(weighted_median(ratio, np.where(known, weights, 0.0)) >= RESIDUAL_CARRIED_FACTOR)


def sampling_floors(m, n, rank):
  """Default (residual, structure) threshold floors: ``exp(4 sd)`` of benign sampling noise
  on ``(m - r) n`` (and the own tail's ``(m - r)(n - r)``) degrees of freedom."""
  rows = max(m - rank, 1)
  d = rows * max(n, 1.0)
  d_tail = rows * max(n - rank, 1.0)
  return (math.exp(FLOOR_DEVIATIONS / math.sqrt(2 * d)),
          math.exp(FLOOR_DEVIATIONS * math.sqrt(1 / (2 * d) + 1 / (2 * d_tail))))


def robust_threshold(scores, benign, ratio, mad_multiplier, weights):
  logs = np.log(np.maximum(scores, np.finfo(scores.dtype).tiny))
  weights = np.where(benign, weights, 0.0)
  centre = weighted_median(logs, weights)
  spread = MAD_TO_STD * weighted_median(np.abs(logs - centre), weights)
  return max(ratio, float(np.exp(centre + mad_multiplier * spread)))


class Split(NamedTuple):
  benign: np.ndarray
  subspace: np.ndarray
  scores: np.ndarray
  scale: float
  unsupported: float
  objective: float
  incomplete: bool
  num_steps: int


def score_split(clients, benign, rank, opts):
  updates, active, own_tail = clients.updates, clients.active, clients.own_tail
  num_clients, m, n = updates.shape
  floor = opts["scale_floor"]
  weights = np.where(benign, clients.weights, 0.0)   # near-duplicates count as one
  candidates = fit_candidates(updates, weights, min(CANDIDATE_FACTOR * rank, m, num_clients * n))
  candidate_coefficients = coefficients_of(updates, candidates)
  subspace, coefficients = candidates[:, :rank], candidate_coefficients[:, :rank]
  residuals = residual_norms(updates, subspace, coefficients)
  if own_tail is not None:
    has_tail = own_tail > TAIL_FRACTION_FLOOR * clients.energy
    spanned = noise_width(clients.width, n, rank)
    expected = np.maximum(np.sqrt(own_tail * spanned / (spanned - rank)), floor)
  scale = max(weighted_median(residuals, weights), floor)
  if own_tail is not None:   # never below the noise the clients' own spectra predict
    scale = max(scale, weighted_median(expected, clients.weights))
  # Leverage inflation: a client large inside U is not mistaken for one off it.
  inside = np.sum(coefficients**2, axis=2)                                  # (K, r)
  direction_energy = np.sum(inside * weights[:, None], axis=0)
  leverage = np.sum(inside / np.maximum(direction_energy, np.finfo(inside.dtype).tiny), axis=1)
  inflation = np.sqrt(1.0 + leverage / np.maximum(np.minimum(clients.width, n), 1.0))
  residual_scores = np.where(active, residuals / (scale * inflation), np.inf)
  if opts["threshold_ratio"] is not None:
    residual_floor = structure_floor = opts["threshold_ratio"]
  else:
    width = weighted_median(np.minimum(clients.width, n), clients.weights)
    residual_floor, structure_floor = sampling_floors(m, width, rank)
    if own_tail is not None:
      tailless = np.where(has_tail, 0.0, clients.weights)
      if 2 * np.sum(tailless) >= np.sum(clients.weights):
        residual_floor = sampling_floors(m, min(n, rank), rank)[0]
  scores = residual_scores / robust_threshold(residual_scores, benign, residual_floor,
                                              opts["mad_multiplier"], clients.weights)
  if own_tail is not None:
    structure = np.where(has_tail, residuals / (expected * inflation), 0.0)
    reference = np.where(has_tail, weights, 0.0)
    structure = structure / max(weighted_median(structure, reference), 1.0)
    structure = np.where(active, structure, np.inf)
    scores = np.maximum(scores, structure / robust_threshold(
        structure, reference > 0, structure_floor, opts["mad_multiplier"], clients.weights))
  h = majority_mass(clients.weights)
  new_benign = active & (scores <= 1.0)
  if np.sum(np.where(new_benign, clients.weights, 0.0)) < h:
    new_benign = weighted_smallest_mask(scores, clients.weights, h)
  objective = weighted_smallest_sum(unexplained_fraction(clients.energy, coefficients),
                                    clients.weights, h)
  unsupported = count_unsupported(coefficients, new_benign, own_tail, floor, clients.weights,
                                  clients.width, m, n)
  if own_tail is None:
    noise_variance = np.full(active.shape, scale**2 / (max(m - rank, 1) * n), updates.dtype)
    spanned = float(n)
  else:
    noise_variance = np.where(has_tail, own_tail / ((m - rank) * (spanned - rank)), 0.0)
  incomplete = residual_direction_carried(
      candidate_coefficients[:, rank:], np.where(new_benign, clients.weights, 0.0),
      noise_variance, spanned, m - rank)
  return Split(new_benign, subspace, scores, scale, unsupported, objective, incomplete, 0)


def concentrate(clients, start, rank, opts):
  split, previous, step = score_split(clients, start, rank, opts), start, 1
  while step < opts["max_trim_steps"] and np.any(previous != split.benign):
    previous = split.benign
    split = score_split(clients, split.benign, rank, opts)
    step += 1
  return split._replace(num_steps=step)


def better_split(first, second):
  """A benign residual most of the set does not carry, then fewer unsupported, then lower
  objective."""
  if first.incomplete != second.incomplete:
    return second.incomplete
  return (first.unsupported < second.unsupported) or (
      first.unsupported == second.unsupported and first.objective <= second.objective)


def svt_blocks(blocks, threshold):
  """SVT of ``[X_1..X_K]`` by Gram ``eigh``; SVD of the stack when the Gram is inaccurate."""
  num_clients, m, n = blocks.shape
  if m <= num_clients * n:
    eigenvalues, vectors = scipy.linalg.eigh(gram(blocks))
    s = np.sqrt(np.maximum(eigenvalues, 0.0))
    keep = s > threshold
    accurate = (threshold >= s[-1] * np.sqrt(np.finfo(blocks.dtype).eps)) or not keep.any()
    if accurate:
      factor = np.where(keep, 1.0 - threshold / np.where(keep, s, 1.0), 0.0)
      return np.einsum("mp,kpn->kmn", (vectors * factor) @ vectors.T, blocks, optimize=True)
  stacked = np.transpose(blocks, (1, 0, 2)).reshape(m, num_clients * n)
  u, s, vt = scipy.linalg.svd(stacked, full_matrices=False)
  out = (u * np.maximum(s - threshold, 0.0)) @ vt
  return np.transpose(out.reshape(m, num_clients, n), (1, 0, 2))


def group_shrink(blocks, thresholds):
  norms = np.sqrt(np.sum(blocks**2, (1, 2)))
  keep = norms > thresholds
  return np.where(keep, 1.0 - thresholds / np.where(keep, norms, 1.0), 0.0)[:, None, None] * blocks


def solve_decomposition(blocks, lam_low_rank, lam_sparse, opts):
  """FISTA on ``L`` with ``S`` minimised out (step 1), continuation ``c <- max(eta c, 1)``
  and adaptive restart; ``S = group_shrink(M - L)``."""
  dtype = blocks.dtype
  norms = np.sqrt(np.sum(blocks**2, (1, 2)))
  spectral = np.sqrt(scipy.linalg.eigvalsh(gram(blocks))[-1])
  tiny = np.finfo(dtype).tiny
  c = max(0.99 * min(spectral / max(lam_low_rank, tiny),
                     np.max(norms / np.maximum(lam_sparse, tiny))), 1.0)
  low = np.zeros_like(blocks)
  prev_low = low
  t, step, residual = 1.0, 0, np.inf
  scale = max(np.sqrt(np.sum(blocks**2)), tiny)
  while step < opts["max_steps"] and not (residual < opts["tol"] and c <= 1.0):
    t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
    beta = (t - 1.0) / t_next
    y_low = low + beta * (low - prev_low)
    svt_input = blocks - group_shrink(blocks - y_low, c * lam_sparse)
    new_low = svt_blocks(svt_input, c * lam_low_rank).astype(dtype)
    residual = np.sqrt(np.sum((new_low - low) ** 2)) / scale
    against = np.vdot(y_low - new_low, new_low - low) > 0
    prev_low, low = low, new_low
    t = 1.0 if against else t_next
    c = max(c * opts["continuation_factor"], 1.0)
    step += 1
    if not np.isfinite(residual):
      break
  sparse = group_shrink(blocks - low, c * lam_sparse).astype(dtype)   # as sparse_part()
  return low, sparse, step


DEFAULTS = dict(threshold_ratio=None, mad_multiplier=3.0, scale_floor=1e-4, convex_floor=1e-2,
                max_trim_steps=30, tol=1e-4, max_steps=500, continuation_factor=0.7,
                num_candidates=None)


class ReferenceResult(NamedTuple):
  contaminated: np.ndarray
  subspace: np.ndarray
  refined: np.ndarray
  solver_steps: int


def clair_numpy(updates, rank, **options) -> ReferenceResult:
  """NumPy CLAIR, same steps as ``clair_jax.clair(updates, rank)`` with default options."""
  opts = dict(DEFAULTS, **options)
  updates = np.asarray(updates)
  num_clients, m, n = updates.shape
  x = updates.astype(np.float32)
  active = np.all(np.isfinite(x), axis=(1, 2))
  x = np.where(active[:, None, None], x, 0.0).astype(np.float32)
  norms = np.sqrt(np.sum(x**2, (1, 2)))
  data_scale = masked_median(norms, active)
  data_scale = data_scale if data_scale > 0 else (norms.max() if norms.max() > 0 else 1.0)
  x_n = (x / data_scale).astype(np.float32)
  dof = max(m - rank, 1) * n
  spectra = client_spectra(x_n, rank)
  clients = prepare_clients(x_n, active, spectra, rank)
  h = majority_mass(clients.weights)
  candidates = max(1, min(opts["num_candidates"] or min(num_clients, 64), num_clients))
  consensus = concentrate(clients, consensus_start(clients, rank, candidates, spectra.left),
                          rank, opts)
  unexplained = unexplained_fraction(clients.energy, coefficients_of(x_n, consensus.subspace))
  complement = concentrate(clients, weighted_smallest_mask(-unexplained, clients.weights, h),
                           rank, opts)
  robust = consensus if better_split(consensus, complement) else complement
  scale = max(robust.scale, opts["convex_floor"])
  sigma = scale / np.sqrt(dof)
  lam_low_rank = NOISE_EDGE_MARGIN * sigma * (np.sqrt(m) + np.sqrt(active.sum() * n))
  lam_sparse = LAM_SPARSE_RATIO * scale * active.astype(np.float32)
  _, sparse, steps = solve_decomposition(x_n, lam_low_rank, lam_sparse, opts)
  sparse_norms = np.sqrt(np.sum(sparse**2, (1, 2)))
  convex_benign = active & (sparse_norms == 0)
  start = (convex_benign if np.sum(np.where(convex_benign, clients.weights, 0.0)) >= h
           else weighted_smallest_mask(sparse_norms, clients.weights, h))
  convex = concentrate(clients, start, rank, opts)
  split = robust if better_split(robust, convex) else convex   # ties -> robust, as in JAX
  contaminated = ~(split.benign & active)
  u = split.subspace
  coefficients = np.einsum("mr,kmn->krn", u, x, optimize=True)
  projected = np.einsum("mr,krn->kmn", u, coefficients, optimize=True)
  refined = np.where(contaminated[:, None, None], updates, projected)
  return ReferenceResult(contaminated, u, refined, steps)
