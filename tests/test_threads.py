"""jaxlib's CPU LAPACK runs on one OpenBLAS thread once clair_jax is imported."""

import os
import subprocess
import sys

import pytest

import clair_jax  # noqa: F401  (the import sets the limit)
from clair_jax._src import threads


def _run(code: str, env_value: str | None) -> str:
  env = dict(os.environ)
  env.pop(threads.ENV_VAR, None)
  if env_value is not None:
    env[threads.ENV_VAR] = env_value
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, check=True)
  return done.stdout.strip() + done.stderr


CHECK = ("import clair_jax; from clair_jax._src import threads; "
         "print(threads.lapack_threads())")


def test_import_sets_one_thread():
  if not threads.lapack_threads():
    pytest.skip("no SciPy OpenBLAS in this environment")
  assert threads.lapack_threads() == [1] * len(threads.lapack_threads())


@pytest.mark.parametrize("value, expected", [("2", "[2"), ("default", None)])
def test_environment_variable_overrides(value, expected):
  if not threads.lapack_threads():
    pytest.skip("no SciPy OpenBLAS in this environment")
  out = _run(CHECK, value)
  if expected is None:  # left alone: OpenBLAS's own default (one per core here)
    assert "[1]" not in out or os.cpu_count() == 1
  else:
    assert out.startswith(expected)


def test_bad_value_warns_and_import_still_works():
  out = _run(CHECK, "many")
  assert "CLAIR_JAX_LAPACK_THREADS must be a positive integer" in out
  with pytest.raises(ValueError, match="positive integer"):
    threads.limit_lapack_threads("0")
