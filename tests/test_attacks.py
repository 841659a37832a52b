"""Each attack against its paper's defining property (small shapes, NumPy references)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax import attacks
from clair_jax import synthetic

K, M, N, R = 12, 10, 3, 2


def _data(seed=0, num_clients=K, scale=1.0):
  """Benign-looking updates with a non-zero mean; the last 3 rows are not benign (NaN)."""
  x = np.asarray(jax.random.normal(jax.random.key(seed), (num_clients, M, N)), np.float64)
  x = scale * (x + 0.7)
  mask = np.arange(num_clients) < num_clients - 3
  x[~mask] = np.nan  # masked rows must never leak into an attack
  return jnp.asarray(x, jnp.float32), jnp.asarray(mask), x[mask]


def _dist(a, b):
  """Frobenius norms of ``a - b`` row by row (after broadcasting)."""
  diff = a - b
  return np.linalg.norm(diff.reshape(diff.shape[0], -1), axis=1)


def test_alie_z_reproduces_the_paper_and_the_attack_is_mean_minus_z_std():
  assert attacks.alie_z(40, 12) == pytest.approx(0.755, abs=5e-4)  # s = 9, Phi^-1(31/40)
  assert attacks.alie_z(40, 1) == pytest.approx(0.0, abs=1e-12)  # s = 20: Phi^-1(1/2)
  x, mask, benign = _data()
  out = np.asarray(attacks.alie(x, mask, 4), np.float64)
  z = attacks.alie_z(benign.shape[0] + 4, 4)
  expected = benign.mean(0) - z * benign.std(0, ddof=1)
  assert out.shape == (4, M, N)
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5, atol=1e-5)
  out = np.asarray(attacks.alie(x, mask, 2, z=1.5))
  np.testing.assert_allclose(out[0], benign.mean(0) - 1.5 * benign.std(0, ddof=1), atol=1e-5)
  with pytest.raises(ValueError, match="supporters"):
    attacks.alie_z(10, 6)


def test_ipm_is_minus_epsilon_mean():
  x, mask, benign = _data()
  for epsilon in (0.1, 100.0):
    out = np.asarray(attacks.ipm(x, mask, 3, epsilon=epsilon))
    np.testing.assert_allclose(out, np.broadcast_to(-epsilon * benign.mean(0), out.shape),
                               rtol=1e-5, atol=1e-5)


def test_identical_by_default_distinct_with_attacker_noise():
  x, mask, _ = _data()
  key = jax.random.key(3)
  for name, fn in attacks.ATTACKS.items():
    extra = {"rank": R} if name in ("tilt", "boost") else {}
    same = np.asarray(fn(x, mask, 5, key=key, **extra))
    assert np.isfinite(same).all(), name
    assert np.abs(same - same[:1]).max() == 0, name
    noisy = np.asarray(fn(x, mask, 5, key=key, attacker_noise=0.3, **extra))
    diff = noisy - same
    assert np.abs(noisy[0] - noisy[1]).max() > 0, name
    np.testing.assert_allclose(diff.std(), 0.3, rtol=0.25, err_msg=name)
  with pytest.raises(ValueError, match="needs a key"):
    attacks.alie(x, mask, 2, attacker_noise=0.1)


def _max_pairwise(benign):
  flat = benign.reshape(benign.shape[0], -1)
  return np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1)).max()


@pytest.mark.parametrize("perturbation", attacks.PERTURBATIONS)
def test_min_max_stays_within_the_benign_diameter_and_gamma_is_maximal(perturbation):
  x, mask, benign = _data()
  gamma = float(attacks.search_gamma(x, mask, rule="min_max", perturbation=perturbation))
  out = np.asarray(attacks.min_max(x, mask, 3, perturbation=perturbation), np.float64)[0]
  diameter = _max_pairwise(benign)
  assert _dist(out[None], benign).max() <= diameter * (1 + 1e-5)
  # maximal: a slightly larger gamma leaves the ball
  mean = benign.mean(0)
  p = {"unit_vec": -mean / np.linalg.norm(mean), "std": -benign.std(0, ddof=1),
       "sign": -np.sign(mean)}[perturbation]
  np.testing.assert_allclose(out, mean + gamma * p, rtol=1e-4, atol=1e-4)
  assert _dist((mean + gamma * 1.001 * p)[None], benign).max() > diameter


def test_min_max_gamma_is_not_capped():
  """The NDSS'21 code never leaves [0, 2 * gamma_init = 20]; the search here does."""
  x, mask, _ = _data(scale=100.0)
  gamma = float(attacks.search_gamma(x, mask, rule="min_max", perturbation="unit_vec"))
  small = float(attacks.search_gamma(x / 100.0, mask, rule="min_max", perturbation="unit_vec"))
  assert gamma > 20.0
  np.testing.assert_allclose(gamma, 100.0 * small, rtol=1e-4)


@pytest.mark.parametrize("perturbation", ("unit_vec", "std"))
def test_min_sum_matches_its_closed_form(perturbation):
  """sum_i ||mu + g p - g_i||^2 = S0 + |B| g^2 ||p||^2 (cross term 0): gamma* in closed form."""
  x, mask, benign = _data(1)
  out = np.asarray(attacks.min_sum(x, mask, 2, perturbation=perturbation), np.float64)[0]
  flat = benign.reshape(benign.shape[0], -1)
  sums = ((flat[:, None] - flat[None]) ** 2).sum(-1).sum(1)
  assert (_dist(out[None], benign) ** 2).sum() <= sums.max() * (1 + 1e-5)
  mean = benign.mean(0)
  p = -mean / np.linalg.norm(mean) if perturbation == "unit_vec" else -benign.std(0, ddof=1)
  s0 = ((benign - mean) ** 2).sum()
  gamma = np.sqrt((sums.max() - s0) / (benign.shape[0] * (p**2).sum()))
  np.testing.assert_allclose(out, mean + gamma * p, rtol=1e-4, atol=1e-4)


def test_line_maximize_and_opt_attacks_beat_their_fixed_versions():
  best = attacks.line_maximize(lambda t: -(t - 5.3) ** 2)
  assert best.num_evals == 16 and abs(best.argmax - 5.3) < 0.5
  x, mask, _ = _data(2, num_clients=15)
  f = 4
  for fixed, searched in ((attacks.alie(x, mask, f), attacks.opt_alie(x, mask, f)),
                          (attacks.ipm(x, mask, f), attacks.opt_ipm(x, mask, f))):
    assert (attacks.aggregator_damage(x, mask, searched)
            >= attacks.aggregator_damage(x, mask, fixed) * (1 - 1e-6))
  mean_target = lambda s: jnp.mean(s, axis=0)
  # against the mean, IPM's damage grows without bound: the search keeps expanding
  far = attacks.opt_ipm(x, mask, f, target=mean_target)
  assert attacks.aggregator_damage(x, mask, far, mean_target) > attacks.aggregator_damage(
      x, mask, attacks.ipm(x, mask, f, epsilon=100.0), mean_target)


def test_mimic_copies_the_benign_client_on_the_top_principal_direction():
  x, mask, benign = _data(4)
  flat = (benign - benign.mean(0)).reshape(benign.shape[0], -1)
  _, _, vt = np.linalg.svd(flat, full_matrices=False)
  expected = int(np.argmax(np.abs(flat @ vt[0])))
  assert int(attacks.mimic_target(x, mask)) == expected
  out = np.asarray(attacks.mimic(x, mask, 3))
  np.testing.assert_array_equal(out, np.broadcast_to(np.asarray(x)[expected], out.shape))
  np.testing.assert_array_equal(np.asarray(attacks.mimic(x, mask, 1, client=2))[0],
                                np.asarray(x)[2])
  with pytest.raises(ValueError, match="not benign"):
    attacks.mimic(x, mask, 1, client=K - 1)


def test_sign_flip_and_gaussian():
  x, mask, benign = _data(5)
  np.testing.assert_allclose(np.asarray(attacks.sign_flip(x, mask, 2))[0], -benign.mean(0),
                             atol=1e-5)
  own = jnp.ones((2, M, N))
  np.testing.assert_allclose(np.asarray(attacks.sign_flip(x, mask, 2, own_updates=own, scale=3)),
                             -3.0)
  big = jnp.asarray(np.random.default_rng(0).normal(size=(40, 30, 20)) + 2.0, jnp.float32)
  out = np.asarray(attacks.gaussian(big, None, 2, key=jax.random.key(0), sigma=0.5))[0]
  mean = np.asarray(big).mean(0)
  assert abs((out - mean).mean()) < 0.05 and (out - mean).std() == pytest.approx(0.5, rel=0.1)
  with pytest.raises(ValueError, match="key"):
    attacks.gaussian(x, mask, 2)


def _low_rank_problem(seed=0, noise=0.2):
  p = synthetic.make_problem(jax.random.key(seed), num_clients=30, m=24, n=6, rank=R,
                             fraction=0.0, noise=noise)
  return p.updates, p.subspace, np.asarray(p.subspace, np.float64)


def test_tilt_is_orthogonal_to_the_subspace_with_the_requested_norm():
  x, u, u64 = _low_rank_problem()
  mean = np.asarray(x, np.float64).mean(0)
  out = np.asarray(attacks.tilt(x, None, 3, subspace=u, noise_level=0.2, tilt_scale=1.5,
                                key=jax.random.key(1)), np.float64)
  push = out[0] - mean
  assert np.abs(u64.T @ push).max() < 1e-5
  np.testing.assert_allclose(np.linalg.norm(push), 1.5 * 0.2 * np.sqrt(24 * 6), rtol=1e-5)
  assert np.linalg.matrix_rank(push, tol=1e-6) == 1
  # estimated subspace and noise level (the benign data's top-r fit): close to the truth
  est = np.asarray(attacks.tilt(x, None, 3, rank=R, key=jax.random.key(1)), np.float64)
  np.testing.assert_allclose(np.linalg.norm(est[0] - mean), 0.2 * np.sqrt(24 * 6), rtol=0.1)
  assert np.linalg.norm(u64.T @ (est[0] - mean)) < 0.05 * np.linalg.norm(est[0] - mean)
  own = x[:3] + 1.0
  out = np.asarray(attacks.tilt(x, None, 3, subspace=u, noise_level=0.2, own_updates=own,
                                key=jax.random.key(1)))
  shared = out - np.asarray(own)
  np.testing.assert_allclose(shared, np.broadcast_to(shared[:1], shared.shape), atol=1e-5)


def test_boost_is_in_subspace_and_scaled():
  x, u, u64 = _low_rank_problem(1)
  mean = np.asarray(x, np.float64).mean(0)
  for factor in (10.0, 100.0):
    out = np.asarray(attacks.boost(x, None, 2, subspace=u, factor=factor), np.float64)[0]
    np.testing.assert_allclose(out, factor * u64 @ (u64.T @ mean), rtol=1e-4, atol=1e-3)
  est = np.asarray(attacks.boost(x, None, 2, rank=R), np.float64)[0]
  off = est - u64 @ (u64.T @ est)
  assert np.linalg.norm(off) < 0.05 * np.linalg.norm(est)


def test_adaptive_maximises_the_objective_over_strengths():
  x, mask, benign = _data(6)
  target = benign.mean(0) - 2.0 * benign.std(0, ddof=1)
  evaluate = lambda a: -float(np.linalg.norm(np.asarray(a)[0] - target))
  out = attacks.adaptive("alie", x, mask, 3, evaluate=evaluate, strengths=(0.5, 1.0, 2.0, 4.0))
  assert out.strength == 2.0 and len(out.values) == 4 and out.value == max(out.values)
  np.testing.assert_allclose(np.asarray(out.updates)[0], target, atol=1e-5)
  with pytest.raises(ValueError, match="attack must be one of"):
    attacks.adaptive("mimic", x, mask, 3, evaluate=evaluate)


def test_jit_matches_eager_and_masked_rows_are_ignored():
  x, mask, _ = _data(7)
  for name in ("alie", "ipm", "min_max", "min_sum", "mimic", "sign_flip"):
    fn = getattr(attacks, name)
    jitted = jax.jit(functools.partial(fn, num_attackers=3))
    np.testing.assert_allclose(np.asarray(jitted(x, mask)), np.asarray(fn(x, mask, 3)),
                               rtol=1e-5, atol=1e-5, err_msg=name)
  # the NaN rows outside the mask do not leak (checked above by finiteness) and do not count
  clean = x[np.asarray(mask)]
  np.testing.assert_allclose(np.asarray(attacks.alie(x, mask, 3)),
                             np.asarray(attacks.alie(clean, None, 3)), rtol=1e-6)


def test_bad_parameters_raise_and_name_them():
  x, mask, _ = _data()
  with pytest.raises(ValueError, match="num_attackers"):
    attacks.alie(x, mask, 0)
  with pytest.raises(ValueError, match="num_attackers"):
    attacks.ipm(x, mask, True)
  with pytest.raises(ValueError, match="benign_mask"):
    attacks.alie(x, mask[:5], 2)
  one = jnp.zeros((K,), bool).at[0].set(True)
  for fn in (attacks.alie, attacks.min_max, attacks.min_sum, attacks.opt_alie):
    with pytest.raises(ValueError, match="at least 2 benign"):
      fn(x, one, 2)
  with pytest.raises(ValueError, match="at least 1 benign"):
    attacks.ipm(x, jnp.zeros((K,), bool), 2)
  with pytest.raises(ValueError, match="perturbation"):
    attacks.min_max(x, mask, 2, perturbation="nope")
  with pytest.raises(ValueError, match="rank"):
    attacks.tilt(x, mask, 2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="rank"):
    attacks.boost(x, mask, 2, rank=M)
  with pytest.raises(ValueError, match="key or direction"):
    attacks.tilt(x, mask, 2, rank=R)
  with pytest.raises(ValueError, match="tilt_scale"):
    attacks.tilt(x, mask, 2, rank=R, key=jax.random.key(0), tilt_scale=-1.0)
  with pytest.raises(ValueError, match="attacker_noise"):
    attacks.alie(x, mask, 2, attacker_noise=-1.0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="own_updates"):
    attacks.sign_flip(x, mask, 2, own_updates=jnp.ones((3, M, N)))
  with pytest.raises(ValueError, match=r"\(K, m, n\)"):
    attacks.alie(jnp.ones((K, M)), None, 2)
