"""Ground-truth problems for the core tests (small on purpose: the suite runs on 2 cores)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Problem(NamedTuple):
  updates: np.ndarray       # (K, m, n) what clients send
  truth: np.ndarray         # (K, m, n) Delta_k (benign part)
  basis: np.ndarray         # (m, r) shared subspace
  contaminated: np.ndarray  # (K,) bool


def orthonormal(rng, m, r):
  return np.linalg.qr(rng.normal(size=(m, r)))[0]


def make_problem(num_clients=20, m=48, n=12, rank=3, fraction=0.25, attack="random",
                 noise=0.0, attack_scale=1.0, seed=0, dtype=np.float32) -> Problem:
  """Benign ``D_k = U W_k + E_k``; contaminated clients per ``attack``.

  ``attack="random"``: dense Gaussian blocks of benign-like norm times ``attack_scale``.
  ``attack="coherent"``: the group shares its own rank-``rank`` subspace.
  """
  rng = np.random.default_rng(seed)
  basis = orthonormal(rng, m, rank)
  coefficients = rng.normal(size=(num_clients, rank, n))
  truth = np.einsum("mr,krn->kmn", basis, coefficients)
  updates = truth + noise * rng.normal(size=truth.shape)
  bad = np.zeros(num_clients, bool)
  bad[rng.permutation(num_clients)[: int(round(fraction * num_clients))]] = True
  typical = np.median(np.linalg.norm(truth, axis=(1, 2)))
  if attack == "random":
    attack_updates = rng.normal(size=(num_clients, m, n)) * typical / np.sqrt(m * n)
  elif attack == "coherent":
    other = orthonormal(rng, m, rank)
    attack_updates = np.einsum("mr,krn->kmn", other, rng.normal(size=(num_clients, rank, n)))
    attack_updates += noise * rng.normal(size=attack_updates.shape)
  else:
    raise ValueError(attack)
  updates[bad] = attack_scale * attack_updates[bad]
  truth = np.where(bad[:, None, None], 0.0, truth)
  return Problem(updates.astype(dtype), truth, basis, bad)


def sin_theta(estimate, basis) -> float:
  """Spectral ``||sin Theta||_2 = ||(I - P_U) U_hat||_2`` between two orthonormal bases."""
  estimate = np.asarray(estimate, np.float64)
  return float(np.linalg.norm(estimate - basis @ (basis.T @ estimate), 2))


def benign_error(estimates, problem: Problem) -> float:
  good = ~problem.contaminated
  diff = np.asarray(estimates, np.float64)[good] - problem.truth[good]
  return float(np.mean(np.sum(diff**2, axis=(1, 2))))
