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
from clair_jax._src.subspace import from_columns
from clair_jax._src.subspace import stack_clients
from clair_jax._src.subspace import to_columns
from clair_jax._src.subspace import unstack_clients

# Status codes; they travel through jit as int32 arrays.
SUCCESSFUL = 0
MAX_STEPS_REACHED = 1
NONFINITE = 2
NO_FINITE_CLIENTS = 3
STATUS_NAMES = {
    SUCCESSFUL: "successful",
    MAX_STEPS_REACHED: "max_steps_reached",
    NONFINITE: "nonfinite",
    NO_FINITE_CLIENTS: "no_finite_clients",
}

SVT_METHODS = ("auto", "subspace", "gram", "svd")
# Warm-started SVT: Ritz residual tolerance (relative to s_1^2) and power steps per call.
SVT_TOL = 1e-5
SVT_MAX_ITERS = 8
# Default SVT basis width (see basis_width): 32 columns below m = 512, else min(m / 8, 512).
DEFAULT_SVT_WIDTH = 32
WIDE_BASIS_FROM = 512
MAX_SVT_WIDTH = 512


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


class WarmSvt(NamedTuple):
  """Result of :func:`svt_warm`."""

  value: jax.Array      # SVT_t(x), shaped like x
  basis: jax.Array      # (m, s) next warm start
  saturated: jax.Array  # bool: more than s - max(2, s/4) singular values exceed t


class DecompositionSolution(NamedTuple):
  """Result of :func:`solve_decomposition`."""

  low_rank: jax.Array   # (K, m, n)
  sparse: jax.Array     # (K, m, n)
  status: jax.Array     # int32, see STATUS_NAMES
  num_steps: jax.Array  # int32
  max_steps: int
  residual: jax.Array   # relative fixed-point residual at exit


def svt_blocks(blocks: jax.Array, threshold: jax.Array, method: str = "auto") -> jax.Array:
  """SVT of the stacked matrix ``[X_1, ..., X_K]``, taking and returning ``(K, m, n)`` blocks.

  ``method="gram"`` eigen-decomposes ``sum_k X_k X_k^T`` (with clients sharded, the sum is
  the only cross-device reduction). ``"auto"`` uses the Gram when the stacked matrix is
  wide (``m <= K*n``) and falls back to the SVD when the threshold is too small for the
  Gram spectrum to be accurate (:func:`clair_jax._src.prox.gram_is_accurate`).
  ``"subspace"`` needs the solver's warm start (see :func:`svt_warm`); here it is
  ``"auto"``.
  """
  if method not in SVT_METHODS:
    raise ValueError(f"svt_method must be one of {SVT_METHODS}, got {method!r}")
  return unstack_clients(svt_warm(stack_clients(blocks), threshold, None, method).value,
                         blocks.shape[0])


def _saturation_guard(width: int) -> int:
  """Spare basis columns required beyond the kept directions (see :func:`svt_warm`)."""
  return max(2, width // 4)


def _full_svt(x, threshold, method, gather, width):
  """Exact SVT of ``x`` (``m x N``, or ``(m, K, n)`` columns; Gram ``eigh`` or SVD) as a
  :class:`WarmSvt` whose basis is the top-``width`` left singular vectors."""
  m = x.shape[0]
  if method in ("auto", "subspace"):
    # Sharded clients (gather=False): the Gram is a sum over clients; the SVD would stack.
    method = ("gram_checked" if m <= x.size // m else "svd") if gather else "gram"
  # With no basis (width 0) nothing saturates: every step is exact anyway.
  limit = width - _saturation_guard(width) if width else m

  def by_svd(x):
    out, (left, _, _, shrunk) = prox.svt_from_svd(x.reshape(m, -1), threshold)
    return WarmSvt(out.reshape(x.shape), left[:, :width], jnp.sum(shrunk > 0) > limit)

  if method == "svd":
    return by_svd(x)
  vectors, singular_values, factor = prox.gram_svt_factors(subspace.gram_of(x), threshold)

  top, top_factor = vectors[:, ::-1][:, :width], factor[::-1][:width]
  kept = jnp.sum(factor > 0)

  def by_projector(x):
    projector = (vectors * factor[None, :]) @ vectors.T
    return WarmSvt(jnp.tensordot(projector, x, axes=(1, 0)), top, kept > limit)

  def by_top(x):
    value = jnp.tensordot(top * top_factor[None, :], jnp.tensordot(top, x, axes=(0, 0)),
                          axes=(1, 0))
    return WarmSvt(value, top, kept > limit)

  def by_gram(x):
    if not 0 < 2 * width < m:
      return by_projector(x)
    # When the basis holds every kept direction, two thin (m x s) GEMMs apply the SVT
    # instead of the m x m projector: m / (2 s) times fewer flops.
    return jax.lax.cond(kept <= width, by_top, by_projector, x)

  if method == "gram":
    return by_gram(x)
  accurate = prox.gram_is_accurate(singular_values[-1], threshold, x.dtype)
  # Only kept singular values need accuracy; if none is kept the Gram answer (0) is exact.
  accurate = accurate | ~jnp.any(factor > 0)
  return jax.lax.cond(accurate, by_gram, by_svd, x)


def svt_warm(
    x: jax.Array,
    threshold: jax.Array,
    basis: jax.Array | None,
    method: str = "auto",
    *,
    gather: bool = True,
    exact: jax.Array | bool = False,
) -> WarmSvt:
  """SVT of ``x`` (``m x N``, or ``(m, K, n)`` columns) from a warm-started subspace.

  With an ``(m, s)`` orthonormal ``basis`` (the previous FISTA step's), ``"auto"`` and
  ``"subspace"`` run :func:`clair_jax._src.subspace.subspace_iteration` and use the Ritz
  pairs: ``SVT_t(X) = V diag((1 - t/s_i)_+) V^T X`` (``V``, ``s_i`` from
  :func:`clair_jax._src.subspace.accurate_rotation` where ``eps (s_1 / t)^2 > 1e-4``,
  unless clients are sharded: the squared spectrum leaves shrink factors near ``t`` off
  by about that, which stalls FISTA above its tolerance), three thin GEMMs instead of
  the Gram GEMM, an ``m x m`` ``eigh`` and the apply GEMM. The result is accepted when

  * at most ``s - max(2, s/4)`` Ritz values exceed ``t`` (a saturated basis could miss a
    kept direction), and
  * the top and every kept Ritz pair have residual ``||G v - s^2 v|| <= 1e-5 s_1^2``
    (within 8 power steps) and the threshold passes
    :func:`clair_jax._src.prox.gram_is_accurate`;

  otherwise the exact SVT is taken (Gram ``eigh``, or the SVD where the Gram is not
  accurate and ``gather`` allows stacking the clients). The power steps also stop early
  when their observed convergence rate cannot meet the tolerance within the cap (the
  exact SVT is then cheaper than more steps). ``exact=True`` (traced) skips the subspace
  iteration: the solver sets it after a saturated step, whose ``L`` the basis could not
  hold. ``basis=None`` or ``s = 0`` means exact SVT with ``method`` (``"auto"``: Gram
  when wide, else SVD).

  Returns:
    :class:`WarmSvt`: ``SVT_t(x)`` shaped like ``x``, the next basis ``(m, s)`` and
    whether the kept directions saturate it.
  """
  width = 0 if basis is None else basis.shape[1]
  if method not in ("auto", "subspace") or width == 0:
    return _full_svt(x, threshold, method, gather, width)
  limit = width - _saturation_guard(width)
  exact_svt = lambda x: _full_svt(x, threshold, method, gather, width)

  def saturated(pairs):
    return jnp.sum(pairs.singular_values > threshold) > limit

  def kept_residual(pairs):
    # The top pair is always checked: Ritz values only bound the singular values from
    # below, so "nothing above t" needs a converged s_1 (a cold basis sees only a part).
    checked = (pairs.singular_values > threshold).at[0].set(True)
    return jnp.max(jnp.where(checked, pairs.residuals, 0.0))

  def converged(pairs):
    kept = pairs.singular_values > threshold
    accurate = prox.gram_is_accurate(pairs.singular_values[0], threshold, x.dtype)
    return (kept_residual(pairs) <= SVT_TOL) & (accurate | ~jnp.any(kept))

  def warm(x):
    pairs = subspace.subspace_iteration(
        x, basis, lambda p: saturated(p) | converged(p), SVT_MAX_ITERS,
        refine_below=threshold if gather else None, error=kept_residual, tol=SVT_TOL)

    def from_pairs(x):
      factor = prox.shrink_factors(pairs.singular_values, threshold)
      value = jnp.tensordot(pairs.vectors * factor[None, :], pairs.coefficients, axes=(1, 0))
      return WarmSvt(value, pairs.next_basis, jnp.asarray(False))

    accept = converged(pairs) & ~saturated(pairs)
    return jax.lax.cond(accept, from_pairs, exact_svt, x)

  return jax.lax.cond(exact, exact_svt, warm, x)


def basis_width(shape: tuple[int, int, int], method: str = "auto",
              width: int | None = None) -> int:
  """Columns ``s`` of the warm-started SVT basis; 0 means exact SVT every step.

  ``"subspace"`` uses ``width`` (default 32 for ``m < 512``, else ``min(m / 8, 512)``;
  at most ``m`` and ``K n``): while ``L`` has more than ``3 s / 4`` directions the step
  falls back to the ``m x m`` Gram ``eigh``, which at ``m = 4096`` costs ~10 times a
  512-wide iteration and, in float32, is coarse near the threshold (FISTA can then stall
  just above its tolerance). Many contaminated clients leave ``L`` holding ~9% of ``m``
  directions at ``c = 1`` (their residuals, shrunk by the group penalty: 88 of 1024 at
  ``K = 128``, 20% contaminated LoRA clients), which ``3/4`` of ``m / 8`` holds (LoRA
  problems at ``m = 768`` with 20-40% contaminated clients converge in 20-24 steps, as
  fast as with ``m / 4``; the dense ``m = 512`` benchmark, whose ``L`` holds 39
  directions, runs 1.4x faster with 64 columns than with 128); below ``m = 512`` the
  32-column basis is the cheaper one and held ``L`` in every problem we ran.
  ``"auto"`` does the same when the thin products win, i.e. ``m >= 4 s``, and is exact
  SVT otherwise.
  """
  num_clients, m, n = shape
  if method not in ("auto", "subspace"):
    return 0
  if not width:
    width = DEFAULT_SVT_WIDTH if m < WIDE_BASIS_FROM else min(m // 8, MAX_SVT_WIDTH)
  width = min(width, m, num_clients * n)
  if method == "auto" and m < 4 * width:
    return 0
  return width



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
