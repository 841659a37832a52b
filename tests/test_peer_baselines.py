"""Peer defences (NNM, centered clipping, bucketing) and the classical rules against Flower.

Each peer rule is checked against its defining property and a small NumPy reference; the
classical rules (median, trimmed mean, Krum, Multi-Krum) against Flower's NumPy
implementations, when ``flwr`` is installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import baselines

K, M, N = 10, 5, 3


def _cluster(seed=0, num_clients=K, num_outliers=2, scale=50.0):
  """Benign clients around a common centre, the first ``num_outliers`` far away."""
  rng = np.random.default_rng(seed)
  centre = rng.normal(size=(M, N))
  x = centre + 0.5 * rng.normal(size=(num_clients, M, N))
  x[:num_outliers] += scale * (1.0 + rng.random(size=(num_outliers, 1, 1)))
  return x.astype(np.float32)


def _with_nonfinite(x):
  x = x.copy()
  x[3, 1, 2] = np.nan
  x[6, 0, 0] = -np.inf
  return x


def _finite(x):
  return np.isfinite(x).all(axis=(1, 2))


# ---------------------------------------------------------------- NumPy references


def _np_nnm(x, f):
  """Brute-force NNM over the finite clients (Allouah et al. 2023)."""
  keep = _finite(x)
  idx = np.flatnonzero(keep)
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  neighbours = max(min(x.shape[0] - f, len(idx)), 1)
  out = x.astype(np.float64).copy()
  for k in idx:
    d = ((flat[idx] - flat[k]) ** 2).sum(1)
    d[idx == k] = -1.0
    chosen = idx[np.argsort(d, kind="stable")[:neighbours]]
    out[k] = flat[chosen].mean(0).reshape(x.shape[1:])
  return out


def _np_trimmed_mean_count(x, cut):
  cut = min(cut, (x.shape[0] - 1) // 2)
  s = np.sort(x, axis=0)
  return s[cut : x.shape[0] - cut].mean(0)


def _np_centered_clipping(x, radius, iters, start):
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  v = start.reshape(-1).astype(np.float64)
  for _ in range(iters):
    diff = flat - v
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    scale = np.minimum(1.0, radius / np.maximum(norm, 1e-300))
    v = v + (scale * diff).mean(0)
  return v.reshape(x.shape[1:])


# ---------------------------------------------------------------- NNM


def test_nnm_with_no_byzantine_gives_every_client_the_mean():
  x = _cluster(1)
  mixed = np.asarray(baselines.nnm(jnp.asarray(x), 0))
  np.testing.assert_allclose(mixed, np.broadcast_to(x.mean(0), x.shape), rtol=1e-5, atol=1e-5)


def test_nnm_matches_numpy_and_pulls_outliers_to_the_benign_cluster():
  x = _cluster(2)
  f = 2
  mixed = np.asarray(baselines.nnm(jnp.asarray(x), f))
  np.testing.assert_allclose(mixed, _np_nnm(x, f), rtol=1e-5, atol=1e-4)
  benign_mean = x[f:].mean(0)
  # each benign client's K - f nearest neighbours are exactly the K - f benign clients
  np.testing.assert_allclose(mixed[f:], np.broadcast_to(benign_mean, mixed[f:].shape),
                             rtol=1e-5, atol=1e-5)
  # an outlier's mix holds at most f of the K - f points far away: pulled most of the way in
  for k in range(f):
    before = np.linalg.norm(x[k] - benign_mean)
    after = np.linalg.norm(mixed[k] - benign_mean)
    assert after <= (f / (K - f)) * before * 1.1


def test_nnm_trimmed_mean_matches_numpy_and_ignores_outliers():
  x = _cluster(3, num_outliers=3)
  f = 3
  res = baselines.nnm_trimmed_mean(jnp.asarray(x), f)
  ref = _np_trimmed_mean_count(_np_nnm(x, f), f)
  np.testing.assert_allclose(np.asarray(res.estimates[4]), ref, rtol=1e-5, atol=1e-4)
  assert np.asarray(res.selected).all()
  assert np.linalg.norm(np.asarray(res.estimates[0]) - x[f:].mean(0)) < 0.5


def test_nnm_nonfinite_clients_never_reach_outputs():
  x = _with_nonfinite(_cluster(4))
  keep = _finite(x)
  mixed = np.asarray(baselines.nnm(jnp.asarray(x), 0))
  # f = 0: every finite client gets the mean of the finite ones; the others come back as sent
  np.testing.assert_allclose(mixed[keep], np.broadcast_to(x[keep].mean(0), mixed[keep].shape),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.isnan(mixed[~keep]), np.isnan(x[~keep]))
  np.testing.assert_allclose(np.asarray(baselines.nnm(jnp.asarray(x), 2)), _np_nnm(x, 2),
                             rtol=1e-5, atol=1e-4)
  res = baselines.nnm_trimmed_mean(jnp.asarray(x), 2)
  assert np.isfinite(np.asarray(res.estimates)).all()
  np.testing.assert_array_equal(np.asarray(res.selected), keep)
  np.testing.assert_allclose(np.asarray(res.estimates[0]),
                             _np_trimmed_mean_count(_np_nnm(x, 2)[keep], 2), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- centered clipping


def test_centered_clipping_with_infinite_radius_is_the_mean():
  x = _cluster(5)
  for start in (None, np.full((M, N), 7.0, np.float32)):
    res = baselines.centered_clipping(jnp.asarray(x), radius=np.inf, num_iters=1, start=start)
    np.testing.assert_allclose(np.asarray(res.estimates[2]), x.mean(0), rtol=1e-5, atol=1e-4)


def test_centered_clipping_matches_numpy_and_default_radius_is_median_distance():
  x = _cluster(6)
  start = np.median(x, axis=0)
  radius = float(np.median(np.linalg.norm((x - start).reshape(K, -1), axis=1)))
  ref = _np_centered_clipping(x, radius, 3, start)
  default = baselines.centered_clipping(jnp.asarray(x))
  explicit = baselines.centered_clipping(jnp.asarray(x), radius=radius, num_iters=3,
                                         start=jnp.asarray(start))
  np.testing.assert_allclose(np.asarray(default.estimates[0]), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(explicit.estimates[0]), ref, rtol=1e-4, atol=1e-4)


def test_centered_clipping_one_huge_outlier_stays_near_the_benign_mean():
  x = _cluster(7, num_outliers=0)
  benign_mean = x[1:].mean(0)
  x[0] = 1e30  # norm overflows float32 if squared naively
  res = baselines.centered_clipping(jnp.asarray(x))
  out = np.asarray(res.estimates[0])
  assert np.isfinite(out).all()
  spread = np.median(np.linalg.norm((x[1:] - benign_mean).reshape(K - 1, -1), axis=1))
  assert np.linalg.norm(out - benign_mean) < 0.5 * spread


def test_centered_clipping_drops_nonfinite_clients():
  x = _with_nonfinite(_cluster(8))
  keep = _finite(x)
  res = baselines.centered_clipping(jnp.asarray(x))
  alone = baselines.centered_clipping(jnp.asarray(x[keep]))
  np.testing.assert_allclose(np.asarray(res.estimates[0]), np.asarray(alone.estimates[0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(res.selected), keep)


# ---------------------------------------------------------------- bucketing


@pytest.mark.parametrize("aggregator", baselines.BUCKETING_AGGREGATORS)
def test_bucketing_with_bucket_size_one_is_the_aggregator_on_a_permutation(aggregator):
  x = _cluster(9)
  key = jax.random.key(3)
  perm = np.asarray(jax.random.permutation(key, K))
  res = baselines.bucketing(jnp.asarray(x), key=key, bucket_size=1, aggregator=aggregator,
                            num_byzantine=2)
  rules = {
      "median": baselines.coordinate_median,
      "trimmed_mean": lambda u: baselines.trimmed_mean(u, 0.2),  # 2 of 10 at each end
      "krum": lambda u: baselines.krum(u, 2),
      "multi_krum": lambda u: baselines.multi_krum(u, 2),
      "geometric_median": baselines.geometric_median,
      "centered_clipping": baselines.centered_clipping,
  }
  ref = rules[aggregator](jnp.asarray(x[perm]))
  np.testing.assert_allclose(np.asarray(res.estimates[0]), np.asarray(ref.estimates[0]),
                             rtol=1e-5, atol=1e-5)
  selected = np.zeros(K, bool)
  selected[perm] = np.asarray(ref.selected)
  np.testing.assert_array_equal(np.asarray(res.selected), selected)


@pytest.mark.parametrize("bucket_size", [2, 3])  # 3 does not divide K: a smaller last bucket
def test_bucketing_averages_random_buckets(bucket_size):
  x = _cluster(10)
  key = jax.random.key(4)
  perm = np.asarray(jax.random.permutation(key, K))
  means = np.stack([x[perm[i : i + bucket_size]].mean(0) for i in range(0, K, bucket_size)])
  res = baselines.bucketing(jnp.asarray(x), key=key, bucket_size=bucket_size,
                            aggregator="median")
  np.testing.assert_allclose(np.asarray(res.estimates[0]), np.median(means, 0),
                             rtol=1e-5, atol=1e-5)
  krum = baselines.bucketing(jnp.asarray(x), key=key, bucket_size=bucket_size,
                             aggregator="krum", num_byzantine=1)
  best = int(np.argmin([  # Krum on the bucket means, by hand
      np.sort(((means - b) ** 2).sum((1, 2)))[1 : max(len(means) - 1 - 2, 1) + 1].sum()
      for b in means
  ]))
  np.testing.assert_allclose(np.asarray(krum.estimates[0]), means[best], rtol=1e-5, atol=1e-5)
  members = perm[best * bucket_size : (best + 1) * bucket_size]
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(krum.selected)), np.sort(members))


@pytest.mark.parametrize("aggregator", baselines.BUCKETING_AGGREGATORS)
def test_bucketing_nonfinite_clients_never_reach_outputs(aggregator):
  x = _with_nonfinite(_cluster(11))
  x[8] = np.nan  # three non-finite clients: with s = 2 at least one bucket is empty
  keep = _finite(x)
  res = baselines.bucketing(jnp.asarray(x), key=jax.random.key(5), bucket_size=2,
                            aggregator=aggregator, num_byzantine=2)
  assert np.isfinite(np.asarray(res.estimates)).all()
  assert not np.asarray(res.selected)[~keep].any()


def test_krum_with_a_single_finite_client_selects_it():
  x = np.ones((3, M, N), np.float32)
  x[0] = np.nan
  x[2, 0, 0] = np.inf
  for rule in (baselines.krum, baselines.multi_krum):
    res = rule(jnp.asarray(x), 0)
    np.testing.assert_array_equal(np.asarray(res.selected), [False, True, False])
    np.testing.assert_array_equal(np.asarray(res.estimates), np.ones_like(x))


# ---------------------------------------------------------------- jit and parameters


def test_peer_rules_jit_with_traced_parameters():
  x = jnp.asarray(_with_nonfinite(_cluster(12)))
  key = jax.random.key(6)
  cases = [
      (lambda u, f: baselines.nnm(u, f), (x, 2), baselines.nnm(x, 2)),
      (lambda u, f: baselines.nnm_trimmed_mean(u, f).estimates, (x, 2),
       baselines.nnm_trimmed_mean(x, 2).estimates),
      (lambda u, r: baselines.centered_clipping(u, radius=r).estimates, (x, 1.5),
       baselines.centered_clipping(x, radius=1.5).estimates),
      (lambda u, k: baselines.bucketing(u, key=k, aggregator="trimmed_mean",
                                        num_byzantine=1).estimates, (x, key),
       baselines.bucketing(x, key=key, aggregator="trimmed_mean", num_byzantine=1).estimates),
  ]
  for fn, args, eager in cases:
    jitted = jax.jit(fn)
    np.testing.assert_allclose(np.asarray(jitted(*args)), np.asarray(eager), rtol=1e-5,
                               atol=1e-5)
    jitted(*args)
    assert jitted._cache_size() == 1  # a second call does not recompile


@pytest.mark.parametrize("f", [-1, 5, 7, 1.5])
def test_nnm_rejects_bad_num_byzantine(f):
  x = jnp.zeros((K, M, N))
  with pytest.raises(ValueError, match="num_byzantine"):
    baselines.nnm(x, f)
  with pytest.raises(ValueError, match="num_byzantine"):
    baselines.nnm_trimmed_mean(x, f)
  with pytest.raises(ValueError, match="num_byzantine"):
    baselines.bucketing(x, key=jax.random.key(0), aggregator="krum", num_byzantine=f)


def test_peer_rules_reject_bad_parameters():
  x = jnp.zeros((K, M, N))
  key = jax.random.key(0)
  for radius in (0.0, -1.0, np.nan):
    with pytest.raises(ValueError, match="radius"):
      baselines.centered_clipping(x, radius=radius)
  for iters in (0, 1.5):
    with pytest.raises(ValueError, match="num_iters"):
      baselines.centered_clipping(x, num_iters=iters)
  with pytest.raises(ValueError, match="start"):
    baselines.centered_clipping(x, start=jnp.zeros((N, M)))
  for size in (0, 1.5):
    with pytest.raises(ValueError, match="bucket_size"):
      baselines.bucketing(x, key=key, bucket_size=size)
  with pytest.raises(ValueError, match="aggregator"):
    baselines.bucketing(x, key=key, aggregator="mean")
  for rule in ("trimmed_mean", "krum", "multi_krum"):
    with pytest.raises(ValueError, match="num_byzantine"):
      baselines.bucketing(x, key=key, aggregator=rule)
  for fn in (lambda u: baselines.nnm(u, 0), baselines.centered_clipping,
             lambda u: baselines.bucketing(u, key=key)):
    with pytest.raises(ValueError, match=r"\(K, m, n\)"):
      fn(jnp.zeros((K, M)))


# ---------------------------------------------------------------- against Flower


def _flower_results(x):
  """Flower's ``results``: one ``(NDArrays, num_examples)`` per client, equal weights."""
  return [([np.asarray(u, np.float64)], 1) for u in x]


def _outlying(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(11, M, N))
  x[:3] += 6.0 * rng.normal(size=(3, M, N))
  return x.astype(np.float32)


def test_classical_rules_match_flower_legacy_aggregate():
  """``flwr.server.strategy.aggregate`` (flwr 1.42; adap/flower
  ``src/py/flwr/server/strategy/aggregate.py``): ``aggregate_median``, ``aggregate_trimmed_avg``
  (scipy's ``trim_mean``: ``int(p * K)`` cut at each end) and ``aggregate_krum`` (score over
  the ``max(1, K - f - 2)`` nearest others; ``to_keep = 0`` is Krum, ``> 0`` Multi-Krum, the
  kept clients averaged by ``num_examples``, equal here)."""
  pytest.importorskip("flwr")
  aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
  for seed in range(2):
    x = _outlying(seed)
    results = _flower_results(x)
    (ref,) = aggregate.aggregate_median(results)
    np.testing.assert_allclose(
        np.asarray(baselines.coordinate_median(jnp.asarray(x)).estimates[0]), ref, rtol=1e-6)
    for p in (0.0, 0.1, 0.25, 0.3, 0.45):
      (ref,) = aggregate.aggregate_trimmed_avg(results, p)
      np.testing.assert_allclose(
          np.asarray(baselines.trimmed_mean(jnp.asarray(x), p).estimates[0]), ref,
          rtol=1e-5, atol=1e-5)
    for f in (0, 1, 3, 5, 9):  # 9: Flower's floor of one neighbour
      (ref,) = aggregate.aggregate_krum(results, f, 0)
      np.testing.assert_allclose(
          np.asarray(baselines.krum(jnp.asarray(x), f).estimates[0]), ref, rtol=1e-6)
      if len(x) - f - 2 <= 1:
        # one neighbour: the score is the symmetric 1-NN distance, so the closest pair ties
        # and Flower's reversed, unstable argsort breaks the tie its own way
        continue
      for keep in (1, 4, len(x) - f):
        (ref,) = aggregate.aggregate_krum(results, f, keep)
        res = baselines.multi_krum(jnp.asarray(x), f, num_selected=keep)
        np.testing.assert_allclose(np.asarray(res.estimates[0]), ref, rtol=1e-5, atol=1e-5)


def test_classical_rules_match_flower_message_api():
  """The Message-API strategies (``flwr.serverapp.strategy``): ``FedTrimmedAvg``'s
  ``trim_mean`` and ``MultiKrum``/``Krum``'s ``select_multikrum`` over ``RecordDict`` replies."""
  pytest.importorskip("flwr")
  trimmed = pytest.importorskip("flwr.serverapp.strategy.fedtrimmedavg")
  multikrum = pytest.importorskip("flwr.serverapp.strategy.multikrum")
  from flwr.app import ArrayRecord, RecordDict

  x = _outlying(7)
  for p in (0.1, 0.3):
    np.testing.assert_allclose(
        np.asarray(baselines.trimmed_mean(jnp.asarray(x), p).estimates[0]),
        trimmed.trim_mean(x.astype(np.float64), p), rtol=1e-5, atol=1e-5)
  replies = [RecordDict({"arrays": ArrayRecord([np.asarray(u, np.float64)])}) for u in x]
  ids = [id(r) for r in replies]
  for f, keep in ((0, 1), (2, 1), (2, 9), (4, 5)):
    chosen = multikrum.select_multikrum(replies, f, keep)
    expected = np.zeros(len(x), bool)
    expected[[ids.index(id(r)) for r in chosen]] = True
    res = baselines.multi_krum(jnp.asarray(x), f, num_selected=keep)
    np.testing.assert_array_equal(np.asarray(res.selected), expected)
