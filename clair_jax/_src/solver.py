"""Low-rank + block-sparse decomposition by accelerated proximal gradient.

Solves, for client blocks ``M_k`` (``M = [M_1, ..., M_K]``, ``m x K*n``),

.. math::
  \\min_{L, S}\\ \\tfrac12 \\|M - L - S\\|_F^2 + \\lambda_L \\|L\\|_*
    + \\lambda_S \\sum_k w_k \\|S_k\\|_F

by minimising over ``S`` in closed form: for fixed ``L`` the best ``S_k`` is the block
soft-thresholding of ``M_k - L_k``, and what is left,

.. math::
  F(L) = \\sum_k e_k(M_k - L_k) + \\lambda_L \\|L\\|_*,\\quad
  e_k(R) = \\min_Z \\tfrac12 \\|R - Z\\|_F^2 + \\lambda_S w_k \\|Z\\|_F,

has a smooth part (a Moreau envelope, a Huber function of ``||R||_F``) whose gradient
``-(R - prox(R))`` is 1-Lipschitz. FISTA (Beck & Teboulle 2009) on ``L`` alone then takes
step 1, where FISTA on the pair ``(L, S)`` needs 1/2, and ``S`` is always the best
response to ``L``: contaminated blocks leave the SVT input from the first step instead of
passing through ``L`` while ``S`` catches up (on the benchmark problem, half the steps and
no transient in the rank of ``L``). Continuation on the penalties as in APG robust PCA
(Lin et al. 2009) and Outlier Pursuit (Xu, Caramanis & Sanghavi 2012): both are multiplied
by ``c_t = max(eta^t c_0, 1)``, starting where ``(0, 0)`` is optimal.

The solver is an ``init`` / ``step`` / ``solve`` trio over a ``NamedTuple`` state, runs
inside ``jax.lax.while_loop`` and returns a :class:`DecompositionSolution` carrying a
status code, the step count and the final residual.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src import prox
from clair_jax._src import subspace
from clair_jax._src.status import Status
from clair_jax._src.subspace import from_columns
from clair_jax._src.subspace import to_columns
from clair_jax._src.svt import SVT_MAX_ITERS
from clair_jax._src.svt import basis_width
from clair_jax._src.svt import svt_blocks  # noqa: F401  (re-exported: tests, benchmarks)
from clair_jax._src.svt import svt_warm

# Status codes (clair_jax._src.status.Status); they travel through jit as int32 arrays.
SUCCESSFUL = int(Status.SUCCESSFUL)
MAX_STEPS_REACHED = int(Status.MAX_STEPS_REACHED)
NONFINITE = int(Status.NONFINITE)
NO_FINITE_CLIENTS = int(Status.NO_FINITE_CLIENTS)
STATUS_NAMES = {int(code): code.name.lower() for code in Status}



class DecompositionState(NamedTuple):
  """FISTA state on ``L`` (``S`` is a function of it, :func:`sparse_part`). ``low_rank`` is
  in the *column layout* ``(m, K, n)``: ``x.reshape(m, K * n)`` is the stacked matrix
  ``[X_1, ..., X_K]`` with no copy, so every product of the step is one plain GEMM (see
  :func:`to_columns`)."""

  step: jax.Array             # iterations taken
  low_rank: jax.Array         # L^t
  change: jax.Array           # L^t - L^{t-1}
  momentum: jax.Array         # FISTA t_k
  continuation: jax.Array     # penalty multiplier c_t >= 1
  residual: jax.Array         # relative fixed-point residual of the last step
  basis: jax.Array            # (m, s) warm start of the subspace SVT ((m, 0) when unused)
  saturated: jax.Array        # bool: the last SVT kept more than the basis holds (see svt_warm)


class DecompositionSolution(NamedTuple):
  """Result of :func:`solve_decomposition`."""

  low_rank: jax.Array   # (K, m, n)
  sparse: jax.Array     # (K, m, n)
  status: jax.Array     # int32, see STATUS_NAMES
  num_steps: jax.Array  # int32
  max_steps: int
  residual: jax.Array   # relative fixed-point residual at exit


def init_decomposition(
    columns: jax.Array,
    lam_low_rank: jax.Array,
    lam_sparse: jax.Array,
    width: int = 0,
) -> DecompositionState:
  """Initial state at ``L = 0`` with the continuation multiplier at which 0 is optimal.

  ``(0, 0)`` is optimal for penalties ``c * lam`` once ``c * lam_L >= ||M||_2`` and
  ``c * lam_S w_k >= ||M_k||_F`` for all ``k``; we start just below the smaller of these.
  With ``width > 0`` (see :func:`basis_width`) the spectral norm comes from a few power
  steps, which also warm the ``(m, width)`` SVT basis; a slight underestimate only starts
  the continuation a little lower. ``columns`` is ``M`` in the column layout ``(m, K, n)``
  (:func:`to_columns`).
  """
  dtype = columns.dtype
  m = columns.shape[0]
  block_norms = prox.safe_norm(columns, axis=(0, 2))
  if width:
    pairs = subspace.subspace_iteration(
        columns, subspace.start_basis(m, width, dtype),
        lambda p: p.residuals[0] <= 1e-3, SVT_MAX_ITERS)
    spectral, basis = pairs.singular_values[0], pairs.next_basis
  else:
    spectral = jnp.sqrt(jnp.linalg.eigvalsh(subspace.gram_of(columns))[-1])
    basis = jnp.zeros((m, 0), dtype)
  tiny = jnp.finfo(dtype).tiny
  start = jnp.minimum(
      spectral / jnp.maximum(lam_low_rank, tiny),
      jnp.max(block_norms / jnp.maximum(lam_sparse, tiny)),
  )
  zeros = jnp.zeros_like(columns)
  return DecompositionState(
      step=jnp.asarray(0, jnp.int32),
      low_rank=zeros,
      change=zeros,
      momentum=jnp.asarray(1.0, dtype),
      continuation=jnp.maximum(0.99 * start, 1.0).astype(dtype),
      residual=jnp.asarray(jnp.inf, dtype),
      basis=basis,
      saturated=jnp.asarray(False),
  )


def _best_sparse(columns, low_rank, thresholds):
  """``S_k = prox_{t_k ||.||_F}(M_k - L_k)`` for every client (column layout)."""
  return jax.vmap(prox.prox_group_lasso, in_axes=(1, 0), out_axes=1)(
      columns - low_rank, thresholds)


def sparse_part(state: DecompositionState, columns: jax.Array,
                lam_sparse: jax.Array) -> jax.Array:
  """The block-sparse part that goes with ``state.low_rank``: the best response
  ``S_k = prox_{c lam_S w_k ||.||_F}(M_k - L_k)`` (column layout)."""
  return _best_sparse(columns, state.low_rank, state.continuation * lam_sparse)


def decomposition_step(
    state: DecompositionState,
    columns: jax.Array,
    lam_low_rank: jax.Array,
    lam_sparse: jax.Array,
    *,
    continuation_factor: float = 0.7,
    svt_method: str = "auto",
    gather: bool = True,
) -> DecompositionState:
  """One FISTA step on ``L`` (step size 1, ``S`` minimised out), then one continuation
  update.

  .. math::
    Y = L^t + \\tfrac{t_{k-1} - 1}{t_k} (L^t - L^{t-1}),\\quad
    S_k(Y) = \\operatorname{prox}_{c \\lambda_S w_k \\|\\cdot\\|_F}(M_k - Y_k),\\\\
    L^{t+1} = \\operatorname{SVT}_{c \\lambda_L}\\big(Y - \\nabla e(Y)\\big)
      = \\operatorname{SVT}_{c \\lambda_L}\\big(M - S(Y)\\big)

  ``columns`` is ``M`` in the column layout ``(m, K, n)`` (:func:`to_columns`), like the
  state. ``lam_sparse`` is a ``(K,)`` array of per-client weights ``lam_S * w_k``. The
  SVT is warm-started from ``state.basis`` when it has columns (:func:`svt_warm`);
  ``gather=False`` keeps sharded clients in place (no SVD fallback). The residual is
  ``||L^{t+1} - L^t||_F / ||M||_F`` (``S`` is 1-Lipschitz in ``L``, so the pair moves
  at most ``sqrt(2)`` times that).
  """
  momentum_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.momentum**2))
  beta = (state.momentum - 1.0) / momentum_next
  extrapolated = state.low_rank + beta * state.change
  c = state.continuation
  # Materialised: fused into the GEMMs' operands, the elementwise producer is recomputed
  # per tile (measured 2x slower steps on CPU).
  svt_input = jax.lax.optimization_barrier(
      columns - _best_sparse(columns, extrapolated, c * lam_sparse))
  svt = svt_warm(svt_input, c * lam_low_rank, state.basis, svt_method, gather=gather,
                 exact=state.saturated)
  low_rank = svt.value
  scale = jnp.maximum(prox.safe_norm(columns), jnp.finfo(columns.dtype).tiny)
  # Gradient-based adaptive restart (O'Donoghue & Candes 2015): drop the momentum when
  # the step goes against the extrapolation; removes FISTA's oscillations.
  # (sum of products, not vdot: flattening the column layout would gather sharded clients)
  # With D = L^{t+1} - L^t, Y - L^{t+1} = beta (L^t - L^{t-1}) - D: the state keeps the
  # last change, not L^{t-1}, so the test and the residual read the two changes only.
  change = low_rank - state.low_rank
  change_squared = jnp.sum(change**2)
  against = beta * jnp.sum(state.change * change) - change_squared > 0
  return DecompositionState(
      step=state.step + 1,
      low_rank=low_rank,
      change=change,
      momentum=jnp.where(against, 1.0, momentum_next).astype(state.momentum.dtype),
      continuation=jnp.maximum(c * continuation_factor, 1.0),
      # (a plain norm, not safe_norm: NaN iterates must give a NaN residual)
      residual=jnp.sqrt(change_squared) / scale,
      basis=svt.basis,
      saturated=svt.saturated,
  )


@functools.partial(
    jax.jit, static_argnames=("max_steps", "continuation_factor", "svt_method", "svt_width",
                              "gather")
)
def solve_decomposition(
    blocks: jax.Array,
    lam_low_rank: jax.Array | float,
    lam_sparse: jax.Array | float,
    *,
    tol: float = 1e-4,
    max_steps: int = 500,
    continuation_factor: float = 0.7,
    svt_method: str = "auto",
    svt_width: int | None = None,
    gather: bool = True,
) -> DecompositionSolution:
  """Runs :func:`decomposition_step` until the residual is below ``tol`` at ``c = 1``.

  Args:
    blocks: ``(K, m, n)`` client blocks ``M_k`` (finite).
    lam_low_rank: nuclear-norm weight ``lambda_L > 0``.
    lam_sparse: group weight ``lambda_S``, scalar or per-client ``(K,)`` (``lambda_S w_k``).
    tol: stop when ``||L^{t+1} - L^t||_F / ||M||_F < tol`` after continuation ends.
    max_steps: iteration cap.
    continuation_factor: ``eta`` in ``c_{t+1} = max(eta c_t, 1)``.
    svt_method: ``"auto"``, ``"subspace"``, ``"gram"`` or ``"svd"``: how the SVT is
      computed (see :func:`svt_warm`; ``"auto"`` warm-starts a subspace iteration
      when ``m >= 4 s``, else uses the Gram when wide, else the SVD).
    svt_width: columns ``s`` of the warm-started basis (default 32 below ``m = 512``, else
      ``min(m / 8, 512)``; capped by ``m`` and ``K n``); it must exceed the rank of ``L``
      by a margin, else steps fall back to the exact SVT (correct, slower).
    gather: whether the exact SVT may stack (gather) the clients; ``False`` for sharded
      clients (Gram path only).

  Returns:
    :class:`DecompositionSolution`; ``status`` is ``SUCCESSFUL``, ``MAX_STEPS_REACHED`` or
    ``NONFINITE`` (iterates stopped being finite; the last iterates are returned).
  """
  return solve_columns(
      to_columns(blocks), lam_low_rank, lam_sparse, tol=tol, max_steps=max_steps,
      continuation_factor=continuation_factor, svt_method=svt_method, svt_width=svt_width,
      gather=gather)


def solve_columns(
    columns: jax.Array,
    lam_low_rank: jax.Array | float,
    lam_sparse: jax.Array | float,
    *,
    tol: float = 1e-4,
    max_steps: int = 500,
    continuation_factor: float = 0.7,
    svt_method: str = "auto",
    svt_width: int | None = None,
    gather: bool = True,
) -> DecompositionSolution:
  """:func:`solve_decomposition` on ``M`` already in the column layout ``(m, K, n)``
  (:func:`to_columns`; not jitted itself: for callers inside ``jit`` that hold the column
  layout, so the data are not transposed twice). The solution is in client blocks."""
  m, num_clients, n = columns.shape
  dtype = columns.dtype
  lam_low_rank = jnp.asarray(lam_low_rank, dtype)
  lam_sparse = jnp.broadcast_to(jnp.asarray(lam_sparse, dtype), (num_clients,))
  width = basis_width((num_clients, m, n), svt_method, svt_width)
  state = init_decomposition(columns, lam_low_rank, lam_sparse, width)

  def finite(state):
    return jnp.isfinite(state.residual) | (state.step == 0)

  def cond(state):
    converged = (state.residual < tol) & (state.continuation <= 1.0)
    return (state.step < max_steps) & ~converged & finite(state)

  def body(state):
    return decomposition_step(
        state, columns, lam_low_rank, lam_sparse,
        continuation_factor=continuation_factor, svt_method=svt_method, gather=gather,
    )

  state = jax.lax.while_loop(cond, body, state)
  converged = (state.residual < tol) & (state.continuation <= 1.0)
  status = jnp.where(
      ~finite(state), NONFINITE, jnp.where(converged, SUCCESSFUL, MAX_STEPS_REACHED)
  ).astype(jnp.int32)
  return DecompositionSolution(
      low_rank=from_columns(state.low_rank),
      sparse=from_columns(sparse_part(state, columns, lam_sparse)),
      status=status,
      num_steps=state.step,
      max_steps=max_steps,
      residual=state.residual,
  )
