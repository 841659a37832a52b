"""The shared robust statistics (clair_jax._src.robust) and that nothing else redefines them."""

import ast
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from clair_jax._src import robust

PACKAGE = pathlib.Path(robust.__file__).resolve().parents[1]


def test_upper_fence_is_median_plus_scaled_mad():
  rng = np.random.default_rng(0)
  values = rng.lognormal(size=31)
  mask = rng.random(31) < 0.8
  kept = values[mask]
  mad = np.median(np.abs(kept - np.median(kept)))
  expected = np.median(kept) + 3.0 * 1.482602218505602 * mad
  np.testing.assert_allclose(robust.upper_fence(jnp.asarray(values), jnp.asarray(mask), 3.0),
                             expected, rtol=1e-6)
  centre, deviation = robust.mad(jnp.asarray(values), jnp.asarray(mask))
  np.testing.assert_allclose([centre, deviation], [np.median(kept), mad], rtol=1e-6)


@pytest.mark.parametrize("quantile", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_masked_quantile_matches_numpy(quantile):
  rng = np.random.default_rng(1)
  values = rng.normal(size=20)
  mask = rng.random(20) < 0.6
  np.testing.assert_allclose(
      robust.masked_quantile(jnp.asarray(values), jnp.asarray(mask), quantile),
      np.quantile(values[mask], quantile), rtol=1e-6)
  assert float(robust.masked_median(jnp.asarray(values), jnp.zeros(20, bool))) == 0.0


def test_finite_clients_any_trailing_shape():
  x = np.ones((4, 2, 3, 5), np.float32)
  x[1, 0, 2, 4] = np.nan
  x[3, 1, 0, 0] = np.inf
  assert robust.finite_clients(jnp.asarray(x)).tolist() == [True, False, True, False]
  assert robust.finite_clients(jnp.ones((3, 7))).tolist() == [True] * 3


def _float_literals(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Constant) and isinstance(node.value, float):
      yield node.value


def test_the_mad_constant_lives_in_one_module():
  """Every robust cut reads MAD_TO_STD from the robust module (no second copy of 1.4826)."""
  copies = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if p.name != "robust.py"
            and any(abs(v - 1.4826) < 1e-3 for v in _float_literals(p))]
  assert copies == []
