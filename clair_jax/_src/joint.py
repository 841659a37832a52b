r"""Whole-model CLAIR: per-module detection, one joint verdict, refinement with that set.

A model's adapter has ``J`` LoRA modules; client ``k`` sends, per module ``j``, the factored
update ``D_jk = left_jk right_jk`` (``m_j x n_j``, rank ``q``). Three steps, each one
function here:

1. :func:`detect_modules`: CLAIR's detection on every module, by the exact factored
   reduction (:func:`clair_jax.clair_factored`'s, with its default reduced calibration), a
   batch of same-shape modules per compiled call (``jax.vmap`` over modules, or
   ``jax.lax.map`` on the CPU: :func:`over_modules`).
2. :func:`joint_verdict`: one verdict per client from the ``(J, K)`` scores.
3. :func:`refine_modules`: every module refined with the jointly benign set (the same
   clients for all modules), still factored.

Joint verdict (one per client, across ``J`` modules). Each module ``j`` gives CLAIR scores
``s_jk`` and a threshold ``t_j`` (``contaminated_jk = s_jk > t_j``). A data attacker's
update is only moderately off the benign subspace in each single module, but it is off in
*most* modules, so the evidence is pooled: the joint score is the geometric mean of the
normalised scores, ``z_k = exp(mean_j log(s_jk / t_j))`` (``+inf`` if any module is
non-finite). Averaging ``J`` noisy per-module statistics shrinks the benign spread, and the
cut is then set on ``z`` by the same robust logic CLAIR uses per module: client ``k`` is
contaminated iff ``z_k > 1`` (beyond a typical module threshold) or
``z_k > med + 3 * 1.4826 * MAD``, with ``med`` and ``MAD`` the median and median absolute
deviation of ``z`` over all finite clients (breakdown 1/2: valid while fewer than half are
contaminated). One step, not iterated: re-estimating the MAD on the clients below the
last cut measures a sample truncated at that cut, whose spread is biased low, so the
iteration peels off the benign tail step by step (with heavy-tailed benign scores,
lognormal in a simulation of 5-20 benign clients and 2 attackers, 15-20% of rounds
flagged a benign client, against 0.6% for the one step; on the text-copy study it flagged
the benign clients whose data were rarest, 2 of 105 on ``copy`` at the ``cpu`` size). Every module is then refined with the jointly benign clients, so that all
modules refine with the same client set.

Refinement with a given benign set ``B`` (the core's refine, in coordinates shared by every
client). With ``Q`` (``m x p``) and ``P`` (``n x n'``) orthonormal bases of
``span(left_1, ..., left_K)`` and ``span(right_1^T, ..., right_K^T)``, every update is
``D_k = Q W_k P^T`` with ``W_k = (Q^T left_k)(right_k P)`` (``p x n'``) exactly, and Frobenius
norms, Gram spectra, geometric medians and SVDs commute with this embedding; the core's
:func:`clair_jax._src.estimator.refine_stage` (partial pooling, or the projection) runs on
the ``W_k`` with the benign mask ``B``, and its output lifts back as

.. math::
  \tilde D_k = (Q U)\,\big((1 - S) \bar C + S\, (Q U)^\top \mathrm{left}_k\,
  \mathrm{right}_k\big),\qquad \bar C \leftarrow \bar C P^\top,

``U`` (``p x w``) the refine subspace, ``C_bar`` the robust centre and ``S = diag(s)`` the
pooling strength. Since ``(Q U)^T D_k P P^T = (Q U)^T D_k`` (``P`` spans every right factor),
the client's own coefficients need only its factors: :class:`ModuleRefinement` keeps the
shared factor ``Q U`` (``m x w``), ``C_bar P^T`` (``w x n``), ``s`` and the small
``(Q U)^T left_k`` (``w x q``), never the ``(K, w, n)`` coefficients. Every finite client,
flagged or not, is refined this way (flagged clients never enter the statistics).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src import client_stack
from clair_jax._src import estimator
from clair_jax._src import factored
from clair_jax._src import robust
from clair_jax._src import validate

# The robust cut on joint scores: median + MAD_MULTIPLIER * 1.4826 * MAD, capped at 1.
MAD_MULTIPLIER = 3.0
# Floor on a normalised score before its log (a score of exactly 0 would give -inf).
SCORE_FLOOR = 1e-12


# --------------------------------------------------------------------------- joint verdict


class JointVerdict(NamedTuple):
  """One contamination verdict per client across modules.

  Attributes:
    contaminated: ``(K,)`` bool, ``joint_scores > cut``.
    joint_scores: ``(K,)`` geometric mean over modules of ``scores / threshold`` (``+inf``
      for a client that is non-finite in some module).
    cut: the final cut on ``joint_scores`` (at most 1).
    module_scores: ``(J, K)`` per-module CLAIR scores (NaN read as ``+inf``).
    module_thresholds: ``(J,)`` per-module thresholds.
    module_flags: ``(J, K)`` bool, per-module verdicts ``scores > threshold``.
  """

  contaminated: np.ndarray
  joint_scores: np.ndarray
  cut: float
  module_scores: np.ndarray
  module_thresholds: np.ndarray
  module_flags: np.ndarray


def robust_cut(joint, *, mad_multiplier: float = MAD_MULTIPLIER) -> float:
  r"""Robust outlier cut on the joint scores, in one step (see the module docstring).

  .. math::
    c = \min\big(1,\ \operatorname{med}(z) + c_{\mathrm{MAD}} \cdot 1.4826\,
        \operatorname{MAD}(z)\big)

  over the finite scores (breakdown 1/2). Not iterated on the clients below the cut: that
  sample is truncated at the cut, its MAD is biased low, and the iteration flags the
  benign tail.

  Args:
    joint: ``(K,)`` joint scores (``+inf`` allowed, never counted in the statistics).
    mad_multiplier: ``c_MAD`` (default 3).

  Returns:
    The cut, a float ``<= 1`` (``1`` when no score is finite).
  """
  joint = np.asarray(joint, np.float64)
  values = joint[np.isfinite(joint)]
  if values.size == 0:
    return 1.0
  med = np.median(values)
  mad = robust.MAD_TO_STD * np.median(np.abs(values - med))
  return float(min(1.0, med + mad_multiplier * mad))


def joint_verdict(scores, thresholds, *, mad_multiplier: float = MAD_MULTIPLIER) -> JointVerdict:
  r"""One verdict per client from per-module scores (the rule in the module docstring).

  .. math::
    z_k = \exp\Big(\frac1J \sum_j \log \frac{s_{jk}}{t_j}\Big),\qquad
    \text{contaminated}_k = z_k > \text{robust\_cut}(z).

  Args:
    scores: ``(J, K)`` per-module scores (``+inf`` / NaN allowed: read as ``+inf``).
    thresholds: ``(J,)`` positive per-module thresholds.
    mad_multiplier: see :func:`robust_cut`.

  Returns:
    :class:`JointVerdict`.

  Raises:
    ValueError: shapes that do not match, or a threshold ``<= 0``.
  """
  scores = np.asarray(scores, dtype=np.float64)
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if scores.ndim != 2 or thresholds.shape != scores.shape[:1]:
    raise ValueError(f"joint_verdict expects scores (J, K) and thresholds (J,); got "
                     f"{scores.shape} and {thresholds.shape}.")
  if np.any(~(thresholds > 0)):
    raise ValueError(f"thresholds must be positive; got {thresholds}.")
  scores = np.where(np.isnan(scores), np.inf, scores)
  normalised = np.maximum(scores / thresholds[:, None], SCORE_FLOOR)
  joint = np.exp(np.mean(np.log(normalised), axis=0))
  cut = robust_cut(joint, mad_multiplier=mad_multiplier)
  return JointVerdict(joint > cut, joint, cut, scores, thresholds,
                      scores > thresholds[:, None])


# --------------------------------------------------------------------------- detection


class ModuleDetection(NamedTuple):
  """Per-module detection (leading axis: modules when batched). ``K`` clients.

  Attributes:
    contaminated: ``(K,)`` bool, the module's own verdict.
    scores: ``(K,)`` CLAIR scores (``+inf`` for non-finite clients).
    threshold: scalar (``contaminated == scores > threshold``).
    noise_level: noise std per reduced degree of freedom (see
      :func:`clair_jax.clair_factored`).
    status: int32 convex-solver status (``clair_jax.STATUS_NAMES``).
    solver_steps: int32 convex-solver steps.
    trim_steps: int32 trimming steps of the winning start.
  """

  contaminated: jax.Array
  scores: jax.Array
  threshold: jax.Array
  noise_level: jax.Array
  status: jax.Array
  solver_steps: jax.Array
  trim_steps: jax.Array


def detection_options(opts: estimator.ClairOptions) -> estimator.ClairOptions:
  """The options of the detection pass: the refine is replaced by the (cheap) projection.

  Detection (scores, threshold, split) never reads the refine, and the joint refine
  (:func:`refine_modules`) redoes it with the jointly benign set, so the per-module
  pooled refine (a ``p x p`` eigen-decomposition and more) would be wasted.
  """
  return opts._replace(refine="projection", refine_rank=None, refine_max_rank=None)


def detect_module(left, right, client_weights, rank: int,
                  opts: estimator.ClairOptions) -> ModuleDetection:
  """Traced body: :func:`factored.reduce_factored` -> :func:`estimator.clair_core`.

  The same detection as ``clair_jax.clair(FactoredUpdates(left, right), rank, **opts)``
  (reduced calibration, ``dense_weights=False``).

  Args:
    left: ``(K, m, q)``.
    right: ``(K, q, n)``.
    client_weights: ``(K,)`` group-penalty weights.
    rank: static detection rank.
    opts: static :class:`clair_jax.ClairOptions` (see :func:`detection_options`).

  Returns:
    :class:`ModuleDetection`.
  """
  reduction = factored.reduce_factored(factored.FactoredUpdates(left, right))
  core = estimator.clair_core(reduction.blocks, client_weights, rank, opts)
  return ModuleDetection(core.contaminated, core.scores, core.threshold, core.noise_level,
                         core.status, core.solver_steps, core.trim_steps)


def default_batching() -> str:
  """``"map"`` on the CPU, ``"vmap"`` elsewhere (see :func:`over_modules`)."""
  return "map" if jax.default_backend() == "cpu" else "vmap"


def over_modules(fn, batching: str):
  """``fn(left, right)`` of one module -> the same over a leading module axis.

  ``"vmap"`` merges the modules into one batched program (every LAPACK call batched over
  modules: the fast choice on GPUs). ``"map"`` (``jax.lax.map``) runs them one after the
  other inside one compiled call. On the CPU, jaxlib 0.10's LAPACK kernels split a batched
  call over the intra-op thread pool and block until its chunks finish
  (``jax::ParallelBatchMap``); when the thunk executor runs as many independent batched
  LAPACK calls at once as the pool has threads (2 on a 2-core machine; vmapping modules
  makes such concurrent calls common), every pool thread waits on chunks that no thread is
  left to run and the call never returns (seen here: K = 32, 256 x 256 modules, two per
  batch, all threads idle in ``BlockingCounter::Wait`` under ``lapack_sgeqrf_ffi`` and
  ``lapack_sgesdd_ffi``). ``"map"`` keeps one module's program at a time, as an
  unbatched ``clair`` call does.
  """
  if batching == "vmap":
    return jax.vmap(fn)
  if batching == "map":
    return lambda left, right: jax.lax.map(lambda pair: fn(*pair), (left, right))
  raise ValueError(f"batching must be 'vmap' or 'map'; got {batching!r}")


@functools.partial(jax.jit, static_argnames=("rank", "opts", "batching"))
def detect_modules(left, right, client_weights, rank: int, opts: estimator.ClairOptions,
                   batching: str = "vmap") -> ModuleDetection:
  """:func:`detect_module` on a batch of same-shape modules (:func:`over_modules`).

  Args:
    left: ``(J, K, m, q)``.
    right: ``(J, K, q, n)``.
    client_weights: ``(K,)``, shared by the modules.
    rank: static detection rank.
    opts: static options.
    batching: ``"vmap"`` or ``"map"`` over modules (static).

  Returns:
    :class:`ModuleDetection` with a leading ``J`` axis.
  """
  one = lambda left_j, right_j: detect_module(left_j, right_j, client_weights, rank, opts)
  return over_modules(one, batching)(left, right)


# --------------------------------------------------------------------------- refinement


class ModuleRefinement(NamedTuple):
  """One module refined with a given benign set, factored (leading axis: modules).

  Client ``k``'s refined update is ``shared @ right_k`` with
  ``right_k = (1 - s) centre + s (coefficients[k] @ right_factor_k)``, ``s = strength``
  broadcast over rows and ``right_factor_k`` the client's own ``(q, n)`` right factor; the
  consensus is ``shared @ centre``. Columns of ``shared`` beyond ``rank`` are zero.

  Attributes:
    shared: ``(m, w)`` the lifted refine subspace ``Q U`` (orthonormal used columns).
    centre: ``(w, n)`` robust centre of the benign coefficients, lifted: ``C_bar P^T``.
    strength: ``(w,)`` pooling strength per direction (0 pools, 1 keeps the client's own).
    coefficients: ``(K, w, q)`` ``shared^T left_k``.
    rank: int32 directions used (the refined LoRA rank).
    noise_level: the refine's per-entry noise std (reduced coordinates).
    saturated: bool, more directions passed than ``w`` holds.
  """

  shared: jax.Array
  centre: jax.Array
  strength: jax.Array
  coefficients: jax.Array
  rank: jax.Array
  noise_level: jax.Array
  saturated: jax.Array


def _benign_subspace(clients: client_stack.FactoredClients, benign, rank: int):
  """Top-``rank`` left singular vectors of the benign clients' stack (its Gram)."""
  _, vectors = jnp.linalg.eigh(clients.masked(benign).gram())
  return vectors[:, ::-1][:, :rank]


def _largest(x):
  largest = jnp.max(jnp.abs(x))
  return jnp.where(largest > 0, largest, 1.0)


def refine_module(left, right, benign, rank: int,
                  opts: estimator.ClairOptions) -> ModuleRefinement:
  """Traced body: the core's refine of one module with the benign set ``benign``.

  Builds the shared coordinates ``W_k = (Q^T left_k)(right_k P)`` (module docstring),
  normalises by the median client norm as :func:`estimator.clair_core` does, runs
  :func:`estimator.refine_stage` (pooling, or with ``opts.refine == "projection"`` the
  projection on the top-``rank`` subspace of the benign clients) and lifts the result.

  Args:
    left: ``(K, m, q)`` finite.
    right: ``(K, q, n)`` finite.
    benign: ``(K,)`` bool, the clients whose statistics are used.
    rank: static rank of the projection (``refine="projection"``).
    opts: static options (``refine``, ``refine_strength``, ``refine_rank``,
      ``refine_max_rank``, ``subspace_noise``).

  Returns:
    :class:`ModuleRefinement`.
  """
  dtype = validate.compute_dtype(jnp.result_type(left.dtype, right.dtype))
  left, right = left.astype(dtype), right.astype(dtype)
  num_clients = left.shape[0]
  column, left_reduced = factored.reduce_columns(left)                 # Q, Q^T left_k
  row, right_coordinates = factored.reduce_columns(jnp.swapaxes(right, 1, 2))
  right_reduced = jnp.swapaxes(right_coordinates, 1, 2)                # (K, q, n') right_k P
  # (K, p, n') clients as factors, each factor first divided by its largest entry so that
  # no squared norm over- or underflows, then by the median client norm.
  left_scale, right_scale = _largest(left_reduced), _largest(right_reduced)
  clients = client_stack.FactoredClients(left_reduced / left_scale, right_reduced / right_scale)
  norms = jnp.sqrt(clients.sq_norms())
  everyone = jnp.ones((num_clients,), bool)
  median = robust.masked_median(norms, everyone)
  median = jnp.where(median > 0, median, jnp.max(norms))
  median = jnp.where(median > 0, median, 1.0)
  x_n = clients.scaled(1.0 / median)
  scale = median * left_scale * right_scale
  projection_rank = min(rank, *x_n.shape[1:])
  if opts.refine == "projection":
    subspace = _benign_subspace(x_n, benign, projection_rank)
  else:  # the pooled refine fits its own subspace; this one is not read
    subspace = jnp.zeros((x_n.shape[1], projection_rank), dtype)
  refinement = estimator.refine_stage(x_n, benign, everyone, subspace, opts, scale)
  shared = factored.lift(column, refinement.subspace)                  # (m, w)
  centre = factored.lift(row, (refinement.centre * scale).T).T          # (w, n)
  return ModuleRefinement(
      shared=shared,
      centre=centre,
      strength=refinement.strength,
      coefficients=jnp.einsum("mw,kmq->kwq", shared, left),
      rank=refinement.rank,
      noise_level=refinement.noise_level * scale,
      saturated=refinement.saturated,
  )


@functools.partial(jax.jit, static_argnames=("rank", "opts", "batching"))
def refine_modules(left, right, benign, rank: int, opts: estimator.ClairOptions,
                   batching: str = "vmap") -> ModuleRefinement:
  """:func:`refine_module` on a batch of same-shape modules (:func:`over_modules`).

  Args:
    left: ``(J, K, m, q)``.
    right: ``(J, K, q, n)``.
    benign: ``(K,)`` bool, shared by every module.
    rank: static projection rank.
    opts: static options.
    batching: ``"vmap"`` or ``"map"`` over modules (static).

  Returns:
    :class:`ModuleRefinement` with a leading ``J`` axis.
  """
  one = lambda left_j, right_j: refine_module(left_j, right_j, benign, rank, opts)
  return over_modules(one, batching)(left, right)


def refined_right(refinement: ModuleRefinement, index: int, right_factor) -> np.ndarray:
  r"""Client ``index``'s refined right factor, ``(1 - s) C_bar + s (Q U)^T left_k right_k``.

  Args:
    refinement: one module's :class:`ModuleRefinement` (NumPy or JAX arrays, no batch axis).
    index: the client's position.
    right_factor: ``(q, n)`` the client's right factor (as in the stacked input).

  Returns:
    ``(w, n)`` NumPy array in the refinement's precision (float32 or float64).
  """
  dtype = np.promote_types(np.asarray(refinement.centre).dtype, np.float32)
  s = np.asarray(refinement.strength, dtype)[:, None]
  own = np.asarray(refinement.coefficients[index], dtype) @ np.asarray(right_factor, dtype)
  return (1.0 - s) * np.asarray(refinement.centre, dtype) + s * own
