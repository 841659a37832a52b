"""The FISTA decomposition: convergence, status codes, init/step/solve consistency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax
from clair_jax._src import solver
from problems import make_problem


@pytest.fixture(scope="module")
def noisy():
  problem = make_problem(num_clients=12, m=24, n=8, rank=2, fraction=0.25, noise=0.02, seed=5)
  sigma = 0.02
  lam_low_rank = sigma * (np.sqrt(24) + np.sqrt(12 * 8))
  lam_sparse = 1.5 * sigma * np.sqrt(24 * 8)
  return problem, lam_low_rank, lam_sparse


def objective(blocks, low_rank, sparse, lam_low_rank, lam_sparse):
  stacked = lambda x: np.transpose(np.asarray(x, np.float64), (1, 0, 2)).reshape(x.shape[1], -1)
  fit = 0.5 * np.sum((np.asarray(blocks) - low_rank - sparse) ** 2)
  nuclear = np.linalg.norm(stacked(low_rank), "nuc")
  group = np.sum(np.linalg.norm(np.asarray(sparse, np.float64), axis=(1, 2)))
  return fit + lam_low_rank * nuclear + lam_sparse * group


@pytest.mark.parametrize("svt_method", ["svd", "gram", "auto"])
def test_converges_and_separates(noisy, svt_method):
  problem, lam_low_rank, lam_sparse = noisy
  sol = clair_jax.solve_decomposition(problem.updates, lam_low_rank, lam_sparse,
                                      svt_method=svt_method)
  assert int(sol.status) == solver.SUCCESSFUL
  assert int(sol.num_steps) < sol.max_steps and float(sol.residual) < 1e-4
  sparse_norms = np.linalg.norm(np.asarray(sol.sparse), axis=(1, 2))
  np.testing.assert_array_equal(sparse_norms > 0, problem.contaminated)
  # Fixed point of the joint problem (the solver minimises S out and iterates on L):
  # L = SVT_{lam_L}(M - S) and S_k = prox_{lam_S ||.||_F}(M_k - L_k), to the solver's tol.
  blocks = np.asarray(problem.updates, np.float64)
  low_rank, sparse = np.asarray(sol.low_rank, np.float64), np.asarray(sol.sparse, np.float64)
  stack = lambda x: np.transpose(x, (1, 0, 2)).reshape(x.shape[1], -1)   # float64
  left, singular_values, right_t = np.linalg.svd(stack(blocks - sparse), full_matrices=False)
  svt = (left * np.maximum(singular_values - lam_low_rank, 0.0)) @ right_t
  scale = np.linalg.norm(blocks)
  assert np.linalg.norm(stack(low_rank) - svt) < 1e-4 * scale
  residual_norms = np.linalg.norm(blocks - low_rank, axis=(1, 2))
  shrink = np.maximum(1.0 - lam_sparse / residual_norms, 0.0)[:, None, None]
  assert np.linalg.norm(sparse - shrink * (blocks - low_rank)) < 1e-4 * scale
  # Optimality (to solver tolerance): small perturbations do not lower the objective.
  base = objective(problem.updates, sol.low_rank, sol.sparse, lam_low_rank, lam_sparse)
  rng = np.random.default_rng(0)
  for _ in range(5):
    d = 1e-3 * rng.normal(size=problem.updates.shape)
    assert objective(problem.updates, np.asarray(sol.low_rank) + d, sol.sparse, lam_low_rank,
                     lam_sparse) >= base - 1e-3


def test_svt_methods_agree(noisy):
  problem, lam_low_rank, lam_sparse = noisy
  blocks = jnp.asarray(problem.updates)
  by_svd = solver.svt_blocks(blocks, 0.3, "svd")
  for method in ("gram", "auto"):
    np.testing.assert_allclose(solver.svt_blocks(blocks, 0.3, method), by_svd, atol=1e-4)
  with pytest.raises(ValueError, match="svt_method"):
    solver.svt_blocks(blocks, 0.3, "qr")


def test_manual_steps_equal_solve(noisy):
  problem, lam_low_rank, lam_sparse = noisy
  blocks = jnp.asarray(problem.updates)
  columns = clair_jax.to_columns(blocks)
  lam_s = jnp.full((blocks.shape[0],), lam_sparse, blocks.dtype)
  state = clair_jax.init_decomposition(columns, jnp.asarray(lam_low_rank, blocks.dtype), lam_s,
                                       solver.basis_width(blocks.shape))
  assert isinstance(state, clair_jax.DecompositionState)
  step = jax.jit(clair_jax.decomposition_step)
  for _ in range(7):
    state = step(state, columns, jnp.asarray(lam_low_rank, blocks.dtype), lam_s)
  sol = clair_jax.solve_decomposition(blocks, lam_low_rank, lam_sparse, max_steps=7)
  assert int(sol.num_steps) == 7 == int(state.step)
  np.testing.assert_allclose(sol.low_rank, clair_jax.from_columns(state.low_rank), atol=1e-5)
  np.testing.assert_allclose(
      sol.sparse, clair_jax.from_columns(clair_jax.sparse_part(state, columns, lam_s)), atol=1e-5)


@pytest.fixture(scope="module")
def wide():
  """m = 128 >= 4 s: the warm-started subspace SVT is what "auto" runs."""
  problem = make_problem(num_clients=16, m=128, n=16, rank=3, fraction=0.25, noise=0.02,
                         seed=2)
  sigma = 0.02
  return (problem, sigma * (np.sqrt(128) + np.sqrt(16 * 16)),
          1.5 * sigma * np.sqrt(128 * 16))


def test_subspace_svt_matches_exact_and_falls_back_when_saturated(wide):
  problem, _, _ = wide
  x = clair_jax.stack_clients(jnp.asarray(problem.updates))
  spectrum = np.linalg.svd(np.asarray(x), compute_uv=False)
  # Three signal directions (s ~ 13-15) stand well above the rest (s < 3).
  high = 0.5 * float(spectrum[2] + spectrum[3])
  assert spectrum[2] > 4 * spectrum[3]
  exact = solver.svt_warm(x, high, None, "svd").value
  rng = np.random.default_rng(0)
  cold = jnp.linalg.qr(jnp.asarray(rng.normal(size=(128, 16)), jnp.float32))[0]
  # Few kept directions, well separated: accepted from a cold random start.
  out, next_basis, saturated = jax.jit(solver.svt_warm, static_argnames="method")(
      x, high, cold, method="subspace")
  assert not saturated
  np.testing.assert_allclose(out, exact, atol=1e-4)
  np.testing.assert_allclose(next_basis.T @ next_basis, np.eye(16), atol=1e-5)
  # A threshold that keeps more directions than the basis can hold: exact fallback.
  low = float(spectrum[30])
  assert np.sum(spectrum > low) > 16
  out_low, _, saturated = solver.svt_warm(x, low, cold, "subspace")
  assert saturated
  np.testing.assert_allclose(out_low, solver.svt_warm(x, low, None, "svd").value, atol=1e-4)
  # After a saturated step the solver asks for the exact SVT directly: same value.
  out_exact = solver.svt_warm(x, low, cold, "subspace", exact=True).value
  np.testing.assert_allclose(out_exact, out_low, atol=1e-5)
  # The exact SVT applies the kept directions with two thin GEMMs when the basis holds
  # them (3 and 14 of 16 here), with the m x m projector when it does not (30, above);
  # 14 is more than the basis may hold at the next step (16 - 4): saturated.
  for kept in (3, 14):
    threshold = 0.5 * float(spectrum[kept - 1] + spectrum[kept])
    thin = solver.svt_warm(x, threshold, cold, "subspace", exact=True)
    np.testing.assert_allclose(thin.value, solver.svt_warm(x, threshold, None, "svd").value,
                               atol=1e-4)
    assert bool(thin.saturated) == (kept > 12)
    assert np.linalg.matrix_rank(np.asarray(thin.value), tol=1e-3) == kept


def test_accurate_ritz_values_resolve_small_singular_values():
  # s_i from 1 down to 1e-3: the eigh of B B^T would give s_i only to ~eps / s_i (1e-4
  # relative at 1e-3 in float32); the SVD of B gives every one to ~eps relative.
  from clair_jax._src import subspace
  rng = np.random.default_rng(3)
  m, big_n, width = 96, 512, 12
  left = np.linalg.qr(rng.normal(size=(m, m)))[0]
  right = np.linalg.qr(rng.normal(size=(big_n, m)))[0]
  spectrum = np.geomspace(1.0, 1e-3, width)
  x = jnp.asarray((left[:, :width] * spectrum) @ right[:, :width].T, jnp.float32)
  basis = jnp.asarray(left[:, :width] @ np.linalg.qr(rng.normal(size=(width, width)))[0],
                      jnp.float32)          # the exact range, in a rotated basis
  # eps (1 / 1e-3)^2 > 1e-4: the threshold asks for the accurate Ritz values.
  pairs = jax.jit(subspace.rayleigh_ritz)(x, basis, 1e-3)
  np.testing.assert_allclose(pairs.singular_values, spectrum, rtol=2e-5)
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(pairs.vectors) * left[:, :width], 0)),
                             1.0, atol=1e-4)


def test_power_steps_stop_when_their_rate_cannot_reach_the_tolerance():
  # Singular values 1.0, 0.99, ..., a flat spectrum: the Ritz residuals of an 8-column
  # basis fall by ~(s_9 / s_8)^2 ~ 0.98 per step, so 1e-9 is out of reach in 30 steps.
  from clair_jax._src import subspace
  rng = np.random.default_rng(4)
  m, big_n, width = 64, 256, 8
  left = np.linalg.qr(rng.normal(size=(m, m)))[0]
  right = np.linalg.qr(rng.normal(size=(big_n, m)))[0]
  x = jnp.asarray((left * (1.0 - 0.01 * np.arange(m))) @ right.T, jnp.float32)
  basis = subspace.start_basis(m, width, jnp.float32)
  error = lambda p: jnp.max(p.residuals)
  never = lambda p: error(p) <= 1e-9
  capped = subspace.subspace_iteration(x, basis, never, 30)
  stopped = subspace.subspace_iteration(x, basis, never, 30, error=error, tol=1e-9)
  assert int(capped.num_iters) == 30
  assert 2 <= int(stopped.num_iters) < 10
  # A reachable tolerance is still reached, though the largest residual stalls on the way
  # (steps 8-10 here): the early stop judges the mean rate, not the last step's.
  reachable = lambda p: error(p) <= 3e-2
  reached = subspace.subspace_iteration(x, basis, reachable, 30, error=error, tol=3e-2)
  assert float(error(reached)) <= 3e-2


def test_subspace_solver_matches_svd_solver(wide):
  problem, lam_low_rank, lam_sparse = wide
  assert solver.basis_width(problem.updates.shape) > 0   # "auto" takes the subspace path
  by_svd = clair_jax.solve_decomposition(problem.updates, lam_low_rank, lam_sparse,
                                         svt_method="svd")
  auto = clair_jax.solve_decomposition(problem.updates, lam_low_rank, lam_sparse)
  assert int(auto.status) == int(by_svd.status) == solver.SUCCESSFUL
  scale = np.linalg.norm(problem.updates)
  assert np.linalg.norm(auto.low_rank - by_svd.low_rank) < 1e-4 * scale
  assert np.linalg.norm(auto.sparse - by_svd.sparse) < 1e-4 * scale


def test_status_codes(noisy):
  problem, lam_low_rank, lam_sparse = noisy
  # max_steps is static: 7, as in test_manual_steps_equal_solve (one compile for both)
  capped = clair_jax.solve_decomposition(problem.updates, lam_low_rank, lam_sparse, max_steps=7)
  assert int(capped.status) == solver.MAX_STEPS_REACHED
  assert int(capped.num_steps) == 7
  poisoned = np.array(problem.updates)
  poisoned[0, 0, 0] = np.nan
  bad = clair_jax.solve_decomposition(poisoned, lam_low_rank, lam_sparse)
  assert int(bad.status) == solver.NONFINITE
  assert clair_jax.STATUS_NAMES[int(bad.status)] == "nonfinite"


def test_no_retrace_on_second_call(noisy):
  problem, lam_low_rank, lam_sparse = noisy
  clair_jax.solve_decomposition(problem.updates, lam_low_rank, lam_sparse)
  before = solver.solve_decomposition._cache_size()
  clair_jax.solve_decomposition(problem.updates * 2, lam_low_rank * 2, lam_sparse * 2)
  assert solver.solve_decomposition._cache_size() == before
