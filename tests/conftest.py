"""Shared test configuration: small, deterministic problems; matplotlib off-screen.

Two paths (issue 14):

- ``python -m pytest -q -n 2`` is the default, fast path (target: under 3 minutes on 2
  cores from a cold compilation cache). pyproject's ``addopts`` deselect the tests marked
  ``@pytest.mark.slow``.
- ``python -m pytest -q -n 2 -m ""`` runs everything (``-m slow``: only the slow ones);
  ``.ci/run`` does this, so every slow test still runs in CI.

``slow`` marks end-to-end runs (CLI studies, notebooks, benchmarks, the 4-device
subprocess, real Flower simulation) and the cases that compile a full CLAIR program for
one check alone (a dtype, shape or option variant whose code path a default test already
covers). A slow mark never replaces an assertion: what a slow test checks stays as strict,
and each feature keeps a fast representative in the default path (e.g. bfloat16 stays,
float16 and float64 are slow). Prefer the shared problem shape of ``tests/problems.py``
(20 x 48 x 12, rank 3) in new fast tests: its program is compiled once per run.
``CLAIR_JAX_TEST_CACHE_DIR=$(mktemp -d)`` runs with an empty compilation cache (a cold
run, the fresh-clone timing).

The suite is dominated by XLA compilation on 2 cores (a full ``clair`` pipeline takes
~10 s of CPU to compile at any size, ~1 s to load from the cache), so:

- JAX's persistent compilation cache lives under ``.pytest_cache/jax``. It is set in the
  environment as well as in ``jax.config``, so the pytest-xdist workers, the CLI runs
  inside tests (``CLAIR_JAX_CACHE_DIR``) *and* the processes the tests start (the
  4-device sharding check, the notebook kernels) share it: a program compiled by one of
  them is a cache hit for the others. On a fresh clone the folder starts empty and is
  created by the first compile; nothing outside the clone is read.
- Tests are scheduled with ``--dist loadgroup`` (pyproject ``addopts``): each test module
  goes to one worker as a whole (its tests share shapes, options and module fixtures, so
  they share compiles in memory), except the modules listed in ``_SPLIT_BY_TEST``, whose
  tests are spread one function (with all its parameters) at a time, and the slow tests
  of ``_SPLIT_SLOW`` (each compiles programs of its own; most of the module's default-path
  tests share the default problem's program and stay together, so a cold run compiles it
  once, not once per worker). The order below only decides which group starts first:
  the long end-to-end groups first, the notebooks last (their kernels then load what the
  text-copy and synthetic-study runs compiled).
  Scheduling changes no test and no check.
"""

import os
import pathlib

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

# CLAIR_JAX_TEST_CACHE_DIR moves the folder (an empty temporary one measures a cold run).
_CACHE = pathlib.Path(os.environ.get("CLAIR_JAX_TEST_CACHE_DIR")
                      or pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax")
# In the environment before JAX is imported: this process and every child read it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The CLI (cli.main -> use_compilation_cache) would otherwise point the process at the
# user's ~/.cache/clair_jax/jax: the first directory JAX opens is the one it keeps, so a
# worker whose first compile ran inside a CLI test would leave the shared folder, and a
# warm home cache would hide compile time from a fresh clone's run.
os.environ["CLAIR_JAX_CACHE_DIR"] = str(_CACHE)

import jax  # noqa: E402  (after the environment is set)

# Also through jax.config, in case a plugin imported JAX before this file ran.
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Modules whose tests compile mostly different programs (options, dtypes, shapes): one
# xdist group per test function rather than one per module, for balance.
_SPLIT_BY_TEST = {"test_factored.py"}
_SPLIT_SLOW = {"test_estimator.py"}

# Start order (lower first); any other group keeps its collection order, in between.
_FIRST = ("test_benchmarks.py", "test_text_copy_e2e.py", "test_synthetic_study.py",
          "test_sharding.py", "test_factored.py", "test_estimator.py")
_LAST = ("test_notebooks.py",)


def _group(item) -> str:
  module = item.path.name
  if module in _SPLIT_BY_TEST or (module in _SPLIT_SLOW and item.get_closest_marker("slow")):
    return f"{module}::{getattr(item, 'originalname', item.name)}"
  return module


def _rank(item) -> int:
  module = item.path.name
  if module in _FIRST:
    return _FIRST.index(module)
  if module in _LAST:
    return len(_FIRST) + 2
  return len(_FIRST) + 1


@pytest.hookimpl(tryfirst=True)   # before xdist's hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    item.add_marker(pytest.mark.xdist_group(_group(item)))
  items.sort(key=_rank)   # stable: collection order inside each rank
