"""The CLAIR estimator on problems with known truth (issue 2's "Done when")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax
from problems import benign_error, make_problem, sin_theta

RANK = 3


@pytest.mark.parametrize("attack", ["random", "coherent"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_noiseless_exact_detection_and_subspace(attack, fraction):
  problem = make_problem(fraction=fraction, attack=attack, rank=RANK, seed=11)
  with jax.numpy_rank_promotion("raise"):
    result = clair_jax.clair(problem.updates, RANK)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  assert sin_theta(result.subspace, problem.basis) < 1e-4
  assert result.subspace.dtype == jnp.float32
  np.testing.assert_allclose(result.subspace.T @ result.subspace, np.eye(RANK), atol=1e-5)
  np.testing.assert_array_equal(result.contaminated, result.scores > result.threshold)


def offsubspace_attack(problem, noise, ratio, attack, seed):
  """Contaminated blocks whose off-subspace norm is exactly ``ratio`` x the noise norm."""
  rng = np.random.default_rng(seed)
  num_clients, m, n = problem.updates.shape
  noise_norm = noise * np.sqrt(m * n)
  projector = np.eye(m) - problem.basis @ problem.basis.T
  updates = np.array(problem.updates, np.float64)
  if attack == "coherent":
    other = np.linalg.qr(rng.normal(size=(m, RANK)))[0]
  for k in np.flatnonzero(problem.contaminated):
    raw = (rng.normal(size=(m, n)) if attack == "random"
           else other @ rng.normal(size=(RANK, n)))
    off = projector @ raw
    updates[k] = ratio * noise_norm * off / np.linalg.norm(off) + problem.basis @ (
        problem.basis.T @ raw)
  return problem._replace(updates=updates.astype(np.float32))


@pytest.mark.parametrize("attack", ["random", "coherent"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_noisy_detection_and_oracle_ratio(attack, fraction):
  noise = 0.05
  problem = make_problem(fraction=fraction, noise=noise, rank=RANK, seed=21)
  problem = offsubspace_attack(problem, noise, ratio=2.0, attack=attack, seed=22)
  result = clair_jax.clair(problem.updates, RANK)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  oracle_basis = clair_jax.fit_subspace(problem.updates, ~problem.contaminated, RANK, "svd")
  oracle = clair_jax.project_onto_subspace(problem.updates, oracle_basis)
  clair_error, oracle_error = benign_error(result.refined, problem), benign_error(oracle, problem)
  local_error = benign_error(problem.updates, problem)
  assert clair_error <= 1.1 * oracle_error
  assert clair_error < 0.25 * local_error
  # The noise level is estimated from data (within 10%).
  assert abs(float(result.noise_level) / noise - 1) < 0.1


@pytest.mark.parametrize("boost", [2.0, 4.0])
def test_larger_coherent_group_is_outvoted(boost):
  problem = make_problem(fraction=0.3, attack="coherent", attack_scale=boost, noise=0.01,
                         rank=RANK, seed=31)
  result = clair_jax.clair(problem.updates, RANK)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  assert sin_theta(result.subspace, problem.basis) < 0.05


@pytest.mark.slow   # the consensus=False program is compiled for this ablation alone
def test_convex_program_alone_absorbs_a_coherent_group():
  """Why the trimming loop exists: the convex verdict misses the coherent group."""
  problem = make_problem(fraction=0.25, attack="coherent", rank=RANK, seed=41)
  result = clair_jax.clair(problem.updates, RANK, consensus=False)
  assert not np.array_equal(result.convex_contaminated, problem.contaminated)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)


def test_refined_outputs_and_in_subspace_boosts():
  """Benign: U U^T D_k. Contaminated: as sent. In-subspace boosts hurt nobody else."""
  problem = make_problem(fraction=0.2, noise=0.02, rank=RANK, seed=51)
  updates = np.array(problem.updates)
  boosted = np.flatnonzero(~problem.contaminated)[:2]
  clean = clair_jax.clair(updates, RANK, refine="projection")
  noise = updates - problem.truth
  updates[boosted[0]] = 10.0 * problem.truth[boosted[0]] + noise[boosted[0]]
  updates[boosted[1]] = -5.0 * problem.truth[boosted[1]] + noise[boosted[1]]
  result = clair_jax.clair(updates, RANK, refine="projection")
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  bad = problem.contaminated
  np.testing.assert_array_equal(np.asarray(result.refined)[bad], updates[bad])
  u = np.asarray(result.subspace)
  good = np.flatnonzero(~bad)
  np.testing.assert_allclose(np.asarray(result.refined)[good],
                             np.einsum("mr,pr,kpn->kmn", u, u, updates[good]), atol=1e-5)
  others = np.setdiff1d(good, boosted)
  error = lambda refined: np.sum((np.asarray(refined)[others] - problem.truth[others]) ** 2,
                                 axis=(1, 2))
  assert np.all(error(result.refined) <= 1.05 * error(clean.refined))
  # The default (pooled) refine: the boosted clients do not pull the others either.
  pooled_clean = clair_jax.clair(np.array(problem.updates), RANK)
  pooled = clair_jax.clair(updates, RANK)
  np.testing.assert_array_equal(pooled.contaminated, problem.contaminated)
  assert np.mean(error(pooled.refined)) <= 1.1 * np.mean(error(pooled_clean.refined))


@pytest.mark.slow   # one-off compile variant: projection refine, given weights and noise
def test_options_are_honoured():
  problem = make_problem(fraction=0.2, noise=0.02, rank=RANK, seed=61)
  result = clair_jax.clair(problem.updates, RANK, lam_low_rank=0.7, lam_sparse=0.9,
                           noise_level=0.02, contaminated_output="project",
                           refine="projection")
  np.testing.assert_allclose(float(result.lam_low_rank), 0.7, rtol=1e-5)
  np.testing.assert_allclose(float(result.lam_sparse), 0.9, rtol=1e-5)
  np.testing.assert_allclose(float(result.noise_level), 0.02, rtol=1e-5)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  u = np.asarray(result.subspace)
  np.testing.assert_allclose(result.refined, np.einsum("mr,pr,kpn->kmn", u, u, problem.updates),
                             atol=1e-5)
  stricter = clair_jax.clair(problem.updates, RANK, threshold_ratio=50.0, mad_multiplier=0.0)
  np.testing.assert_allclose(stricter.thresholds, [50.0, 50.0], rtol=1e-6)
  assert not np.asarray(stricter.contaminated).any()  # nothing is 50x off
  assert float(result.threshold) == 1.0
  assert "flagged" in result.summary()
  with pytest.raises(TypeError, match="unknown option"):
    clair_jax.clair(problem.updates, RANK, lamda=1.0)
  for bad_width in (0, 2.5, True):
    with pytest.raises(ValueError, match="svt_width"):
      clair_jax.clair(problem.updates, RANK, svt_width=bad_width)


def test_rank_chosen_from_data():
  problem = make_problem(fraction=0.3, attack="coherent", noise=0.01, rank=RANK, seed=71)
  assert clair_jax.estimate_rank(problem.updates) == RANK
  result = clair_jax.clair(problem.updates)
  assert result.subspace.shape == (problem.updates.shape[1], RANK)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)


def test_row_side():
  problem = make_problem(fraction=0.25, rank=RANK, seed=81)
  transposed = np.swapaxes(problem.updates, 1, 2)  # the shared space is now the row space
  result = clair_jax.clair(transposed, RANK, side="right")
  assert result.subspace.shape == (transposed.shape[2], RANK)
  assert result.refined.shape == transposed.shape
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  assert sin_theta(result.subspace, problem.basis) < 1e-4


# bfloat16 stays in the default path; float16 (its own compile, same code path) is slow.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_half_precision_is_computed_in_float32(dtype):
  problem = make_problem(fraction=0.25, noise=0.01, rank=RANK, seed=91)
  result = clair_jax.clair(jnp.asarray(problem.updates, dtype), RANK)
  assert result.subspace.dtype == jnp.float32
  assert result.refined.dtype == dtype
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  assert sin_theta(result.subspace, problem.basis) < 0.05


@pytest.mark.slow   # a float64 program of its own (jax.enable_x64)
def test_float64():
  problem = make_problem(fraction=0.25, rank=RANK, seed=92, dtype=np.float64)
  with jax.enable_x64(True):
    result = clair_jax.clair(jnp.asarray(problem.updates), RANK)
    assert result.subspace.dtype == jnp.float64
    assert sin_theta(result.subspace, problem.basis) < 1e-10


# The next two at K = 40, 64 x 16, rank 4: the program test_robust_detection compiles.
def test_benign_clients_with_different_noise_levels():
  """Noise levels spread 2x either way: the structure test still finds a coherent group."""
  rng = np.random.default_rng(5)
  problem = make_problem(num_clients=40, m=64, n=16, rank=4, fraction=0.3, attack="coherent",
                         seed=5)
  sigma = 0.1 * np.exp(rng.uniform(-np.log(2), np.log(2), size=40))
  updates = problem.truth + sigma[:, None, None] * rng.normal(size=problem.truth.shape)
  bad = problem.contaminated
  updates[bad] = problem.updates[bad] + 0.1 * rng.normal(size=updates[bad].shape)
  result = clair_jax.clair(updates.astype(np.float32), 4)
  np.testing.assert_array_equal(result.contaminated, bad)
  structure = np.asarray(result.structure_scores)
  assert structure[bad].min() > structure[~bad].max()


def test_large_coherent_group_when_benign_signal_is_below_noise():
  """40% attackers at 5x norms, benign signal weaker than noise per client: the subspace
  of the larger group holds no signal from the majority, and the complement start wins."""
  problem = make_problem(num_clients=40, m=64, n=16, rank=4, fraction=0.4, attack="coherent",
                         attack_scale=5.0, noise=0.6, seed=8)
  result = clair_jax.clair(problem.updates, 4)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  oracle_basis = clair_jax.fit_subspace(problem.updates, ~problem.contaminated, 4)
  assert sin_theta(result.subspace, problem.basis) <= 1.01 * sin_theta(oracle_basis,
                                                                        problem.basis)


def test_clients_whose_own_update_has_rank_at_most_r():
  """LoRA adapters of rank <= r have no spectral tail: the structure test abstains.

  At the default 20 x 48 x 12, rank 3 of tests/problems.py (the program the tests above
  compile; own rank 3 = r < n = 12).
  """
  rng = np.random.default_rng(0)
  num_clients, m, n, rank = 20, 48, 12, 3
  basis = np.linalg.qr(rng.normal(size=(m, rank)))[0]
  updates = np.stack([(basis + 0.05 * rng.normal(size=(m, rank))) @ rng.normal(size=(rank, n))
                      for _ in range(num_clients)])
  other = np.linalg.qr(rng.normal(size=(m, rank)))[0]
  bad = np.arange(num_clients) < 5
  updates[bad] = np.einsum("mr,krn->kmn", other, rng.normal(size=(5, rank, n)))
  result = clair_jax.clair(updates.astype(np.float32), rank)
  np.testing.assert_array_equal(result.contaminated, bad)
  np.testing.assert_array_equal(result.structure_scores, 0.0)


@pytest.mark.slow   # two programs at m = 128; the default path keeps the iterative fit
# (test_iterative_fit_matches_gram_and_svd) and test_solver's subspace SVT at m = 128
def test_large_m_takes_the_iterative_paths_and_stays_exact():
  """m = 128: warm-started subspace SVT in the solver and iterative trimming fits."""
  from clair_jax._src import solver, subspace
  problem = make_problem(num_clients=24, m=128, n=8, rank=3, fraction=0.25,
                         attack="coherent", seed=11)
  assert solver.basis_width(problem.updates.shape) > 0
  assert subspace.use_iterative(128, 24 * 8, 3)
  result = clair_jax.clair(jnp.asarray(problem.updates), 3)
  exact = clair_jax.clair(jnp.asarray(problem.updates), 3, svt_method="svd")
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  np.testing.assert_array_equal(result.contaminated, exact.contaminated)
  basis = np.asarray(result.subspace, np.float64)
  truth = np.asarray(problem.basis, np.float64)
  assert np.linalg.norm(basis - truth @ (truth.T @ basis), 2) < 1e-4


def test_iterative_fit_matches_gram_and_svd():
  from clair_jax._src import subspace
  problem = make_problem(num_clients=24, m=128, n=8, rank=3, fraction=0.25, noise=0.05,
                         seed=12)
  x = jnp.asarray(problem.updates)
  mask = jnp.asarray(~problem.contaminated)
  projector = lambda u: np.asarray(u, np.float64) @ np.asarray(u, np.float64).T
  by_svd = projector(clair_jax.fit_subspace(x, mask, 3, "svd"))
  for method in ("gram", "iterative", "auto"):
    np.testing.assert_allclose(projector(clair_jax.fit_subspace(x, mask, 3, method)), by_svd,
                               atol=1e-4)
  # In the column layout the mask weights the products instead of zeroing a copy; the
  # masked-out (random) clients must not enter any fit.
  columns = clair_jax.to_columns(x)
  for method in ("gram", "svd", "iterative"):
    in_place, _ = subspace.fit_columns(columns, mask, 3, method)
    np.testing.assert_allclose(projector(in_place), by_svd, atol=1e-4)
  # Warm start: the returned basis starts the next fit, which then needs one step.
  fitted, basis = subspace.fit_subspace_and_basis(x, mask, 3, "iterative")
  pairs = subspace.subspace_iteration(clair_jax.to_columns(x * mask[:, None, None]), basis,
                                      lambda p: jnp.max(p.residuals[:3]) <= subspace.FIT_TOL,
                                      subspace.FIT_MAX_ITERS)
  assert int(pairs.num_iters) == 1
  np.testing.assert_allclose(projector(pairs.vectors[:, :3]), projector(fitted), atol=1e-5)
  with pytest.raises(ValueError, match="method"):
    clair_jax.fit_subspace(x, mask, 3, "qr")


def test_iterative_fit_converges_only_the_leading_directions():
  """``converge=r`` of a ``2 r``-wide fit: the top ``r`` directions are exact, a direction
  standing out of the noise bulk is found too (it has a gap), and bulk directions are
  returned as the iteration leaves them instead of forcing the exact ``m x m`` eigh."""
  from clair_jax._src import subspace
  rng = np.random.default_rng(3)
  m, num_clients, n, rank = 256, 20, 8, 3
  signal = np.linalg.qr(rng.standard_normal((m, rank + 1)))[0]
  scales = np.array([5.0, 4.0, 3.0, 2.5])  # direction 4: out of the bulk, not in U
  columns = (np.einsum("mr,r,rkn->mkn", signal, scales,
                       rng.standard_normal((rank + 1, num_clients, n)))
             + rng.standard_normal((m, num_clients, n))).astype(np.float32)
  columns = jnp.asarray(columns)
  exact = np.linalg.eigh(np.einsum("mkn,pkn->mp", np.asarray(columns, np.float64),
                                   np.asarray(columns, np.float64)))[1][:, ::-1]
  width = 2 * rank
  fitted, _ = subspace.fit_columns(columns, None, width, "iterative", converge=rank)
  fitted = np.asarray(fitted, np.float64)
  gap = lambda u, v: np.linalg.norm(u @ u.T - v @ v.T, 2)
  assert gap(fitted[:, :rank], exact[:, :rank]) < 1e-5
  assert gap(fitted[:, :rank + 1], exact[:, :rank + 1]) < 1e-5
  # The bulk directions were not pinned down by an exact eigen-decomposition (measured
  # 2.6e-4 off) ...
  assert gap(fitted[:, rank + 1:], exact[:, rank + 1:width]) > 1e-4
  # ... which converge=width (every direction) does, through its fallback (4e-6).
  full, _ = subspace.fit_columns(columns, None, width, "iterative")
  assert gap(np.asarray(full, np.float64), exact[:, :width]) < 2e-5


@pytest.mark.slow   # two programs (default and given lam_low_rank) at 32 x 64 x 16, rank 4
def test_nuclear_weight_keeps_noise_directions_out_of_the_low_rank_part():
  """The default lambda_L sits 10% above the noise edge sigma (sqrt(m) + sqrt(K n)).

  Contaminated blocks clipped to norm lambda_S lift the edge of the SVT input's noise
  spectrum; at the edge itself a handful of pure-noise directions enter L (with tiny
  shrink factors), above it L holds the signal alone: the benign and the coherent
  group's subspaces, 2 r directions.
  """
  rng = np.random.default_rng(0)
  num_clients, m, n, rank = 32, 64, 16, 4
  problem = make_problem(num_clients=num_clients, m=m, n=n, rank=rank, fraction=0.2,
                         attack="coherent", noise=0.05, seed=3)
  updates = problem.updates.copy()
  random_ids = np.flatnonzero(problem.contaminated)[::2]   # half the group: random blocks
  typical = np.median(np.linalg.norm(problem.truth, axis=(1, 2)))
  updates[random_ids] = rng.normal(size=(len(random_ids), m, n)) * typical / np.sqrt(m * n)
  rank_of = lambda r: np.linalg.matrix_rank(
      np.asarray(clair_jax.stack_clients(r.low_rank), np.float64),
      tol=1e-3 * float(np.abs(r.low_rank).max()))
  result = clair_jax.clair(jnp.asarray(updates), rank)
  np.testing.assert_array_equal(result.contaminated, problem.contaminated)
  assert rank_of(result) == 2 * rank
  edge = clair_jax.clair(jnp.asarray(updates), rank,
                         lam_low_rank=float(result.lam_low_rank) / 1.1)
  assert rank_of(edge) > 2 * rank
  np.testing.assert_array_equal(edge.contaminated, problem.contaminated)
