"""Metrics against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import metrics
from clair_jax import synthetic


def _basis(seed, m, r):
  return np.linalg.qr(np.random.default_rng(seed).normal(size=(m, r)))[0]


def test_subspace_error_matches_principal_angles():
  u, v = _basis(0, 10, 3), _basis(1, 10, 3)
  cos = np.clip(np.linalg.svd(u.T @ v, compute_uv=False), 0, 1)
  sines = np.sqrt(1 - cos**2)
  spec = metrics.subspace_error(jnp.asarray(v), jnp.asarray(u))
  frob = metrics.subspace_error(jnp.asarray(v), jnp.asarray(u), norm="frobenius")
  np.testing.assert_allclose(float(spec), sines.max(), rtol=1e-5)
  np.testing.assert_allclose(float(frob), np.sqrt((sines**2).sum()), rtol=1e-5)


def test_subspace_error_is_rotation_invariant_and_zero_on_same_span():
  u = _basis(2, 8, 2)
  rot = _basis(3, 2, 2)
  assert float(metrics.subspace_error(jnp.asarray(u @ rot), jnp.asarray(u))) < 1e-5


def test_subspace_error_accurate_for_small_angles():
  u = jnp.asarray(_basis(4, 16, 2), jnp.float32)
  for s in (1e-4, 0.3):
    v = synthetic.subspace_at_angle(jax.random.key(0), u, s)
    np.testing.assert_allclose(float(metrics.subspace_error(v, u)), s, rtol=1e-2)


def test_subspace_error_bad_input():
  with pytest.raises(ValueError, match="norm"):
    metrics.subspace_error(jnp.eye(3)[:, :1], jnp.eye(3)[:, :1], norm="nuclear")
  with pytest.raises(ValueError, match=r"\(4, 1\)"):
    metrics.subspace_error(jnp.ones((4, 1)), jnp.ones((3, 1)))


def test_detection_metrics_counts():
  truth = jnp.array([1, 1, 1, 0, 0, 0, 0], bool)
  pred = jnp.array([1, 1, 0, 1, 0, 0, 0], bool)
  d = metrics.detection_metrics(pred, truth)
  np.testing.assert_allclose(float(d.precision), 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(d.recall), 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(float(d.f1), 2 / 3, rtol=1e-6)
  assert float(d.exact) == 0.0
  assert float(metrics.detection_metrics(truth, truth).exact) == 1.0


def test_detection_metrics_empty_sets():
  none = jnp.zeros(5, bool)
  some = jnp.array([1, 0, 0, 0, 0], bool)
  d = metrics.detection_metrics(none, none)
  assert (float(d.precision), float(d.recall), float(d.f1), float(d.exact)) == (1, 1, 1, 1)
  d = metrics.detection_metrics(none, some)  # missed the only attacker
  assert (float(d.precision), float(d.recall), float(d.f1)) == (1, 0, 0)
  d = metrics.detection_metrics(some, none)  # false alarm
  assert (float(d.precision), float(d.recall), float(d.f1)) == (0, 1, 0)


def test_benign_error_matches_numpy_and_ranks_nan_last():
  rng = np.random.default_rng(0)
  est = rng.normal(size=(5, 3, 2)).astype(np.float32)
  tru = rng.normal(size=(5, 3, 2)).astype(np.float32)
  mask = np.array([1, 0, 1, 1, 0], bool)
  ref = ((est - tru) ** 2).sum(axis=(1, 2))[mask].mean()
  got = metrics.benign_error(jnp.asarray(est), jnp.asarray(tru), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  est[1] = np.nan  # a NaN on a contaminated client does not matter
  got = metrics.benign_error(jnp.asarray(est), jnp.asarray(tru), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  est[2, 0, 0] = np.nan  # on a benign client it ranks the method last
  got = metrics.benign_error(jnp.asarray(est), jnp.asarray(tru), jnp.asarray(mask))
  assert float(got) == np.inf
  with pytest.raises(ValueError, match="benign_mask"):
    metrics.benign_error(jnp.asarray(est), jnp.asarray(tru), jnp.ones(4, bool))
