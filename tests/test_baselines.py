"""Each baseline against a small NumPy reference, plus non-finite handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import baselines
from clair_jax import synthetic

K, M, N = 9, 6, 3


def _updates(seed=0, num_clients=K):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, M, N))
  x[:2] += 8.0 * rng.normal(size=(2, M, N))  # two outliers
  return x.astype(np.float32)


def _with_nan(x):
  x = x.copy()
  x[3, 1, 2] = np.nan
  x[5, 0, 0] = np.inf
  return x


def _np_trimmed_mean(x, trim):
  k = x.shape[0]
  b = min(int(np.floor(trim * k)), (k - 1) // 2)
  s = np.sort(x, axis=0)
  return s[b : k - b].mean(axis=0)


def _np_krum_scores(x, f):
  k = x.shape[0]
  flat = x.reshape(k, -1).astype(np.float64)
  d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
  nn = max(k - f - 2, 1)
  return np.array([np.sort(np.delete(d[i], i))[:nn].sum() for i in range(k)])


def _np_weiszfeld(x, nu=1e-6, iters=2000):
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  z = flat.mean(0)
  for _ in range(iters):
    w = 1.0 / np.maximum(np.linalg.norm(flat - z, axis=1), nu)
    z = (w[:, None] * flat).sum(0) / w.sum()
  return z.reshape(x.shape[1:])


def test_local_is_identity():
  x = _updates()
  res = baselines.local(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(res.estimates), x)
  assert np.asarray(res.selected).all()


def test_fedavg_matches_numpy_mean_and_propagates_nan():
  x = _updates()
  res = baselines.fedavg(jnp.asarray(x))
  for k in range(K):
    np.testing.assert_allclose(np.asarray(res.estimates[k]), x.mean(0), rtol=1e-5, atol=1e-5)
  bad = baselines.fedavg(jnp.asarray(_with_nan(x)))
  # the bad coordinates of the aggregate are non-finite for every client
  assert not np.isfinite(np.asarray(bad.estimates)).all(axis=(1, 2)).any()


@pytest.mark.parametrize("num_clients", [K, K - 1])  # odd and even client counts
def test_coordinate_median_matches_numpy(num_clients):
  x = _updates(1, num_clients)
  res = baselines.coordinate_median(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(res.estimates[0]), np.median(x, 0), rtol=1e-6, atol=1e-6)


def test_coordinate_median_drops_nonfinite_clients():
  x = _with_nan(_updates(2))
  res = baselines.coordinate_median(jnp.asarray(x))
  finite = np.isfinite(x).all(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(res.estimates[4]), np.median(x[finite], 0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(res.selected), finite)


@pytest.mark.parametrize("trim", [0.0, 0.1, 0.25, 0.45])
def test_trimmed_mean_matches_numpy(trim):
  x = _updates(3)
  res = baselines.trimmed_mean(jnp.asarray(x), trim)
  np.testing.assert_allclose(
      np.asarray(res.estimates[0]), _np_trimmed_mean(x, trim), rtol=1e-5, atol=1e-5
  )


def test_trimmed_mean_drops_nonfinite_clients():
  x = _with_nan(_updates(4))
  finite = np.isfinite(x).all(axis=(1, 2))
  res = baselines.trimmed_mean(jnp.asarray(x), 0.2)
  np.testing.assert_allclose(
      np.asarray(res.estimates[0]), _np_trimmed_mean(x[finite], 0.2), rtol=1e-5, atol=1e-5
  )


def test_trimmed_mean_rejects_bad_trim():
  with pytest.raises(ValueError, match="trim"):
    baselines.trimmed_mean(jnp.zeros((3, 2, 2)), 0.5)


@pytest.mark.parametrize("f", [0, 2, 3])
def test_krum_scores_and_selection_match_numpy(f):
  x = _updates(5)
  scores = np.asarray(baselines.krum_scores(jnp.asarray(x), f))
  ref = _np_krum_scores(x, f)
  np.testing.assert_allclose(scores, ref, rtol=1e-4)
  res = baselines.krum(jnp.asarray(x), f)
  best = int(np.argmin(ref))
  np.testing.assert_array_equal(np.asarray(res.selected), np.arange(K) == best)
  np.testing.assert_allclose(np.asarray(res.estimates[3]), x[best], rtol=1e-6)
  multi = baselines.multi_krum(jnp.asarray(x), f)
  chosen = np.argsort(ref)[: K - f]
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(multi.selected)), np.sort(chosen))
  np.testing.assert_allclose(
      np.asarray(multi.estimates[0]), x[chosen].mean(0), rtol=1e-5, atol=1e-5
  )


def test_multi_krum_rejects_outliers_and_nonfinite():
  x = _with_nan(_updates(6))
  res = baselines.multi_krum(jnp.asarray(x), 4)
  sel = np.asarray(res.selected)
  assert not sel[[0, 1, 3, 5]].any()  # two outliers, two non-finite
  assert np.isfinite(np.asarray(res.estimates)).all()
  finite = np.isfinite(x).all(axis=(1, 2))
  scores = np.asarray(baselines.krum_scores(jnp.asarray(x), 4))
  np.testing.assert_allclose(scores[finite], _np_krum_scores(x[finite], 4), rtol=1e-4)
  assert np.isinf(scores[~finite]).all()


def test_geometric_median_matches_numpy_weiszfeld():
  x = _updates(7)
  res = baselines.geometric_median(jnp.asarray(x), max_iters=2000, tol=0.0)
  np.testing.assert_allclose(np.asarray(res.estimates[0]), _np_weiszfeld(x), rtol=1e-3, atol=1e-3)
  # first-order optimality: the unit vectors towards the clients sum to ~0
  z = np.asarray(res.estimates[0]).reshape(-1).astype(np.float64)
  flat = x.reshape(K, -1)
  g = ((z - flat) / np.linalg.norm(z - flat, axis=1, keepdims=True)).sum(0)
  assert np.linalg.norm(g) < 1e-2 * K


def test_geometric_median_drops_nonfinite_clients():
  x = _with_nan(_updates(8))
  finite = np.isfinite(x).all(axis=(1, 2))
  res = baselines.geometric_median(jnp.asarray(x), max_iters=2000, tol=0.0)
  np.testing.assert_allclose(
      np.asarray(res.estimates[2]), _np_weiszfeld(x[finite]), rtol=1e-3, atol=1e-3
  )
  np.testing.assert_array_equal(np.asarray(res.selected), finite)


def test_oracle_matches_numpy_projection_and_keeps_attackers():
  p = synthetic.make_problem(
      jax.random.key(0), num_clients=10, m=12, n=3, rank=2, fraction=0.3, attack="nonfinite"
  )
  benign = ~p.contaminated
  res = baselines.oracle(p.updates, benign, 2)
  x = np.asarray(p.updates, np.float64)
  b = np.asarray(benign)
  stacked = np.concatenate(list(x[b]), axis=1)
  u = np.linalg.svd(stacked)[0][:, :2]
  ref = np.einsum("mr,pr,kpn->kmn", u, u, x[b])
  np.testing.assert_allclose(np.asarray(res.estimates)[b], ref, rtol=1e-4, atol=1e-4)
  attackers = np.asarray(res.estimates)[~b]
  np.testing.assert_array_equal(np.isnan(attackers), np.isnan(x[~b]))
  np.testing.assert_array_equal(np.asarray(res.selected), b)


def test_baselines_jit_and_reject_bad_shapes():
  x = jnp.asarray(_updates(9))
  jitted = jax.jit(baselines.multi_krum, static_argnums=(2,))
  np.testing.assert_allclose(
      np.asarray(jitted(x, 2, None).estimates), np.asarray(baselines.multi_krum(x, 2).estimates),
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match=r"\(K, m, n\)"):
    baselines.fedavg(jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match="benign_mask"):
    baselines.oracle(x, jnp.ones((K + 1,), bool), 2)
