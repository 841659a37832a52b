"""The examples in the public docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ("clair_jax._src.api", "clair_jax._src.prox", "clair_jax._src.refine")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
