"""Detection against the Byzantine-robust FL literature's attacks (issue 12).

The attackers here are built inline from the benign clients' statistics (an independent
construction from :mod:`clair_jax.attacks`): ALIE's ``mean - z std`` sent by every
attacker, with and without small independent perturbations, and a shared off-subspace
tilt at about a benign client's noise norm.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax
from clair_jax import baselines, metrics, synthetic
from clair_jax._src import detect
from clair_jax._src import robust
from problems import make_problem

K, M, N, R = 40, 64, 16, 4


def _problem(seed, fraction):
  import jax
  p = synthetic.make_problem(jax.random.key(seed), num_clients=K, m=M, n=N, rank=R,
                             fraction=fraction, attack="random", noise=1.0,
                             heterogeneity=0.2)
  return p, np.array(p.updates, np.float64), np.array(p.contaminated)


def _ratio_to_oracle(updates, p, bad):
  result = clair_jax.clair(jnp.asarray(updates, jnp.float32), R)
  benign = jnp.asarray(~bad)
  oracle = baselines.oracle(jnp.asarray(updates, jnp.float32), benign, R)
  ratio = float(metrics.benign_error(result.refined, p.truth, benign)
                / metrics.benign_error(oracle.estimates, p.truth, benign))
  return result, ratio


@pytest.mark.parametrize("fraction", [0.3, 0.4])
@pytest.mark.parametrize("perturbation", [0.0, 0.4])
def test_alie_group_does_not_take_over(fraction, perturbation):
  """ALIE (z = 0.755-ish from the paper's formula) by a 30-40% group, identical or with
  independent perturbations of 0.4 sigma: flagged, benign error at the oracle's."""
  from scipy.stats import norm
  p, x, bad = _problem(0, fraction)
  f = int(bad.sum())
  z = norm.ppf((K - (K // 2 + 1 - f)) / K)
  vector = x[~bad].mean(0) - z * x[~bad].std(0, ddof=1)
  rng = np.random.default_rng(1)
  x[bad] = vector + perturbation * rng.standard_normal((f, M, N))
  result, ratio = _ratio_to_oracle(x, p, bad)
  np.testing.assert_array_equal(result.contaminated, bad)
  assert ratio < 1.01
  assert abs(float(result.noise_level) - 1.0) < 0.05  # the group did not set the noise


@pytest.mark.parametrize("fraction", [0.2, 0.4])
def test_shared_tilt_at_the_noise_norm_is_flagged(fraction):
  p, x, bad = _problem(1, fraction)
  rng = np.random.default_rng(2)
  basis = np.linalg.svd(x[~bad].transpose(1, 0, 2).reshape(M, -1), full_matrices=False)[0][:, :R]
  tilt = rng.standard_normal((M, N))
  tilt -= basis @ (basis.T @ tilt)
  x[bad] += np.sqrt(M * N) * tilt / np.linalg.norm(tilt)  # a benign noise norm, sigma = 1
  result, ratio = _ratio_to_oracle(x, p, bad)
  np.testing.assert_array_equal(result.contaminated, bad)
  assert ratio < 1.01


def test_duplicate_weights_count_a_group_as_one():
  p, x, bad = _problem(2, 0.3)
  x[bad] = x[~bad].mean(0)
  x[np.flatnonzero(bad)[0]] += 1e-3  # near, not exact
  xn = jnp.asarray(x / np.median(np.linalg.norm(x, axis=(1, 2))), jnp.float32)
  spectra = detect.client_spectra(xn, R)
  clients = detect.prepare_clients(clair_jax.to_columns(xn), jnp.ones(K, bool), spectra, R)
  weights = np.asarray(clients.weights)
  np.testing.assert_allclose(weights[bad], 1.0 / bad.sum(), rtol=1e-6)
  np.testing.assert_array_equal(weights[~bad], 1.0)


def test_weighted_statistics_reduce_to_the_unweighted_ones():
  rng = np.random.default_rng(3)
  for size in (1, 2, 7, 10):
    values = jnp.asarray(rng.standard_normal(size), jnp.float32)
    mask = jnp.asarray(rng.random(size) < 0.7).at[0].set(True)
    ones = mask.astype(jnp.float32)
    np.testing.assert_allclose(robust.weighted_median(values, ones),
                               robust.masked_median(values, mask), rtol=1e-6)
    count = jnp.sum(mask) // 2 + 1
    np.testing.assert_allclose(detect.weighted_smallest_sum(values, ones, count),
                               detect.smallest_sum(values, mask, count), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(detect.weighted_smallest_mask(values, ones, count),
                                  detect.smallest_mask(values, mask, count))
  # weight moves the median toward a heavy client; zero weight leaves a client out
  heavy = float(robust.weighted_median(jnp.array([0.0, 1.0, 5.0]), jnp.array([1.0, 1.0, 3.0])))
  assert 1.0 < heavy <= 5.0
  assert float(robust.weighted_median(jnp.array([0.0, 1.0, 5.0]), jnp.array([1.0, 1.0, 0.0]))) == 0.5


def test_sampling_floors_follow_the_degrees_of_freedom():
  residual, structure = detect.sampling_floors(64, 16, 4)
  assert 1.05 < residual < structure < 1.2
  small = detect.sampling_floors(16, 4, 2)
  assert 1.4 < small[0] < small[1]
  # a user's threshold_ratio replaces both floors (on the default 20 x 48 x 12, rank 3
  # problem of tests/problems.py with these options: the program test_estimator compiles)
  problem = make_problem(fraction=0.2, noise=0.05, rank=3, seed=4)
  result = clair_jax.clair(problem.updates, 3, threshold_ratio=50.0, mad_multiplier=0.0)
  np.testing.assert_allclose(result.thresholds, [50.0, 50.0], rtol=1e-6)
