"""Shared test configuration: small, deterministic problems; matplotlib off-screen.

The two pytest-xdist workers share JAX's persistent compilation cache (a folder under
``.pytest_cache``), so a shape compiled by one worker is a cache hit for the other; the
suite is dominated by compilation on 2 cores.
"""

import os
import pathlib

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402  (after the environment is set)

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
