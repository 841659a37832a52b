"""Refinement stage: fixed strengths, the server-only "auto" rule, choose_strength, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import baselines
from clair_jax import synthetic
from clair_jax._src import refine
from clair_jax._src.refine import choose_strength
from clair_jax._src.refine import refine_updates
from clair_jax._src.refine import refined_factors

K, M, N, R = 20, 32, 8, 3
W = 8  # one static width for every test: one compile per code path


def _refine(updates, benign, **kwargs):
  return refine_updates(updates, benign, max_rank=W, **kwargs)


def _problem(h=0.5, noise=0.3, fraction=0.0, seed=0, attack="random"):
  return synthetic.make_problem(jax.random.key(seed), num_clients=K, m=M, n=N, rank=R,
                                fraction=fraction, attack=attack, noise=noise,
                                heterogeneity=h)


def _close(a, b, tol=1e-4):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(1.0, float(np.max(np.abs(b))))
  np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0)


def test_strength_one_is_projection():
  p = _problem(fraction=0.25)
  benign = ~p.contaminated
  out = _refine(p.updates, benign, rank=R, strength=1.0)
  oracle = baselines.oracle(p.updates, benign, R)
  _close(out.refined, oracle.estimates)
  u = out.subspace[:, :R]
  _close(u.T @ u, np.eye(R), 1e-5)


def test_strength_zero_pools_every_benign_client():
  p = _problem(fraction=0.25)
  benign = ~p.contaminated
  out = _refine(p.updates, benign, strength=0.0)
  refined = np.asarray(out.refined)
  for k in np.flatnonzero(np.asarray(benign)):
    _close(refined[k], out.consensus)
  _close(out.consensus, out.subspace @ out.centre)


def test_rank_reported_and_unused_columns_zero():
  out = _refine(_problem().updates, jnp.ones(K, bool))
  assert int(out.rank) == R
  assert out.subspace.shape == (M, 8) and out.strength.shape == (8,)
  assert np.all(np.asarray(out.subspace[:, R:]) == 0)
  assert np.all(np.asarray(out.strength[R:]) == 0)
  assert not bool(out.saturated)
  given = _refine(_problem().updates, jnp.ones(K, bool), rank=5)
  assert int(given.rank) == 5
  assert np.all(np.asarray(given.subspace[:, 5:]) == 0)


def test_noiseless_data_keep_their_rank_and_values():
  p = _problem(noise=0.0, h=0.5)
  out = _refine(p.updates, jnp.ones(K, bool))
  assert int(out.rank) == R
  _close(out.refined, p.truth, 1e-3)


def test_noise_level_estimated():
  out = _refine(_problem(noise=0.4).updates, jnp.ones(K, bool))
  assert abs(float(out.noise_level) / 0.4 - 1) < 0.05


def test_non_benign_returned_as_sent_and_nonfinite_never_benign():
  p = _problem(fraction=0.25, attack="nonfinite")
  everyone = jnp.ones(K, bool)  # the caller forgot to exclude the NaN/Inf clients
  out = _refine(p.updates, everyone)
  bad = np.asarray(p.contaminated)
  np.testing.assert_array_equal(np.asarray(out.benign), ~bad)
  sent, refined = np.asarray(p.updates), np.asarray(out.refined)
  np.testing.assert_array_equal(refined[bad], sent[bad])
  assert np.all(np.isfinite(refined[~bad]))
  assert np.all(np.isfinite(np.asarray(out.consensus)))


@pytest.mark.parametrize("h, low, high", [(0.0, 0.0, 0.05), (1.0, 0.95, 1.0)])
def test_auto_strength_follows_heterogeneity(h, low, high):
  out = _refine(_problem(h=h, noise=0.1).updates, jnp.ones(K, bool))
  s = np.asarray(out.strength[: int(out.rank)])
  assert int(out.rank) == R
  assert np.all((s >= low) & (s <= high)), s


def test_auto_beats_projection_and_pooling_in_between():
  p = _problem(h=0.05, noise=1.0)
  benign = jnp.ones(K, bool)
  err = lambda x: float(jnp.mean(jnp.sum(jnp.square(x - p.truth), axis=(1, 2))))
  auto = err(_refine(p.updates, benign).refined)
  assert auto < err(_refine(p.updates, benign, rank=R, strength=1.0).refined)
  assert auto < err(_refine(p.updates, benign, rank=R, strength=0.0).refined)


def test_subspace_noise_for_noise_inside_the_subspace():
  # LoRA-like: extra noise lives inside the shared subspace, invisible off it.
  p = _problem(h=0.0, noise=0.1)
  extra = jnp.einsum("mr,krn->kmn", p.subspace, jax.random.normal(jax.random.key(9), (K, R, N)))
  updates = p.updates + extra
  server_only = _refine(updates, jnp.ones(K, bool))
  informed = _refine(updates, jnp.ones(K, bool), subspace_noise=float(np.sqrt(1.0 + 0.01)))
  assert float(jnp.min(server_only.strength[:R])) > 0.5  # the documented failure mode
  assert float(jnp.max(informed.strength)) < 0.1
  assert float(informed.subspace_noise) == pytest.approx(np.sqrt(1.01), rel=1e-5)


def test_one_undetected_outlier_does_not_add_directions_or_strength():
  p = _problem(h=0.0, noise=0.3, fraction=0.2)
  benign = np.asarray(~p.contaminated).copy()
  benign[np.flatnonzero(~benign)[0]] = True  # one attacker slips through
  out = _refine(p.updates, jnp.asarray(benign))
  assert int(out.rank) == R
  assert float(jnp.max(out.strength)) < 0.3


def test_refined_factors_are_lora_form():
  p = _problem(fraction=0.25)
  out = _refine(p.updates, ~p.contaminated)
  left, right = refined_factors(out)
  w = out.subspace.shape[1]
  assert left.shape == (K, M, w) and right.shape == (K, w, N)
  benign = np.asarray(~p.contaminated)
  _close(np.asarray(left @ right)[benign], np.asarray(out.refined)[benign])


def test_choose_strength_ignores_a_lying_minority():
  candidates = jnp.linspace(0.0, 1.0, 5)
  rng = np.random.default_rng(0)
  honest = (candidates - 0.5) ** 2 + rng.uniform(1.0, 3.0, (K, 1))  # best at 0.5
  liars = np.zeros(K, bool)
  liars[:6] = True  # 30% of the benign set report that 0 is best
  losses = np.where(liars[:, None], 10.0 * np.asarray(candidates)[None], honest)
  outsiders = np.zeros(K, bool)
  outsiders[-5:] = True  # non-benign clients shout for 1.0
  losses[outsiders] = -100.0 * np.asarray(candidates)[None]
  losses[6, 2] = np.nan  # a client with a broken report does not vote
  chosen = choose_strength(jnp.asarray(losses), candidates, jnp.asarray(~outsiders))
  assert float(chosen) == pytest.approx(0.5)
  nobody = choose_strength(jnp.asarray(losses), candidates, jnp.zeros(K, bool))
  assert float(nobody) == 1.0


def test_jit_vmap_and_traced_strength():
  p = _problem(fraction=0.25)
  benign = ~p.contaminated
  fixed = jax.jit(lambda u, b, s: _refine(u, b, strength=s, rank=R).refined)
  _close(fixed(p.updates, benign, 1.0), baselines.oracle(p.updates, benign, R).estimates)
  with jax.log_compiles(False):
    before = fixed._cache_size()
    fixed(p.updates, benign, 0.3)
    assert fixed._cache_size() == before  # a new strength does not recompile

  problems = [_problem(h=h, seed=i) for i, h in enumerate((0.0, 1.0))]
  stacked = jnp.stack([q.updates for q in problems])
  masks = jnp.ones((2, K), bool)
  batched = jax.jit(jax.vmap(_refine))(stacked, masks)
  single = _refine(problems[1].updates, masks[1])
  _close(batched.refined[1], single.refined, 1e-4)
  assert batched.strength.shape == (2, W)
  assert [int(r) for r in batched.rank] == [R, R]

  losses = jnp.stack([jnp.linspace(1.0, 0.0, 3)] * K)
  chooser = jax.jit(choose_strength)
  assert float(chooser(losses, jnp.linspace(0.0, 1.0, 3), benign)) == 1.0


def test_half_precision_input():
  p = _problem()
  out = _refine(p.updates.astype(jnp.bfloat16), jnp.ones(K, bool))
  assert out.refined.dtype == jnp.bfloat16
  assert int(out.rank) == R


@pytest.mark.parametrize("kwargs, name", [
    (dict(strength=1.5), "strength"),
    (dict(strength=-0.1), "strength"),
    (dict(strength="james-stein"), "strength"),
    (dict(strength=float("nan")), "strength"),
    (dict(rank=W + 1), "rank"),
    (dict(noise_level=-1.0), "noise_level"),
    (dict(noise_level=jnp.ones(3)), "noise_level"),
    (dict(subspace_noise=-0.5), "subspace_noise"),
])
def test_bad_options_raise(kwargs, name):
  p = _problem()
  with pytest.raises(ValueError, match=name):
    _refine(p.updates, jnp.ones(K, bool), **kwargs)


def test_bad_shapes_raise():
  p = _problem()
  with pytest.raises(ValueError, match="max_rank"):
    refine_updates(p.updates, jnp.ones(K, bool), max_rank=M + 1)
  with pytest.raises(ValueError, match="updates"):
    _refine(p.updates[0], jnp.ones(K, bool))
  with pytest.raises(ValueError, match="benign"):
    _refine(p.updates, jnp.ones(K + 1, bool))
  with pytest.raises(ValueError, match="candidates"):
    choose_strength(jnp.ones((K, 3)), jnp.linspace(0, 1, 4), jnp.ones(K, bool))
  with pytest.raises(ValueError, match="candidates"):
    choose_strength(jnp.ones((K, 2)), jnp.asarray([0.0, 2.0]), jnp.ones(K, bool))
  with pytest.raises(ValueError, match="benign"):
    choose_strength(jnp.ones((K, 2)), jnp.asarray([0.0, 1.0]), jnp.ones(K - 1, bool))


def test_random_matrix_helpers():
  # MP median of beta = 1 is about 0.6490; the noise edge is near sqrt(p) + sqrt(q)
  assert float(jax.jit(refine.noise_edge)(100.0, 400.0)) == pytest.approx(30.0, rel=0.02)
  median = float(jax.jit(refine.marchenko_pastur_median)(1.0))
  assert median == pytest.approx(0.6490, abs=2e-3)
  shrink = jax.jit(refine.optimal_shrinkage_factor)
  assert float(shrink(1.0 + np.sqrt(0.25), 0.25)) == 0.0
  big = float(shrink(10.0, 1e-6))
  assert big == pytest.approx(1 - 1 / 100, abs=1e-4)  # James-Stein as beta -> 0


def test_top_singular_triplets_match_the_svd_above_the_level():
  """The Gram path (large matrices) gives the SVD's triplets above the level; below
  ``sqrt(eps) s_1`` it hands over to the SVD itself."""
  from clair_jax._src import subspace
  rng = np.random.default_rng(0)
  m, n, count = 384, 320, 16
  signal = np.linalg.qr(rng.standard_normal((m, 3)))[0] @ np.diag([400.0, 200.0, 90.0]) @ (
      np.linalg.qr(rng.standard_normal((n, 3)))[0].T)
  x = jnp.asarray(signal + rng.standard_normal((m, n)), jnp.float32)
  exact_u, exact_s, exact_vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  for level in (40.0, 1e-3):   # Gram accurate / not (1e-3 < sqrt(eps) * 400)
    u, s, vt = jax.jit(subspace.top_singular_triplets, static_argnums=1)(x, count, level)
    assert u.shape == (m, count) and s.shape == (count,) and vt.shape == (count, n)
    np.testing.assert_allclose(np.asarray(s)[:3], exact_s[:3], rtol=1e-5)
    for i in range(3):   # (signs are free)
      assert abs(abs(float(np.asarray(u)[:, i] @ exact_u[:, i])) - 1) < 1e-5
      assert abs(abs(float(np.asarray(vt)[i] @ exact_vt[i])) - 1) < 1e-5
    if level < 1:        # the SVD's answer, bulk values included
      np.testing.assert_allclose(np.asarray(s), exact_s[:count], rtol=1e-4)


def test_huber_centre_by_kernel_equals_the_direct_steps():
  from clair_jax._src import refine as refine_lib
  rng = np.random.default_rng(1)
  points = jnp.asarray(rng.standard_normal((30, 8, 50)) + 3.0, jnp.float32)
  points = points.at[:4].add(20.0)              # a minority far away
  weights = jnp.ones((30,), jnp.float32).at[7].set(0.0)
  direct = refine_lib.huber_centre(points, weights)
  by_kernel = refine_lib.huber_centre(points, weights, by_kernel=True)
  np.testing.assert_allclose(np.asarray(by_kernel), np.asarray(direct), rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(direct - 3.0).mean()) < 0.5   # the minority did not move it
