"""Plain NumPy/SciPy implementation of the SAME CLAIR algorithm as ``clair_jax.clair``.

A line-by-line port of the core (``estimator.clair_core``, ``detect``, ``solver``) with
the same normalisation, consensus and complement starts, trimming (C-steps), structure
test, split selection, FISTA with continuation and adaptive restart, SVT by Gram ``eigh``
with the SVD fallback, and the same thresholds. Used by the benchmarks to time JAX
against NumPy on the same work and to check both give the same detection and subspace.
Eager, float32 like the JAX default; LAPACK through ``scipy.linalg``; every ``einsum`` with
``optimize=True`` so contractions go to BLAS (NumPy's default ``einsum`` loops in C, ~6x
slower here, which would flatter the JAX/NumPy ratio). The SVT is the exact prox through a
full ``eigh`` of the Gram (the textbook implementation); ``clair_jax`` computes the same
prox from a warm-started subspace iteration when it can certify it (see
``clair_jax._src.solver.svt_warm``) and the full ``eigh`` otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg

MAD_TO_STD = 1.4826
NOISE_EDGE_MARGIN = 1.1   # lambda_L above the noise edge, as clair_jax's estimator


def masked_median(values, mask):
  count = int(mask.sum())
  if count == 0:
    return values.dtype.type(0.0)
  ordered = np.sort(np.where(mask, values, np.inf))
  return 0.5 * (ordered[max((count - 1) // 2, 0)] + ordered[max(count // 2, 0)])


def smallest_sum(values, mask, count):
  ordered = np.sort(np.where(mask, values, np.inf))
  return np.sum(np.where(np.arange(values.shape[0]) < count, ordered, 0.0))


def smallest_mask(values, mask, count):
  ranks = np.argsort(np.argsort(np.where(mask, values, np.inf), kind="stable"), kind="stable")
  return mask & (ranks < count)


def gram(blocks):
  return np.einsum("kmn,kpn->mp", blocks, blocks, optimize=True)


def fit_subspace(updates, mask, rank):
  updates = np.where(mask[:, None, None], updates, 0)
  _, vectors = scipy.linalg.eigh(gram(updates))
  return vectors[:, ::-1][:, :rank]


def residual_norms(updates, subspace):
  coefficients = np.einsum("mr,kmn->krn", subspace, updates, optimize=True)
  projected = np.einsum("mr,krn->kmn", subspace, coefficients, optimize=True)
  return np.sqrt(np.sum((updates - projected) ** 2, (1, 2)))


def unexplained_fraction(updates, subspace):
  energy = np.sum(updates**2, (1, 2))
  explained = np.sum(np.einsum("mr,kmn->krn", subspace, updates, optimize=True) ** 2, (1, 2))
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


def consensus_start(updates, active, rank, num_candidates, own_left=None):
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
  h = int(active.sum()) // 2 + 1
  fractions, costs = [], []
  for c in range(num_candidates):
    fractions.append(unexplained_fraction(updates, subspaces[c]))
    costs.append(smallest_sum(fractions[-1], active, h) if active[members[c]].all() else np.inf)
  return smallest_mask(fractions[int(np.argmin(costs))], active, h)


def client_spectra(updates, rank):
  """(own spectral tail beyond rank, or None; own top subspaces) from one batched eigh."""
  _, m, n = updates.shape
  squared, left = own_subspaces(updates, min(rank, m, n))
  if min(m, n) <= rank:
    return None, left
  return np.maximum(np.sum(squared[:, : min(m, n) - rank], axis=1), 0.0), left


def count_unsupported(updates, benign, subspace, own_tail, floor):
  if own_tail is None:
    return 0
  _, m, n = updates.shape
  rank = subspace.shape[1]
  noise_variance = np.maximum(own_tail / ((m - rank) * (n - rank)), floor**2 / (m * n))
  dof = rank * n
  energy = np.sum(np.einsum("mr,kmn->krn", subspace, updates, optimize=True) ** 2, axis=(1, 2))
  supported = energy > noise_variance * (dof + 4.0 * np.sqrt(2.0 * dof))
  return int(np.sum(benign & ~supported))


def robust_threshold(scores, benign, ratio, mad_multiplier):
  logs = np.log(np.maximum(scores, np.finfo(scores.dtype).tiny))
  centre = masked_median(logs, benign)
  spread = MAD_TO_STD * masked_median(np.abs(logs - centre), benign)
  return max(ratio, float(np.exp(centre + mad_multiplier * spread)))


class Split(NamedTuple):
  benign: np.ndarray
  subspace: np.ndarray
  scores: np.ndarray
  scale: float
  unsupported: int
  objective: float
  num_steps: int


def score_split(updates, active, benign, rank, opts, own_tail):
  subspace = fit_subspace(updates, benign, rank)
  residuals = residual_norms(updates, subspace)
  scale = max(masked_median(residuals, benign), opts["scale_floor"])
  residual_scores = np.where(active, residuals / scale, np.inf)
  scores = residual_scores / robust_threshold(residual_scores, benign, opts["threshold_ratio"],
                                              opts["mad_multiplier"])
  if own_tail is not None:
    n = updates.shape[2]
    expected = np.maximum(np.sqrt(own_tail * n / (n - rank)), opts["scale_floor"])
    structure = residuals / expected
    structure = structure / max(masked_median(structure, benign), 1.0)
    structure = np.where(active, structure, np.inf)
    scores = np.maximum(scores, structure / robust_threshold(
        structure, benign, opts["threshold_ratio"], opts["mad_multiplier"]))
  h = int(active.sum()) // 2 + 1
  new_benign = active & (scores <= 1.0)
  if new_benign.sum() < h:
    new_benign = smallest_mask(scores, active, h)
  objective = smallest_sum(unexplained_fraction(updates, subspace), active, h)
  unsupported = count_unsupported(updates, new_benign, subspace, own_tail, opts["scale_floor"])
  return Split(new_benign, subspace, scores, scale, unsupported, objective, 0)


def concentrate(updates, active, start, rank, opts, own_tail):
  split, previous, step = score_split(updates, active, start, rank, opts, own_tail), start, 1
  while step < opts["max_trim_steps"] and np.any(previous != split.benign):
    previous = split.benign
    split = score_split(updates, active, split.benign, rank, opts, own_tail)
    step += 1
  return split._replace(num_steps=step)


def better_split(first, second):
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


DEFAULTS = dict(threshold_ratio=1.5, mad_multiplier=3.0, scale_floor=1e-4, convex_floor=1e-2,
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
  own_tail, own_left = client_spectra(x_n, rank)
  h = int(active.sum()) // 2 + 1
  candidates = max(1, min(opts["num_candidates"] or min(num_clients, 64), num_clients))
  consensus = concentrate(x_n, active, consensus_start(x_n, active, rank, candidates, own_left),
                          rank, opts, own_tail)
  unexplained = unexplained_fraction(x_n, consensus.subspace)
  complement = concentrate(x_n, active, smallest_mask(-unexplained, active, h), rank, opts,
                           own_tail)
  robust = consensus if better_split(consensus, complement) else complement
  scale = max(robust.scale, opts["convex_floor"])
  sigma = scale / np.sqrt(dof)
  lam_low_rank = NOISE_EDGE_MARGIN * sigma * (np.sqrt(m) + np.sqrt(active.sum() * n))
  lam_sparse = opts["threshold_ratio"] * scale * active.astype(np.float32)
  _, sparse, steps = solve_decomposition(x_n, lam_low_rank, lam_sparse, opts)
  sparse_norms = np.sqrt(np.sum(sparse**2, (1, 2)))
  convex_benign = active & (sparse_norms == 0)
  start = convex_benign if convex_benign.sum() >= h else smallest_mask(sparse_norms, active, h)
  convex = concentrate(x_n, active, start, rank, opts, own_tail)
  split = robust if better_split(robust, convex) else convex   # ties -> robust, as in JAX
  contaminated = ~(split.benign & active)
  u = split.subspace
  coefficients = np.einsum("mr,kmn->krn", u, x, optimize=True)
  projected = np.einsum("mr,krn->kmn", u, coefficients, optimize=True)
  refined = np.where(contaminated[:, None, None], updates, projected)
  return ReferenceResult(contaminated, u, refined, steps)
