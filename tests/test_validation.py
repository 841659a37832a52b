"""Bad input is rejected at the boundary with the shapes named; NaN clients become flags."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clair_jax
from problems import make_problem


@pytest.mark.parametrize(
    "updates, rank, message",
    [
        (np.zeros((5, 4)), 1, r"ndim=2, shape=\(5, 4\)"),
        (np.zeros((2, 4, 3, 1)), 1, r"ndim=4"),
        (np.ones((2, 4, 3)), 1, r"at least 3 clients to tell a majority; got K=2 \(updates.shape=\(2, 4, 3\)\)"),
        (np.ones((4, 6, 3), np.int32), 1, r"floating dtype.*int32.*\(4, 6, 3\)"),
        (np.ones((4, 6, 3)), 0, r"1 <= rank <= min\(m, K\*n\) = min\(6, 4\*3\) = 6; got rank=0"),
        (np.ones((4, 6, 3)), 7, r"got rank=7 for updates.shape=\(4, 6, 3\)"),
        (np.ones((4, 6, 3)), 2.5, r"rank must be an int"),
    ],
)
def test_bad_input_names_shapes(updates, rank, message):
  with pytest.raises(ValueError, match=message):
    clair_jax.clair(updates, rank)


def test_bad_options_and_weights():
  updates = np.ones((4, 6, 3), np.float32)
  with pytest.raises(ValueError, match="side must be"):
    clair_jax.clair(updates, 1, side="middle")
  with pytest.raises(ValueError, match=r"client_weights must have shape \(K,\) = \(4,\)"):
    clair_jax.clair(updates, 1, client_weights=np.ones(3))
  with pytest.raises(ValueError, match="lam_sparse must be positive"):
    clair_jax.clair(updates, 1, lam_sparse=-1.0)


def test_all_nonfinite_is_a_clear_error():
  updates = np.full((4, 6, 3), np.nan, np.float32)
  updates[1] = np.inf
  with pytest.raises(ValueError, match="all 4 client updates contain NaN or Inf"):
    clair_jax.clair(updates, 1)


# K = 21 with one client dropped is K = 20 at the default 48 x 12, rank 3: the shape
# test_estimator compiles; K = 21 is one of the property test's shapes below.
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_client_is_flagged_and_excluded(bad_value):
  problem = make_problem(num_clients=21, fraction=0.2, noise=0.02, rank=3, seed=3)
  drop = int(np.flatnonzero(~problem.contaminated)[0])
  poisoned = np.array(problem.updates)
  poisoned[drop, 2, 1] = bad_value
  with_bad = clair_jax.clair(poisoned, 3)
  keep = np.arange(21) != drop
  without = clair_jax.clair(problem.updates[keep], 3)
  assert bool(with_bad.contaminated[drop]) and np.isinf(float(with_bad.scores[drop]))
  np.testing.assert_array_equal(with_bad.contaminated[keep], without.contaminated)
  np.testing.assert_allclose(with_bad.scores[keep], without.scores, rtol=1e-4)
  np.testing.assert_allclose(np.abs(with_bad.subspace.T @ without.subspace), np.eye(3), atol=1e-4)
  np.testing.assert_allclose(with_bad.refined[keep], without.refined, atol=1e-5)
  np.testing.assert_allclose(float(with_bad.noise_level), float(without.noise_level), rtol=1e-4)
  assert int(with_bad.status) == 0


# A few shapes (each compiles once), many scales and NaN patterns (no recompilation):
# the smallest possible (m = 5, n = 1, rank 1), a small one with n = rank, and the
# nonfinite test's K = 21 at 48 x 12, rank 3 (compiled there already).
SHAPES = [(4, 5, 1, 1), (21, 48, 12, 3), (6, 7, 2, 2)]


@pytest.mark.slow   # two more programs (the small shapes); the nonfinite tests above and the
# huge-client test below keep NaN/Inf handling in the default path
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(SHAPES),
    log_scale=st.floats(-6, 6),
    nan_clients=st.sets(st.integers(0, 8), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_no_crash_benign_outputs_finite(shape, log_scale, nan_clients, seed):
  num_clients, m, n, rank = shape
  rng = np.random.default_rng(seed)
  updates = (rng.normal(size=(num_clients, m, n)) * 10.0**log_scale).astype(np.float32)
  nan_clients = sorted(c for c in nan_clients if c < num_clients - 1)  # keep one finite
  updates[nan_clients] = np.nan
  result = clair_jax.clair(updates, rank)
  contaminated = np.asarray(result.contaminated)
  assert contaminated[nan_clients].all()
  benign = ~contaminated
  assert benign.any()
  assert np.isfinite(np.asarray(result.refined)[benign]).all()
  assert np.isfinite(np.asarray(result.scores)[benign]).all()
  assert np.isfinite(np.asarray(result.subspace)).all()
  np.testing.assert_allclose(result.subspace.T @ result.subspace, np.eye(rank), atol=1e-3)
  assert np.isfinite(float(result.noise_level))


def test_huge_finite_client_is_flagged_without_spoiling_the_others():
  """A client at 1e30 (finite, but its squared norm overflows float32) is just flagged."""
  problem = make_problem(noise=0.01, rank=3, seed=3)   # the default 20 x 48 x 12
  updates = np.array(problem.updates)
  updates[0] = 1e30 * np.sign(updates[0] + 1e-12)
  result = clair_jax.clair(jnp.asarray(updates), 3)
  assert bool(result.contaminated[0])
  np.testing.assert_array_equal(result.contaminated[1:], problem.contaminated[1:])
  assert np.all(np.isfinite(np.asarray(result.refined)[1:]))
  assert np.all(np.isfinite(np.asarray(result.subspace)))
