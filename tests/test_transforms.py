"""jit, vmap over independent problems, repeated calls, no retrace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clair_jax
from clair_jax._src import estimator
from problems import make_problem


# The default 20 x 48 x 12, rank 3 problem of tests/problems.py: the eager calls below
# load the program test_estimator compiles for that shape.


def test_jit_matches_eager_and_does_not_retrace():
  problem = make_problem(fraction=0.25, noise=0.02, rank=3, seed=7)
  traces = []

  @jax.jit
  def detect(updates):
    traces.append(1)
    return clair_jax.clair(updates, 3)

  first = detect(problem.updates)
  second = detect(problem.updates * 3.0)
  assert len(traces) == 1
  eager = clair_jax.clair(problem.updates, 3)
  np.testing.assert_array_equal(first.contaminated, eager.contaminated)
  np.testing.assert_array_equal(second.contaminated, eager.contaminated)
  np.testing.assert_allclose(second.refined, 3.0 * np.asarray(eager.refined), rtol=1e-4,
                             atol=1e-5)
  # The library's own jitted core is cached too.
  size = estimator._clair_compiled._cache_size()
  clair_jax.clair(problem.updates + 1e-3, 3)
  assert estimator._clair_compiled._cache_size() == size


@pytest.mark.slow   # the batched program of the whole pipeline, compiled for this check alone
def test_vmap_over_independent_problems():
  problems = [make_problem(fraction=f, attack=a, noise=0.02, rank=3, seed=s)
              for f, a, s in [(0.2, "random", 1), (0.3, "coherent", 2), (0.1, "random", 3)]]
  batch = jnp.stack([p.updates for p in problems])
  batched = jax.vmap(lambda u: clair_jax.clair(u, 3))(batch)
  assert batched.subspace.shape == (3, 48, 3)
  for i, problem in enumerate(problems):
    single = clair_jax.clair(problem.updates, 3)
    np.testing.assert_array_equal(batched.contaminated[i], problem.contaminated)
    np.testing.assert_array_equal(batched.contaminated[i], single.contaminated)
    np.testing.assert_allclose(batched.refined[i], single.refined, atol=1e-4)


def test_rank_none_inside_jit_is_a_clear_error():
  problem = make_problem(num_clients=5, m=8, n=3, rank=1, seed=1)
  try:
    jax.jit(lambda u: clair_jax.clair(u))(problem.updates)
  except ValueError as error:
    assert "rank=None" in str(error)
  else:
    raise AssertionError("expected ValueError")
