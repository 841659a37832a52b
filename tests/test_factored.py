"""Factored (LoRA) input: the exact reduction agrees with the dense solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax
from problems import orthonormal, sin_theta

RANK = 2


def lora_problem(num_clients=12, m=40, n=30, q=5, bad=(1, 5, 7), noise=0.01, seed=0,
                 ranks=None):
  """Benign ``A_k = U C_k + noise``, contaminated ``A_k`` random; ``B_k`` Gaussian.

  ``ranks`` (per client) zero-pads clients to a common ``q``.
  """
  rng = np.random.default_rng(seed)
  basis = orthonormal(rng, m, RANK)
  left = np.einsum("mr,krq->kmq", basis, rng.normal(size=(num_clients, RANK, q)))
  left += noise * rng.normal(size=left.shape)
  left[list(bad)] = rng.normal(size=(len(bad), m, q)) / np.sqrt(m / RANK)
  right = rng.normal(size=(num_clients, q, n))
  if ranks is not None:
    for k, r_k in enumerate(ranks):
      left[k, :, r_k:] = 0.0
      right[k, r_k:, :] = 0.0
  contaminated = np.zeros(num_clients, bool)
  contaminated[list(bad)] = True
  factored = clair_jax.FactoredUpdates(jnp.asarray(left, jnp.float32),
                                       jnp.asarray(right, jnp.float32))
  return factored, basis, contaminated


@pytest.mark.parametrize("dense_weights", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_factored_equals_dense(dense_weights):
  factored, basis, contaminated = lora_problem()
  dense = factored.dense()
  from_dense = clair_jax.clair(dense, RANK)
  result = clair_jax.clair_factored(factored, RANK, dense_weights=dense_weights)
  np.testing.assert_array_equal(result.contaminated, contaminated)
  np.testing.assert_array_equal(result.contaminated, from_dense.contaminated)
  assert sin_theta(result.subspace, np.asarray(from_dense.subspace)) < 1e-4
  assert sin_theta(result.subspace, basis) < 0.05
  np.testing.assert_allclose(result.subspace.T @ result.subspace, np.eye(RANK), atol=1e-5)
  assert isinstance(result.refined, clair_jax.FactoredUpdates)
  scale = float(jnp.max(jnp.abs(dense)))
  np.testing.assert_allclose(result.refined.dense(), from_dense.refined, atol=1e-4 * scale)
  # Scores are residual ratios; the structure test counts noise dof in reduced coordinates.
  np.testing.assert_allclose(result.scores, from_dense.scores, rtol=2e-2)
  if dense_weights:
    # Same convex program: same weights, noise level and decomposition.
    np.testing.assert_allclose(result.lam_low_rank, from_dense.lam_low_rank, rtol=1e-4)
    np.testing.assert_allclose(result.noise_level, from_dense.noise_level, rtol=1e-4)
    np.testing.assert_allclose(result.low_rank.dense(), from_dense.low_rank, atol=1e-3 * scale)
    np.testing.assert_allclose(result.sparse.dense(), from_dense.sparse, atol=1e-3 * scale)
  # L + S + E = M with the factored blocks too: L + S stays close to the data.
  fit = result.low_rank.dense() + result.sparse.dense()
  assert float(jnp.linalg.norm(fit - dense)) < 0.5 * float(jnp.linalg.norm(dense))


@pytest.mark.slow   # one-off compile variants (keep / project outputs, right side)
def test_refined_shapes_and_kept_clients():
  factored, _, contaminated = lora_problem()
  result = clair_jax.clair(factored, RANK)   # dispatch from clair()
  num_clients, m, q = factored.left.shape
  width = result.refine_subspace.shape[1]
  assert result.refined.left.shape == (num_clients, m, max(width, q))
  # Benign clients share the refine factor U_R; kept clients are as sent.
  benign = np.flatnonzero(~contaminated)
  np.testing.assert_allclose(result.refined.left[benign[0], :, :width], result.refine_subspace,
                             atol=1e-6)
  np.testing.assert_allclose(result.refined.left[benign[-1]], result.refined.left[benign[0]])
  bad = np.flatnonzero(contaminated)
  np.testing.assert_array_equal(result.refined.left[bad, :, :q], factored.left[bad])
  np.testing.assert_allclose(result.refined.dense()[bad], factored.dense()[bad], rtol=1e-6)
  projected = clair_jax.clair(factored, RANK, contaminated_output="project")
  u = projected.subspace
  np.testing.assert_allclose(projected.refined.dense()[bad],
                             jnp.einsum("mr,pr,kpn->kmn", u, u, factored.dense()[bad]),
                             atol=1e-4)


def test_mixed_ranks_nonfinite_and_right_side():
  # Ranks > RANK: a benign client of rank <= r has no spectral tail, and the structure
  # test then flags it (reported to the core owner; same on the dense path).
  ranks = [5, 3, 4, 5, 3, 5, 3, 5, 4, 5, 5, 3]
  factored, _, contaminated = lora_problem(ranks=ranks, seed=1)
  left = np.array(factored.left)
  left[3, 0, 0] = np.nan
  factored = factored._replace(left=jnp.asarray(left))
  expected = contaminated.copy()
  expected[3] = True
  result = clair_jax.clair(factored, RANK)
  np.testing.assert_array_equal(result.contaminated, expected)
  assert np.isinf(result.scores[3])
  assert np.all(np.isfinite(np.asarray(result.subspace)))
  # side="right" on the transposed factors gives the same answer.
  transposed = factored.transpose()
  right_side = clair_jax.clair(transposed, RANK, side="right")
  np.testing.assert_array_equal(right_side.contaminated, expected)
  assert sin_theta(right_side.subspace, np.asarray(result.subspace)) < 1e-4
  assert isinstance(right_side.refined, clair_jax.FactoredUpdates)
  np.testing.assert_allclose(right_side.refined.dense(),
                             jnp.swapaxes(result.refined.dense(), 1, 2), atol=1e-4)


def test_flax_and_peft_orientation():
  rng = np.random.default_rng(2)
  num_clients, d_in, d_out, r = 4, 6, 5, 2
  lora_a = rng.normal(size=(num_clients, d_in, r)).astype(np.float32)
  lora_b = rng.normal(size=(num_clients, r, d_out)).astype(np.float32)
  x = rng.normal(size=(3, d_in)).astype(np.float32)
  flax = clair_jax.from_flax_lora(lora_a, lora_b)
  assert flax.shape == (num_clients, d_in, d_out)
  # Flax: y = x @ lora_a @ lora_b = x @ Delta W  (Delta W is in x out).
  np.testing.assert_allclose(x @ flax.dense()[0], x @ lora_a[0] @ lora_b[0], rtol=1e-5)
  peft_a = rng.normal(size=(num_clients, r, d_in)).astype(np.float32)   # (r, in)
  peft_b = rng.normal(size=(num_clients, d_out, r)).astype(np.float32)  # (out, r)
  peft = clair_jax.from_peft_lora(peft_a, peft_b)
  assert peft.shape == (num_clients, d_out, d_in)
  # PyTorch: y = x W^T with Delta W = B A (out x in).
  np.testing.assert_allclose(x @ peft.dense()[0].T, x @ peft_a[0].T @ peft_b[0].T, rtol=1e-5)


def test_bad_factor_shapes_raise():
  left = jnp.zeros((5, 8, 3))
  with pytest.raises(ValueError, match="inner"):
    clair_jax.clair(clair_jax.FactoredUpdates(left, jnp.zeros((5, 4, 6))), 1)
  with pytest.raises(ValueError, match="same number of clients"):
    clair_jax.clair(clair_jax.FactoredUpdates(left, jnp.zeros((4, 3, 6))), 1)
  with pytest.raises(ValueError, match="3-D"):
    clair_jax.clair(clair_jax.FactoredUpdates(left[0], jnp.zeros((3, 6))), 1)
  with pytest.raises(ValueError, match="lora_a"):
    clair_jax.from_flax_lora(jnp.zeros((5, 8, 3), jnp.int32), jnp.zeros((5, 3, 6)))
  with pytest.raises(ValueError, match="exceeds the rank"):
    clair_jax.clair(clair_jax.FactoredUpdates(jnp.ones((3, 8, 1)), jnp.ones((3, 1, 6))), 4)


@pytest.mark.slow   # K = 128 LoRA clients at 768: one large compile
def test_many_contaminated_lora_clients_with_full_column_space_converge():
  # K q >= m: the reduced problem is m x K q and L keeps ~9% of m directions (residuals
  # of the 19 contaminated clients). With Ritz values from the eigh of the squared
  # spectrum, or a basis too narrow for L (exact Gram eigh every step), float32 shrink
  # factors near the threshold were off by percents and FISTA stalled at a residual of
  # ~2.5e-4 until max_steps (500).
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  from factored_run import make_lora_problem
  left, right, bad = make_lora_problem(768, 32, 96, 16, rank=4, fraction=0.2)
  result = clair_jax.clair(clair_jax.FactoredUpdates(jnp.asarray(left), jnp.asarray(right)), 4)
  assert result.status_name == "successful", (int(result.solver_steps),
                                              float(result.solver_residual))
  assert int(result.solver_steps) < 100
  np.testing.assert_array_equal(np.asarray(result.contaminated), bad)


@pytest.mark.parametrize("case", ["generic", "zero_columns", "duplicates", "huge", "tiny"])
def test_orthonormal_coordinates_from_the_gram(case):
  """``Q = S_1 C`` is orthonormal on the span and ``Q F = S``: Cholesky for independent
  columns, the Gram's eigen-decomposition for dependent ones, any finite scale."""
  from clair_jax._src import factored as factored_lib
  rng = np.random.default_rng(0)
  stacked = rng.standard_normal((200, 48))
  if case == "zero_columns":
    stacked[:, 5:9] = 0.0                 # zero-padded clients of a lower rank
  if case == "duplicates":
    stacked[:, 24:] = stacked[:, :24]     # a second copy of every client: rank 24
  scale = {"huge": 1e30, "tiny": 1e-30}.get(case, 1.0)
  stacked = jnp.asarray(stacked * scale, jnp.float32)
  basis, coordinates = jax.jit(factored_lib.orthonormal_coordinates)(stacked)
  q = np.asarray(basis.dense(), np.float64)
  used = np.linalg.norm(q, axis=0) > 0.5
  rank = {"zero_columns": 44, "duplicates": 24}.get(case, 48)
  assert used.sum() == rank
  np.testing.assert_allclose(q[:, used].T @ q[:, used], np.eye(rank), atol=1e-3)
  np.testing.assert_allclose(q @ np.asarray(coordinates, np.float64) / scale,
                             np.asarray(stacked, np.float64) / scale, atol=1e-4)
  assert np.all(np.isfinite(np.asarray(coordinates)))
