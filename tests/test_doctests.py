"""The examples in the public docstrings run and print what they say."""

import doctest
import importlib

import pytest

# api's example compiles the whole clair pipeline at its own 10 x 32 x 8, rank 2 (slow);
# prox and refine keep the docstring examples in the default path.
MODULES = (pytest.param("clair_jax._src.api", marks=pytest.mark.slow), "clair_jax._src.prox",
           "clair_jax._src.refine")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
