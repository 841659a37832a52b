"""The public entry point: dense or factored client updates -> :class:`ClairResult`.

It sits above the dense core (``estimator``) and the factored reduction (``factored``),
which imports the dense core: the module graph stays one-way.
"""

from __future__ import annotations

from collections.abc import Sequence

from clair_jax._src import estimator
from clair_jax._src import factored

# What ``options=`` takes besides a whole ClairOptions (annotations only).
OptionGroup = (estimator.DetectionOptions | estimator.WeightOptions | estimator.SolverOptions
               | estimator.RefineOptions)


def clair(updates, rank: int | None = None, *, client_weights=None,
          options: estimator.ClairOptions | OptionGroup | Sequence[OptionGroup] | None = None,
          **overrides) -> estimator.ClairResult:
  """Detects contaminated clients, recovers the shared subspace and refines benign updates.

  Stacking the client updates ``M = [D_1, ..., D_K]`` (``m x K n``), CLAIR solves

  .. math::
    \\min_{L,S}\\ \\tfrac12\\|M - L - S\\|_F^2 + \\lambda_L\\|L\\|_*
      + \\lambda_S \\sum_k w_k \\|S_k\\|_F

  with noise-calibrated weights, then runs a rank-aware trimming loop from the convex
  solution and from a client-count consensus start (which defeats coherent groups, also
  ones with larger norms), keeps the split that explains a majority of clients best, fits
  ``U`` (top-``r`` left singular vectors of the benign updates) and refines each benign
  client by partial pooling inside a refine subspace chosen from data,
  ``U_R (C_bar + S (C_k - C_bar))`` (:func:`clair_jax.refine_updates`; ``refine=
  "projection"`` gives the paper's ``U U^T D_k``).

  Jittable (``rank`` and options static) and vmappable over a leading problem axis.
  ``rank=None`` picks the rank from data (:func:`estimate_rank`) and needs concrete input.

  Args:
    updates: ``(K, m, n)`` float array (bf16/f16 are computed in f32), ``K >= 3``.
      A client with any NaN/Inf (or a squared norm that overflows) is flagged and
      excluded from every fit and statistic.
    rank: shared-subspace dimension ``1 <= r <= min(m, K n)``, or ``None``.
    client_weights: optional ``(K,)`` nonnegative ``w_k`` in the group penalty.
    options: a :class:`ClairOptions` (e.g. kept and reused across calls), the base that
      keywords update; or one option group (:class:`DetectionOptions`,
      :class:`WeightOptions`, :class:`SolverOptions`, :class:`RefineOptions`) or a list
      or tuple of groups, the other fields at their defaults; default all defaults.
    **overrides: any field of :class:`ClairOptions` (``tol=1e-6``), or a whole group by
      its keyword (``detection=``, ``weights=``, ``solver=``, ``refine=``:
      ``solver=SolverOptions(tol=1e-6)``; ``refine`` given a string is the flat method
      name). A group states every field of its group, defaults included: one field
      stated twice with different values (by a group in ``options``, a group keyword or
      a flat keyword) raises a ``ValueError`` naming it. Float fields are traced: a new
      value does not recompile; shapes, method names and step caps are static.

  Sharding: ``updates`` sharded on the client axis (``NamedSharding(mesh, P("clients"))``)
  is solved in place: every client-wise step runs where the client lives, the ``m x m``
  Gram sums (and ``(K,)`` score vectors) are the only cross-device traffic, and the
  per-client outputs come back sharded the same way. With ``svt_method="auto"`` the SVT's
  exact fallback is the Gram there (the SVD would gather the stacked matrix).
  A :class:`clair_jax.FactoredUpdates` is solved by :func:`clair_jax.clair_factored` (the
  exact reduction; never dense).

  Returns:
    :class:`ClairResult`.

  Raises:
    ValueError: bad shapes, dtype, rank or options (a grouped option is named by its path,
      ``"solver.tol"``), conflicting option values; or (for concrete input) no finite
      client.
    TypeError: ``options`` or a group keyword of the wrong type, or an unknown option.

  Example:
    >>> import jax, jax.numpy as jnp, clair_jax
    >>> key = jax.random.PRNGKey(0)
    >>> basis = jnp.linalg.qr(jax.random.normal(key, (32, 2)))[0]
    >>> coef = jax.random.normal(jax.random.PRNGKey(1), (10, 2, 8))
    >>> updates = jnp.einsum("mr,krn->kmn", basis, coef)
    >>> updates = updates.at[:3].set(jax.random.normal(key, (3, 32, 8)))
    >>> clair_jax.clair(updates, rank=2).contaminated.tolist()  # doctest: +ELLIPSIS
    [True, True, True, False, ...]

    Options by group or flat, the same object:

    >>> opts = clair_jax.ClairOptions.grouped(solver=clair_jax.SolverOptions(tol=1e-5))
    >>> opts == clair_jax.ClairOptions(tol=1e-5), opts.solver.tol
    (True, 1e-05)
  """
  # Resolved and validated here, so grouped options are named by their path in errors;
  # the dense and factored paths then see valid flat fields.
  fields = estimator.resolve_options(options, **overrides)._asdict()
  if isinstance(updates, factored.FactoredUpdates):
    return factored.clair_factored(updates, rank, client_weights=client_weights, **fields)
  return estimator.clair_dense(updates, rank, client_weights=client_weights, **fields)
