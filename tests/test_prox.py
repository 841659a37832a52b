"""Kernels: NumPy references, optimality conditions, safety at zero (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax

enable_x64 = lambda: jax.enable_x64(True)


def numpy_svt(x, t):
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  return (u * np.maximum(s - t, 0)) @ vt


def numpy_group(x, t):
  norm = np.linalg.norm(x)
  return np.zeros_like(x) if norm <= t else (1 - t / norm) * x


@pytest.mark.parametrize("shape", [(7, 11), (11, 7), (6, 6)])
@pytest.mark.parametrize("threshold", [0.0, 0.8, 2.5, 100.0])
def test_svt_matches_numpy(shape, threshold):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  np.testing.assert_allclose(clair_jax.prox_nuclear(x, threshold), numpy_svt(x, threshold),
                             atol=2e-5)
  np.testing.assert_allclose(clair_jax.prox_nuclear_gram(x, threshold),
                             numpy_svt(x, threshold), atol=5e-4)


def test_svt_optimality_conditions():
  """X - Z in t * subdifferential of ||Z||_* : X - Z = t U_r V_r^T + W, W perp, ||W||_2 <= t."""
  rng = np.random.default_rng(2)
  x, t = rng.normal(size=(9, 14)), 1.7
  with enable_x64():
    z = np.asarray(clair_jax.prox_nuclear(jnp.asarray(x), t))
  u, s, vt = np.linalg.svd(z, full_matrices=False)
  r = int(np.sum(s > 1e-9))
  assert 0 < r < 9
  u_r, v_r = u[:, :r], vt[:r].T
  w = x - z - t * u_r @ v_r.T
  np.testing.assert_allclose(u_r.T @ w, 0, atol=1e-9)
  np.testing.assert_allclose(w @ v_r, 0, atol=1e-9)
  assert np.linalg.norm(w, 2) <= t + 1e-9


def test_group_optimality_conditions():
  rng = np.random.default_rng(3)
  blocks = rng.normal(size=(5, 4, 3))
  blocks[1] *= 0.1  # below threshold: must vanish
  thresholds = np.full(5, 1.2)
  with enable_x64():
    z = np.asarray(clair_jax.prox_group_lasso_blocks(jnp.asarray(blocks), thresholds))
  for x_k, z_k, t in zip(blocks, z, thresholds):
    np.testing.assert_allclose(z_k, numpy_group(x_k, t), atol=1e-12)
    if np.linalg.norm(z_k) > 0:   # X - Z = t Z / ||Z||
      np.testing.assert_allclose(x_k - z_k, t * z_k / np.linalg.norm(z_k), atol=1e-12)
    else:                         # 0 is optimal iff ||X|| <= t
      assert np.linalg.norm(x_k) <= t
  assert np.all(z[1] == 0)


def test_zero_block_and_zero_singular_values_are_safe():
  zero = jnp.zeros((4, 6), jnp.float32)
  low_rank = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 7.0))  # singular values 0 x3
  for x in (zero, low_rank):
    out = clair_jax.prox_nuclear(x, 0.5)
    assert bool(jnp.all(jnp.isfinite(out)))
    grad = jax.grad(lambda x: jnp.sum(clair_jax.prox_nuclear(x, 0.5) ** 2))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))
    grad_t = jax.grad(lambda t, x=x: jnp.sum(clair_jax.prox_nuclear(x, t)))(0.5)
    assert bool(jnp.isfinite(grad_t))
  np.testing.assert_array_equal(clair_jax.prox_nuclear(zero, 0.5), 0.0)
  np.testing.assert_array_equal(clair_jax.prox_nuclear_gram(zero, 0.5), 0.0)
  np.testing.assert_array_equal(clair_jax.prox_group_lasso(zero, 0.5), 0.0)
  grad = jax.grad(lambda x: jnp.sum(clair_jax.prox_group_lasso(x, 0.5)))(zero)
  np.testing.assert_array_equal(grad, 0.0)
  # Exactly at the threshold the block vanishes and the gradient stays finite.
  at_threshold = jnp.ones((2, 2)) * 0.25  # norm 0.5
  np.testing.assert_array_equal(clair_jax.prox_group_lasso(at_threshold, 0.5), 0.0)
  assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: jnp.sum(clair_jax.safe_norm(x)))(zero))))


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
def test_svt_jvp_matches_finite_differences(shape):
  rng = np.random.default_rng(4)
  with enable_x64():
    x, dx = jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=shape))
    f = lambda x, t: clair_jax.prox_nuclear(x, t)
    _, tangent = jax.jvp(f, (x, 1.1), (dx, 0.3))
    h = 1e-6
    numeric = (f(x + h * dx, 1.1 + 0.3 * h) - f(x - h * dx, 1.1 - 0.3 * h)) / (2 * h)
    np.testing.assert_allclose(tangent, numeric, atol=1e-7)


def test_group_prox_is_vmapped_per_client_thresholds():
  blocks = jnp.ones((3, 2, 2))  # each block norm 2
  out = clair_jax.prox_group_lasso_blocks(blocks, jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(out[0], 0.5 * blocks[0])
  np.testing.assert_array_equal(out[1:], 0.0)
