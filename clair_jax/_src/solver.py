"""Low-rank + block-sparse decomposition by accelerated proximal gradient.

Solves, for client blocks ``M_k`` (``M = [M_1, ..., M_K]``, ``m x K*n``),

.. math::
  \\min_{L, S}\\ \\tfrac12 \\|M - L - S\\|_F^2 + \\lambda_L \\|L\\|_*
    + \\lambda_S \\sum_k w_k \\|S_k\\|_F

with FISTA (Beck & Teboulle 2009) on the pair ``(L, S)`` (the smooth part has Lipschitz
constant 2, so the step is 1/2) and continuation on the penalties as in APG robust PCA
(Lin et al. 2009) and Outlier Pursuit (Xu, Caramanis & Sanghavi 2012): both penalties are
multiplied by ``c_t = max(eta^t c_0, 1)``, starting where ``(0, 0)`` is optimal.

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
from clair_jax._src.subspace import stack_clients
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

SVT_METHODS = ("auto", "svd", "gram")


class DecompositionState(NamedTuple):
  """FISTA state. ``low_rank`` and ``sparse`` are ``(K, m, n)`` client blocks."""

  step: jax.Array             # iterations taken
  low_rank: jax.Array         # L^t
  sparse: jax.Array           # S^t
  prev_low_rank: jax.Array    # L^{t-1}
  prev_sparse: jax.Array      # S^{t-1}
  momentum: jax.Array         # FISTA t_k
  continuation: jax.Array     # penalty multiplier c_t >= 1
  residual: jax.Array         # relative fixed-point residual of the last step


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

  ``method="gram"`` builds ``sum_k X_k X_k^T`` block by block (no stacking; with clients
  sharded on axis 0 the sum is the only cross-device reduction). ``"auto"`` uses the Gram
  path when the stacked matrix is wide (``m <= K*n``) and falls back to the SVD when the
  threshold is too small for the Gram spectrum to be accurate
  (:func:`clair_jax._src.prox.gram_is_accurate`).
  """
  num_clients, m, n = blocks.shape
  if method not in SVT_METHODS:
    raise ValueError(f"svt_method must be one of {SVT_METHODS}, got {method!r}")
  if method == "auto":
    method = "gram_checked" if m <= num_clients * n else "svd"

  def by_svd(blocks):
    return unstack_clients(prox.prox_nuclear(stack_clients(blocks), threshold), num_clients)

  if method == "svd":
    return by_svd(blocks)

  gram = jnp.einsum("kmn,kpn->mp", blocks, blocks)
  vectors, singular_values, factor = prox.gram_svt_factors(gram, threshold)
  keep = factor > 0

  def by_gram(blocks):
    projector = (vectors * factor[None, :]) @ vectors.T
    return jnp.einsum("mp,kpn->kmn", projector, blocks)

  if method == "gram":
    return by_gram(blocks)
  accurate = prox.gram_is_accurate(singular_values[-1], threshold, blocks.dtype)
  # Only kept singular values need accuracy; if none is kept the Gram answer (0) is exact.
  accurate = accurate | ~jnp.any(keep)
  return jax.lax.cond(accurate, by_gram, by_svd, blocks)


def init_decomposition(
    blocks: jax.Array,
    lam_low_rank: jax.Array,
    lam_sparse: jax.Array,
) -> DecompositionState:
  """Initial state at ``L = S = 0`` with the continuation multiplier at which 0 is optimal.

  ``(0, 0)`` is optimal for penalties ``c * lam`` once ``c * lam_L >= ||M||_2`` and
  ``c * lam_S w_k >= ||M_k||_F`` for all ``k``; we start just below the smaller of these.
  """
  dtype = blocks.dtype
  block_norms = prox.safe_norm(blocks, axis=(1, 2))
  spectral = jnp.sqrt(jnp.linalg.eigvalsh(jnp.einsum("kmn,kpn->mp", blocks, blocks))[-1])
  tiny = jnp.finfo(dtype).tiny
  start = jnp.minimum(
      spectral / jnp.maximum(lam_low_rank, tiny),
      jnp.max(block_norms / jnp.maximum(lam_sparse, tiny)),
  )
  zeros = jnp.zeros_like(blocks)
  return DecompositionState(
      step=jnp.asarray(0, jnp.int32),
      low_rank=zeros,
      sparse=zeros,
      prev_low_rank=zeros,
      prev_sparse=zeros,
      momentum=jnp.asarray(1.0, dtype),
      continuation=jnp.maximum(0.99 * start, 1.0).astype(dtype),
      residual=jnp.asarray(jnp.inf, dtype),
  )


def decomposition_step(
    state: DecompositionState,
    blocks: jax.Array,
    lam_low_rank: jax.Array,
    lam_sparse: jax.Array,
    *,
    continuation_factor: float = 0.7,
    svt_method: str = "auto",
) -> DecompositionState:
  """One FISTA step on ``(L, S)`` with step size 1/2, then one continuation update.

  .. math::
    Y = X^t + \\tfrac{t_{k-1} - 1}{t_k} (X^t - X^{t-1}),\\quad
    G = Y_L + Y_S - M,\\\\
    L^{t+1} = \\operatorname{SVT}_{c \\lambda_L / 2}(Y_L - G/2),\\quad
    S^{t+1}_k = \\operatorname{prox}_{c \\lambda_S w_k / 2 \\|\\cdot\\|_F}(Y_{S,k} - G_k/2)

  ``lam_sparse`` is a ``(K,)`` array of per-client weights ``lam_S * w_k``.
  """
  momentum_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * state.momentum**2))
  beta = (state.momentum - 1.0) / momentum_next
  y_low_rank = state.low_rank + beta * (state.low_rank - state.prev_low_rank)
  y_sparse = state.sparse + beta * (state.sparse - state.prev_sparse)
  half_gradient = 0.5 * (y_low_rank + y_sparse - blocks)
  c = state.continuation
  low_rank = svt_blocks(y_low_rank - half_gradient, 0.5 * c * lam_low_rank, svt_method)
  sparse = prox.prox_group_lasso_blocks(y_sparse - half_gradient, 0.5 * c * lam_sparse)
  change = jnp.sqrt(jnp.sum((low_rank - state.low_rank) ** 2)
                    + jnp.sum((sparse - state.sparse) ** 2))
  scale = jnp.maximum(prox.safe_norm(blocks), jnp.finfo(blocks.dtype).tiny)
  # Gradient-based adaptive restart (O'Donoghue & Candes 2015): drop the momentum when
  # the step goes against the extrapolation; removes FISTA's oscillations.
  against = (jnp.vdot(y_low_rank - low_rank, low_rank - state.low_rank)
             + jnp.vdot(y_sparse - sparse, sparse - state.sparse)) > 0
  return DecompositionState(
      step=state.step + 1,
      low_rank=low_rank,
      sparse=sparse,
      prev_low_rank=state.low_rank,
      prev_sparse=state.sparse,
      momentum=jnp.where(against, 1.0, momentum_next).astype(state.momentum.dtype),
      continuation=jnp.maximum(c * continuation_factor, 1.0),
      residual=change / scale,
  )


@functools.partial(
    jax.jit, static_argnames=("max_steps", "continuation_factor", "svt_method")
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
) -> DecompositionSolution:
  """Runs :func:`decomposition_step` until the residual is below ``tol`` at ``c = 1``.

  Args:
    blocks: ``(K, m, n)`` client blocks ``M_k`` (finite).
    lam_low_rank: nuclear-norm weight ``lambda_L > 0``.
    lam_sparse: group weight ``lambda_S``, scalar or per-client ``(K,)`` (``lambda_S w_k``).
    tol: stop when ``||X^{t+1} - X^t||_F / ||M||_F < tol`` after continuation ends.
    max_steps: iteration cap.
    continuation_factor: ``eta`` in ``c_{t+1} = max(eta c_t, 1)``.
    svt_method: ``"auto"``, ``"svd"`` or ``"gram"`` (see :func:`svt_blocks`).

  Returns:
    :class:`DecompositionSolution`; ``status`` is ``SUCCESSFUL``, ``MAX_STEPS_REACHED`` or
    ``NONFINITE`` (iterates stopped being finite; the last iterates are returned).
  """
  dtype = blocks.dtype
  lam_low_rank = jnp.asarray(lam_low_rank, dtype)
  lam_sparse = jnp.broadcast_to(jnp.asarray(lam_sparse, dtype), blocks.shape[:1])
  state = init_decomposition(blocks, lam_low_rank, lam_sparse)

  def finite(state):
    return jnp.isfinite(state.residual) | (state.step == 0)

  def cond(state):
    converged = (state.residual < tol) & (state.continuation <= 1.0)
    return (state.step < max_steps) & ~converged & finite(state)

  def body(state):
    return decomposition_step(
        state, blocks, lam_low_rank, lam_sparse,
        continuation_factor=continuation_factor, svt_method=svt_method,
    )

  state = jax.lax.while_loop(cond, body, state)
  converged = (state.residual < tol) & (state.continuation <= 1.0)
  status = jnp.where(
      ~finite(state), NONFINITE, jnp.where(converged, SUCCESSFUL, MAX_STEPS_REACHED)
  ).astype(jnp.int32)
  return DecompositionSolution(
      low_rank=state.low_rank,
      sparse=state.sparse,
      status=status,
      num_steps=state.step,
      max_steps=max_steps,
      residual=state.residual,
  )
