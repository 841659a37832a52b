"""Synthetic problems: the truth they claim is the truth they contain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import synthetic

SIZES = dict(num_clients=20, m=24, n=4, rank=3)


def _off_subspace(x, u):
  x = np.nan_to_num(np.asarray(x, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  u = np.asarray(u, np.float64)
  return np.linalg.norm(x - np.einsum("mr,pr,kpn->kmn", u, u, x), axis=(1, 2))


@pytest.mark.parametrize("attack", synthetic.MODEL_ATTACKS + synthetic.LITERATURE_ATTACKS)
def test_problem_structure(attack):
  p = synthetic.make_problem(jax.random.key(1), fraction=0.3, attack=attack, noise=0.05, **SIZES)
  u, truth, x = np.asarray(p.subspace), np.asarray(p.truth), np.asarray(p.updates)
  c = np.asarray(p.contaminated)
  assert x.shape == truth.shape == (20, 24, 4) and u.shape == (24, 3) and c.shape == (20,)
  assert c.sum() == 6
  np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-5)
  assert _off_subspace(truth, u).max() < 1e-3 * np.linalg.norm(truth)  # Delta_k = U W_k
  benign_err = np.linalg.norm(x[~c] - truth[~c], axis=(1, 2))
  np.testing.assert_allclose(benign_err.mean(), 0.05 * np.sqrt(24 * 4), rtol=0.25)
  finite = np.isfinite(x).all(axis=(1, 2))
  assert finite[~c].all()
  assert finite[c].all() == (attack != "nonfinite")
  off = _off_subspace(x, u)
  if attack == "sign_flip":  # stays in the subspace and flips the sign
    assert off[c].max() < 2 * off[~c].max()
    assert (np.einsum("kmn,kmn->k", x[c], truth[c]) < 0).all()
  elif attack in ("random", "coherent", "boosted", "sparse"):
    assert off[c].min() > 3 * off[~c].max()
  if attack == "boosted":
    assert np.linalg.norm(x[c], axis=(1, 2)).mean() > 3 * np.linalg.norm(x[~c], axis=(1, 2)).mean()
  if attack == "nonfinite":
    assert np.isnan(x[c]).any() and np.isinf(x[c]).any()
  if attack in synthetic.LITERATURE_ATTACKS:
    spread = np.abs(x[c] - x[c][:1]).max()
    if attack == "tilt":  # own honest update + one shared direction: distinct, same push
      assert spread > 0
      push = x[c] - np.asarray(p.truth)[c]  # noise + push; the push is shared and off U
      assert _off_subspace(push.mean(0, keepdims=True), u)[0] > 0.5 * 0.05 * np.sqrt(96)
    else:  # the papers' attackers send one vector
      assert spread == 0


def test_literature_attacks_share_benign_draws_and_follow_attacks_module():
  from clair_jax import attacks

  a = synthetic.make_problem(jax.random.key(5), attack="random", fraction=0.3, **SIZES)
  b = synthetic.make_problem(jax.random.key(5), attack="alie", fraction=0.3, **SIZES)
  c = np.asarray(a.contaminated)
  np.testing.assert_array_equal(np.asarray(b.contaminated), c)
  np.testing.assert_array_equal(np.asarray(a.updates)[~c], np.asarray(b.updates)[~c])
  np.testing.assert_array_equal(np.asarray(a.truth), np.asarray(b.truth))
  expected = attacks.alie(b.updates, ~c, int(c.sum()))[0]
  np.testing.assert_allclose(np.asarray(b.updates)[c][0], np.asarray(expected), rtol=1e-6)
  # attack_scale overrides the strength (ALIE's z); attacker_noise is a fraction of sigma
  z2 = synthetic.make_problem(jax.random.key(5), attack="alie", fraction=0.3, attack_scale=2.0,
                              **SIZES)
  expected = attacks.alie(b.updates, ~c, int(c.sum()), z=2.0)[0]
  np.testing.assert_allclose(np.asarray(z2.updates)[c][0], np.asarray(expected), rtol=1e-5)
  noisy = synthetic.make_problem(jax.random.key(5), attack="alie", fraction=0.3, noise=0.5,
                                 attacker_noise=0.2, **SIZES)
  clean = synthetic.make_problem(jax.random.key(5), attack="alie", fraction=0.3, noise=0.5,
                                 **SIZES)
  diff = np.asarray(noisy.updates - clean.updates)[c]
  np.testing.assert_allclose(diff.std(), 0.2 * 0.5, rtol=0.15)
  assert np.abs(diff[0] - diff[1]).max() > 0


def test_adaptive_attack_picks_the_most_damaging_strength():
  seen = []

  def objective(problem):  # damage = distance of the attackers' update from the benign mean
    c = np.asarray(problem.contaminated)
    x = np.asarray(problem.updates)
    seen.append(x[c][0])
    return float(np.linalg.norm(x[c][0] - x[~c].mean(0)))

  out = synthetic.make_attacked_problem(
      jax.random.key(0), attack="adaptive_alie", fraction=0.3, objective=objective,
      attack_options={"strengths": (0.5, 3.0, 1.0)}, **SIZES,
  )
  assert out.strengths == (0.5, 3.0, 1.0) and len(out.values) == 3 and out.strength == 3.0
  c = np.asarray(out.problem.contaminated)
  np.testing.assert_array_equal(np.asarray(out.problem.updates)[c][0], seen[1])
  with pytest.raises(ValueError, match="objective"):
    synthetic.make_problem(jax.random.key(0), attack="adaptive_tilt", **SIZES)
  fixed = synthetic.make_problem(jax.random.key(0), attack="adaptive_tilt", attack_scale=0.5,
                                 **SIZES)
  assert fixed.updates.shape == (20, 24, 4)


def test_deterministic_in_key_and_contaminated_set_is_random():
  a = synthetic.make_problem(jax.random.key(3), **SIZES)
  b = synthetic.make_problem(jax.random.key(3), **SIZES)
  c = synthetic.make_problem(jax.random.key(4), **SIZES)
  np.testing.assert_array_equal(np.asarray(a.updates), np.asarray(b.updates))
  assert not np.array_equal(np.asarray(a.updates), np.asarray(c.updates))
  masks = [
      np.asarray(synthetic.make_problem(jax.random.key(s), **SIZES).contaminated)
      for s in range(4)
  ]
  assert any(not m[:4].all() for m in masks)  # not always the first clients


def test_overlap_separation_controls_principal_angles():
  u = synthetic.random_orthonormal(jax.random.key(0), 20, 3)
  for s in (0.0, 0.4, 1.0):
    v = np.asarray(synthetic.subspace_at_angle(jax.random.key(1), u, s))
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-5)
    cos = np.linalg.svd(np.asarray(u).T @ v, compute_uv=False)
    np.testing.assert_allclose(cos, np.sqrt(1 - s**2), atol=1e-4)


def test_heterogeneity_zero_gives_identical_benign_truth():
  p = synthetic.make_problem(jax.random.key(2), heterogeneity=0.0, **SIZES)
  t = np.asarray(p.truth)
  np.testing.assert_allclose(t, np.broadcast_to(t[:1], t.shape), atol=1e-5)


def test_regression_ols_recovers_benign_coefficients():
  p = synthetic.make_regression_problem(
      jax.random.key(0), num_clients=12, m=10, n=3, rank=2, num_samples=400, noise=0.1,
      fraction=0.25, attack="coherent",
  )
  x, y = np.asarray(p.features, np.float64), np.asarray(p.targets, np.float64)
  c = np.asarray(p.contaminated)
  ref = np.stack([np.linalg.lstsq(x[k], y[k], rcond=None)[0] for k in range(12)])
  np.testing.assert_allclose(np.asarray(p.updates), ref, rtol=1e-3, atol=1e-3)
  err = np.linalg.norm(ref - np.asarray(p.truth), axis=(1, 2))
  assert err[~c].max() < 0.1 and err[c].min() > 1.0


def test_regression_ridge_and_nonfinite():
  p = synthetic.make_regression_problem(
      jax.random.key(1), num_clients=8, m=10, n=3, rank=2, num_samples=6, ridge=0.5,
      fraction=0.5, attack="nonfinite",
  )
  x, y = np.asarray(p.features, np.float64), np.asarray(p.targets, np.float64)
  c = np.asarray(p.contaminated)
  k = int(np.flatnonzero(~c)[0])
  ref = np.linalg.solve(x[k].T @ x[k] + 0.5 * np.eye(10), x[k].T @ y[k])
  np.testing.assert_allclose(np.asarray(p.updates[k]), ref, rtol=1e-3, atol=1e-3)
  finite = np.isfinite(np.asarray(p.updates)).all(axis=(1, 2))
  np.testing.assert_array_equal(finite, ~c)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="unknown attack"):
    synthetic.make_problem(jax.random.key(0), attack="nope")
  with pytest.raises(ValueError, match="rank"):
    synthetic.make_problem(jax.random.key(0), m=6, rank=4)
  with pytest.raises(ValueError, match="num_samples"):
    synthetic.make_regression_problem(jax.random.key(0), m=10, num_samples=5)
  with pytest.raises(ValueError, match="unknown attack"):
    synthetic.make_regression_problem(jax.random.key(0), attack="alie")
  with pytest.raises(ValueError, match="attacker_noise"):
    synthetic.make_problem(jax.random.key(0), attack="random", attacker_noise=0.1)
  with pytest.raises(ValueError, match="attacker_noise"):
    synthetic.make_problem(jax.random.key(0), attack="alie", attacker_noise=-0.1)
  with pytest.raises(ValueError, match="fraction"):
    synthetic.make_problem(jax.random.key(0), attack="alie", fraction=1.0)
  with pytest.raises(ValueError, match=r"\(K, N, m\)"):
    synthetic.least_squares_estimates(jnp.ones((2, 5, 3)), jnp.ones((2, 4, 1)))


def test_grid_values_do_not_recompile():
  """Fraction, noise, heterogeneity and separation are traced: one compile per attack/size."""
  sizes = dict(num_clients=10, m=12, n=3, rank=2, attack="overlap")
  synthetic.make_problem(jax.random.key(0), fraction=0.1, noise=0.1, **sizes)
  before = synthetic._problem_arrays._cache_size()
  synthetic.make_problem(
      jax.random.key(1), fraction=0.4, noise=0.5, heterogeneity=0.9, separation=0.2, **sizes
  )
  assert synthetic._problem_arrays._cache_size() == before
