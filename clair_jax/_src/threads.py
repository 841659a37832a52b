"""One thread for the OpenBLAS behind jaxlib's CPU LAPACK kernels.

jaxlib's CPU ``eigh``/``svd``/``qr`` call LAPACK from SciPy's bundled OpenBLAS, whose
pthreads pool runs beside XLA's own intra-op pool. On a 2-core machine the two pools
oversubscribe the cores and spin against each other: one ``1024 x 1024`` float32 ``eigh``
took 0.3-8.9 s (erratic from call to call) with OpenBLAS's default of one thread per core,
and 0.09 s with one thread; a ``64 x 64`` one 8 ms against 0.2 ms. CLAIR calls such
decompositions inside every solver step and trimming fit, and XLA already runs independent
ops in parallel, so :func:`limit_lapack_threads` sets that OpenBLAS (only SciPy's; NumPy's
own OpenBLAS is left alone) to one thread when ``clair_jax`` is imported.

Set ``CLAIR_JAX_LAPACK_THREADS`` to another count, or to ``default`` to leave OpenBLAS
untouched, before importing ``clair_jax``.
"""

from __future__ import annotations

import os

ENV_VAR = "CLAIR_JAX_LAPACK_THREADS"


def _scipy_openblas_controllers():
  try:
    import scipy  # pylint: disable=g-import-not-at-top
    import scipy.linalg.cython_lapack  # (loads the library jaxlib calls)
    from threadpoolctl import ThreadpoolController  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  scipy_root = os.path.dirname(os.path.dirname(os.path.realpath(scipy.__file__)))
  return [lib for lib in ThreadpoolController().lib_controllers
          if lib.internal_api == "openblas"
          and os.path.realpath(lib.filepath).startswith(os.path.join(scipy_root, "scipy"))]


def limit_lapack_threads(threads: int | str | None = None) -> int | None:
  """Sets SciPy's OpenBLAS (jaxlib's CPU LAPACK) to ``threads`` threads.

  Args:
    threads: a positive count, ``"default"`` to leave it alone, or ``None`` to read
      ``$CLAIR_JAX_LAPACK_THREADS`` (default 1).

  Returns:
    The count set, or ``None`` when nothing was changed (``"default"``, or no SciPy
    OpenBLAS / threadpoolctl found).

  Raises:
    ValueError: ``threads`` (or the environment variable) is neither a positive integer
      nor ``"default"``.
  """
  if threads is None:
    threads = os.environ.get(ENV_VAR, "1")
  if str(threads).strip().lower() == "default":
    return None
  try:
    count = int(threads)
  except (TypeError, ValueError):
    count = 0
  if count < 1:
    raise ValueError(f"{ENV_VAR} must be a positive integer or 'default'; got {threads!r}")
  controllers = _scipy_openblas_controllers()
  for lib in controllers:
    lib.set_num_threads(count)
  return count if controllers else None


def lapack_threads() -> list[int]:
  """Current thread counts of SciPy's OpenBLAS libraries (empty if none is loaded)."""
  return [lib.num_threads for lib in _scipy_openblas_controllers()]
