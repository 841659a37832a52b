r"""Refinement: partial pooling of benign clients inside a data-chosen shared subspace.

Given the client updates ``D_k`` (``m x n``) and a benign set ``B`` (from detection),

.. math::
  \hat U = \operatorname{top}_{\hat r}\operatorname{left-sv}\big([D_k]_{k \in B}\big),
  \qquad C_k = \hat U^\top D_k,\qquad
  \tilde D_k = \hat U\big(\bar C + S (C_k - \bar C)\big)\quad (k \in B),

with ``C_bar`` a robust centre (Huber, from the geometric median) of the benign coefficients and ``S`` a
shrinkage of the client deviations: ``S = 0`` gives every benign client one pooled update
``U C_bar`` (best when clients need the same change), ``S = I`` gives the projection
``U U^T D_k`` of the CLAIR paper (best when they differ a lot). Clients outside ``B`` are
returned as sent.

The server-only default (``strength="auto"``) chooses ``S`` per principal direction of the
benign deviations by the Gavish-Donoho optimal singular-value shrinker (an empirical-Bayes /
James-Stein rule that knows where the noise bulk ends); the refine rank ``r_hat`` counts the
directions the data resolve above pure noise (Tracy-Widom edge), in the benign stack and in
the robust centre, each also without its largest single-client share. Both need the
per-entry noise level, estimated from benign off-subspace residuals unless given. See
:func:`refine_updates` for the derivation, the assumptions and the robustness argument.
:func:`choose_strength` is the alternative that needs the clients: a federated evaluation
round of held-out losses, aggregated by a median over the benign set.

The output stays in LoRA form (:func:`refined_factors`): left factor ``U`` (``m x w``, rank
``r_hat`` on the ``m`` side), right factor ``C_bar + S (C_k - C_bar)`` per client.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src import client_stack
from clair_jax._src import robust
from clair_jax._src import subspace as subspace_lib

# Robust z-score (Gaussian 0.999 quantile) above which a client's deviation norm is clipped
# in the between-client scatter (Huber-type weights): benign clients are almost never
# clipped, and a client's influence on the scatter is bounded.
CLIP_Z = 3.090232306167813
# 0.95 quantile of the Tracy-Widom (beta = 1) law: the rank threshold keeps a direction when
# pure noise would show a singular value that large in fewer than 5% of problems.
TW_QUANTILE_Z = 0.9793
# Weiszfeld iterations for the geometric median of the benign coefficients.
MEDIAN_ITERS = 64
# Reweighting iterations of the Huber centre (started at the geometric median, a few
# suffice: the weights change only for the clients near the clipping radius).
HUBER_ITERS = 16
# Quadrature nodes for the Marchenko-Pastur median (initial noise estimate).
_MP_NODES = 512


class Refinement(NamedTuple):
  """Refined client updates and the pieces of their LoRA form.

  Attributes:
    subspace: ``(m, w)`` orthonormal columns ``U`` (``w = max_rank``, static); columns
      ``>= rank`` are zero. With ``strength="auto"`` the used columns are the principal
      directions of the benign deviations (so ``strength`` is diagonal in this basis).
    rank: int32 scalar ``r_hat``, directions used (the refined LoRA rank on the ``m`` side).
    centre: ``(w, n)`` robust centre ``C_bar`` (:func:`huber_centre`) of the benign
      coefficients ``C_k = U^T D_k``.
    strength: ``(w,)`` per-direction strength ``s_i`` in ``[0, 1]`` (zero beyond ``rank``);
      a fixed scalar strength ``s`` is reported as ``s`` in every used direction.
    refined: ``(K, m, n)``: benign ``U (C_bar + diag(s) (C_k - C_bar))``; others as sent.
    consensus: ``(m, n)`` ``U C_bar``: one update for servers that broadcast one model.
    coefficients: ``(K, w, n)`` ``C_k = U^T D_k`` (``C_bar`` for clients that are not
      finite, so that their refined factors are the consensus).
    benign: ``(K,)`` bool, the benign set used (the given one, minus non-finite clients).
    noise_level: scalar per-entry noise std ``sigma`` used (given or estimated).
    subspace_noise: scalar per-entry noise std inside the subspace used by ``"auto"``
      (``subspace_noise`` if given, else ``noise_level``).
    singular_values: ``(w,)`` top singular values of the benign stack ``[D_k]_{k in B}``.
    threshold: scalar singular-value threshold that chose ``rank`` (``0`` if given).
    saturated: bool, more directions passed the threshold than ``max_rank`` holds
      (raise ``max_rank``).
  """

  subspace: jax.Array
  rank: jax.Array
  centre: jax.Array
  strength: jax.Array
  refined: jax.Array
  consensus: jax.Array
  coefficients: jax.Array
  benign: jax.Array
  noise_level: jax.Array
  subspace_noise: jax.Array
  singular_values: jax.Array
  threshold: jax.Array
  saturated: jax.Array


# --------------------------------------------------------------------------- random matrix


def noise_edge(rows, cols, quantile_z=None):
  r"""Singular value (in units of the noise std) that pure noise exceeds rarely.

  For a ``rows x cols`` matrix of i.i.d. ``N(0, 1)`` entries the largest eigenvalue ``l``
  of ``X X^T`` satisfies ``(l - mu) / s -> TW_1`` (Johnstone 2001, "On the distribution of
  the largest eigenvalue in principal components analysis", Ann. Statist.) with

  .. math::
    \mu = (\sqrt{q - 1} + \sqrt p)^2,\qquad
    s = (\sqrt{q - 1} + \sqrt p)\,(1/\sqrt{q - 1} + 1/\sqrt p)^{1/3},

  ``p x q`` the smaller x larger dimension. Returns ``sqrt(mu + z s)`` with ``z`` the
  Tracy-Widom quantile :data:`TW_QUANTILE_Z` (0.95) by default: a singular value above it is
  a direction the data resolve (above the BBP detection limit), not the noise bulk's edge.
  """
  z = TW_QUANTILE_Z if quantile_z is None else quantile_z
  p = jnp.maximum(jnp.minimum(rows, cols), 1.0)
  q = jnp.maximum(jnp.maximum(rows, cols), 2.0)
  root = jnp.sqrt(q - 1) + jnp.sqrt(p)
  return jnp.sqrt(root**2 + z * root * (1 / jnp.sqrt(q - 1) + 1 / jnp.sqrt(p)) ** (1 / 3))


def optimal_shrinkage_factor(y, beta):
  r"""Gavish-Donoho Frobenius-optimal shrinkage, as a factor ``eta(y) / y`` in ``[0, 1)``.

  For a singular value ``y`` of a ``p x q`` matrix normalised by ``sqrt(q) sigma``
  (``beta = p / q <= 1``):

  .. math::
    \eta(y) = \frac{\sqrt{(y^2 - \beta - 1)^2 - 4\beta}}{y}\ \ (y > 1 + \sqrt\beta),
    \qquad 0 \text{ otherwise},

  the asymptotically optimal shrinker of the singular values for Frobenius loss. It is 0
  at the edge of the noise bulk (continuous there) and tends to James-Stein's
  ``1 - 1/y^2`` as ``beta -> 0``. Gavish & Donoho, "Optimal shrinkage of singular values",
  IEEE T-IT 2017 (arXiv 1405.7511).
  """
  y = jnp.asarray(y)
  above = y > 1 + jnp.sqrt(beta)
  safe_y = jnp.where(above, y, 2 + beta)
  disc = jnp.maximum((safe_y**2 - beta - 1) ** 2 - 4 * beta, 0.0)
  return jnp.where(above, jnp.sqrt(disc) / safe_y**2, 0.0)


def marchenko_pastur_median(beta):
  r"""Median of the Marchenko-Pastur law with ratio ``beta`` in ``(0, 1]`` (traceable).

  The law of the eigenvalues of ``Z Z^T / q`` for a ``p x q`` standard Gaussian ``Z``,
  ``beta = p / q``: density ``sqrt((b+ - x)(x - b-)) / (2 pi beta x)`` on
  ``[(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]``. Computed by a midpoint rule in the angle
  ``x = 1 + beta - 2 sqrt(beta) cos(phi)``, which removes the square-root endpoints.
  """
  beta = jnp.asarray(beta)
  half_width = 2 * jnp.sqrt(beta)
  phi = (jnp.arange(_MP_NODES) + 0.5) * (math.pi / _MP_NODES)
  x = 1 + beta - half_width * jnp.cos(phi)
  mass = half_width**2 * jnp.sin(phi) ** 2 / (2 * math.pi * beta * x)
  cdf = jnp.cumsum(mass)
  cdf = cdf / cdf[-1]
  return jnp.interp(0.5, cdf, x)


# --------------------------------------------------------------------------- robust pieces


def geometric_median_weights(distances_to, weights: jax.Array,
                             iters: int = MEDIAN_ITERS) -> jax.Array:
  r"""Weiszfeld's iteration for a weighted geometric median, as combination weights.

  The median of points ``x_k`` is ``z = sum_k c_k x_k`` with the returned ``c`` (``c >= 0``,
  ``sum c = 1``): every Weiszfeld step is such a combination, so only distances are needed
  (``distances_to(c)`` gives ``||x_k - sum_j c_j x_j||``; a kernel serves factored points).

  .. math::
    \arg\min_z \sum_k w_k \|z - x_k\|_F

  Started at the weighted mean of the weighted-in points; distances are floored
  at ``sqrt(eps)`` times the median distance from the start (the smoothing of Weiszfeld's
  step, so a point at the median does not divide by zero). Breakdown point 1/2: fewer than
  half the (weighted) points cannot move it arbitrarily far.
  """
  keep = weights > 0
  # Start at the weighted mean: a sum over clients (an all-reduce when they are sharded;
  # a coordinate-wise median would gather them). The problem is convex, so the start only
  # sets how many steps are needed.
  tiny = jnp.finfo(weights.dtype).tiny
  kept = jnp.where(keep, weights, 0.0)
  start = kept / jnp.maximum(jnp.sum(kept), tiny)
  scale = jnp.nanmedian(jnp.where(keep, distances_to(start), jnp.nan))
  scale = jnp.where(jnp.isfinite(scale) & (scale > 0), scale, 1.0)
  floor = jnp.sqrt(jnp.finfo(weights.dtype).eps) * scale

  def step(_, c):
    beta = weights / jnp.maximum(distances_to(c), floor)
    return beta / jnp.maximum(jnp.sum(beta), tiny)

  return jax.lax.fori_loop(0, iters, step, start)


def huber_weights(distances_to, weights: jax.Array, iters: int = HUBER_ITERS) -> jax.Array:
  r"""The Huber centre of :func:`huber_centre` as combination weights (see
  :func:`geometric_median_weights` for ``distances_to``)."""
  keep = weights > 0
  tiny = jnp.finfo(weights.dtype).tiny
  start = geometric_median_weights(distances_to, weights)
  radius = robust.upper_fence(distances_to(start), keep, CLIP_Z)

  def step(_, c):
    dist = distances_to(c)
    clip = jnp.where(dist <= radius, 1.0, radius / jnp.maximum(dist, tiny))
    beta = jnp.where(keep, weights * clip, 0.0)
    return beta / jnp.maximum(jnp.sum(beta), tiny)

  return jax.lax.fori_loop(0, iters, step, start)


def _point_distances(flat):
  return lambda c: jnp.sqrt(jnp.sum(jnp.square(flat - (c @ flat)[None]), axis=1))


def geometric_median(points: jax.Array, weights: jax.Array, iters: int = MEDIAN_ITERS):
  r"""Weighted geometric median of ``points`` ``(K, ...)`` (Weiszfeld, fixed iterations).

  .. math::
    \arg\min_z \sum_k w_k \|z - x_k\|_F

  See :func:`geometric_median_weights` (start, smoothing, breakdown point 1/2).
  """
  flat = points.reshape(points.shape[0], -1)
  weights = weights.astype(flat.dtype)
  return (geometric_median_weights(_point_distances(flat), weights, iters)
          @ flat).reshape(points.shape[1:])


def huber_centre(points: jax.Array, weights: jax.Array, iters: int = HUBER_ITERS, *,
                 by_kernel: bool = False):
  r"""Weighted Huber M-estimate of the centre of ``points`` ``(K, ...)``.

  .. math::
    \arg\min_z \sum_k w_k\, \rho_\tau(\|x_k - z\|_F),\qquad
    \rho_\tau(d) = \begin{cases} d^2 / 2 & d \le \tau \\ \tau d - \tau^2 / 2 & d > \tau
    \end{cases}

  Started at the geometric median (:func:`geometric_median`), with ``tau = med_k d_k +
  3.09 * 1.4826 * MAD_k(d_k)`` over the distances ``d_k`` of the weighted-in points from
  that start (the bound the scatter's clipping uses); solved by iteratively reweighted
  means with weights ``w_k min(1, tau / d_k)`` (each step decreases the objective).

  Why not the geometric median itself: after detection the kept clients are benign up to
  a minority that detection missed, so the efficient centre is their mean, and the
  median's ``1 / d_k`` weights discard information when clients are few and their
  distances unequal (LoRA updates trained on a few examples each). The Huber estimate is
  the mean of every client within ``tau`` of the centre, and a client beyond ``tau`` pulls
  like one at ``tau``: a single client's influence is bounded by ``tau / sum_k w_k`` and
  ``tau`` is set from medians, so a minority cannot inflate it.

  ``by_kernel=True`` takes every step's distances from the ``K x K`` Gram of the points
  (one GEMM, then ``O(K^2)`` per step, as for factored clients) instead of ``O(K d)`` per
  step: the choice when the points are long (a LoRA module's ``(K, w, n)``
  coefficients). Squared distances then carry a rounding error of ``eps ||x||^2``.
  """
  flat = points.reshape(points.shape[0], -1)
  weights = weights.astype(flat.dtype)
  if by_kernel:
    kernel = flat @ flat.T
    distances = lambda c: client_stack.kernel_distances(kernel, c)
  else:
    distances = _point_distances(flat)
  return (huber_weights(distances, weights, iters) @ flat).reshape(points.shape[1:])


def _level(level, benign, dtype):
  """A noise std: a scalar (NaN: not given), or the benign median of a ``(K,)`` one."""
  level = jnp.asarray(level, dtype)
  return level if level.ndim == 0 else robust.masked_median(level, benign)


def _chi2_median_ratio(dof):
  """Median of ``chi^2_dof / dof`` (Wilson-Hilferty): ``(1 - 2 / (9 dof))^3``."""
  dof = jnp.maximum(dof, 1.0)
  return (1 - 2 / (9 * dof)) ** 3


# --------------------------------------------------------------------------- validation


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_inputs(updates, benign, strength, rank, max_rank, noise_level, subspace_noise):
  shape = getattr(updates, "shape", None)
  if shape is None or len(shape) != 3:
    raise ValueError(f"updates must have shape (K, m, n); got shape={shape}")
  num_clients, m, n = shape
  if min(num_clients, m, n) < 1:
    raise ValueError(f"updates has an empty axis: shape={tuple(shape)}")
  if not jnp.issubdtype(updates.dtype, jnp.floating):
    raise ValueError(f"updates must be a floating dtype; got {updates.dtype}")
  bshape = getattr(benign, "shape", None)
  if bshape != (num_clients,):
    raise ValueError(
        f"benign must have shape (K,) = ({num_clients},) for updates.shape={tuple(shape)}; "
        f"got {bshape}")
  limit = min(m, num_clients * n)
  if max_rank is None:
    max_rank = default_max_rank(m, n, num_clients)
  if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)):
    raise ValueError(f"max_rank must be a Python int (it fixes shapes); got {max_rank!r}")
  if not 1 <= max_rank <= limit:
    raise ValueError(
        f"max_rank must satisfy 1 <= max_rank <= min(m, K*n) = {limit}; got {max_rank}")
  if rank is not None and not _is_traced(rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) and not (
        hasattr(rank, "shape") and rank.shape == () and jnp.issubdtype(rank.dtype, jnp.integer)):
      raise ValueError(f"rank must be an int or None; got {rank!r}")
    if not 0 <= int(rank) <= max_rank:
      raise ValueError(f"rank must satisfy 0 <= rank <= max_rank = {max_rank}; got {int(rank)}")
  if isinstance(strength, str):
    if strength != "auto":
      raise ValueError(f"strength must be a float in [0, 1] or 'auto'; got {strength!r}")
  elif not _is_traced(strength):
    value = np.asarray(strength)
    if value.shape != () or not np.isfinite(value) or not 0.0 <= float(value) <= 1.0:
      raise ValueError(f"strength must be a float in [0, 1] or 'auto'; got {strength!r}")
  for name, level in (("noise_level", noise_level), ("subspace_noise", subspace_noise)):
    if level is None or _is_traced(level):
      continue
    value = np.asarray(level)
    if value.shape not in ((), (num_clients,)):
      raise ValueError(
          f"{name} must be a scalar or (K,) = ({num_clients},); got shape {value.shape}")
    if not np.all(np.isfinite(value)) or np.any(value < 0):
      raise ValueError(f"{name} must be finite and >= 0; got {level!r}")
  return int(max_rank)


def default_max_rank(m: int, n: int, num_clients: int) -> int:
  """Default static width ``w``: ``min(m, K n, 64)``.

  The width only bounds the refine rank (the used directions are chosen from data and the
  rest masked); it fixes the shapes of ``subspace`` and of the LoRA factors, so it is
  capped at 64, a generous LoRA rank, to keep ``(K, m, w)`` factors small. ``saturated``
  in the result says when the data asked for more.
  """
  return int(min(m, num_clients * n, 64))


# --------------------------------------------------------------------------- the refine


def refine_updates(
    updates: jax.Array,
    benign: jax.Array,
    *,
    noise_level=None,
    subspace_noise=None,
    rank=None,
    max_rank: int | None = None,
    strength="auto",
) -> Refinement:
  r"""Refines the benign clients' updates by partial pooling inside a shared subspace.

  .. math::
    \tilde D_k = \hat U\big(\bar C + S (C_k - \bar C)\big),\quad C_k = \hat U^\top D_k
    \quad (k \in B);\qquad \tilde D_k = D_k\quad (k \notin B).

  **Subspace and rank.** ``U_hat`` holds the top left singular vectors of the benign stack
  ``X = [D_k]_{k in B}`` (``m x |B| n``, from its ``m x m`` Gram). The refine rank is
  decoupled from the detection rank. With ``rank=None`` it counts the directions the data
  resolve: (1) singular values of ``X`` above the edge that pure noise exceeds in fewer
  than 5% of problems, ``sigma sqrt(mu + z s)`` with Johnstone's Tracy-Widom centring and
  scaling for a ``p x q`` noise matrix (:func:`noise_edge`; about ``sigma (sqrt m +
  sqrt(|B| n))``, the BBP limit below which a direction's estimate is uncorrelated with
  the truth); (2) directions of the robust centre (geometric median of the benign
  ``D_k``, noise ``sigma^2 / |B|`` per entry) off those of (1), above the centre's own
  edge ``sigma sqrt(mu + z s) / sqrt(|B|)``: a common change too weak to stand out in the
  stack stands out ``sqrt(|B|)`` times more clearly in the centre, and pooling (``s = 0``)
  can use it. The edge, not a hard threshold tuned for projection (Gavish-Donoho's
  ``lambda*``), because the strength below shrinks what the data do not support: a kept
  direction of pure noise costs about ``sigma^2 n / |B|`` per client once pooled, a dropped
  real one its whole energy. Each direction must also pass without its largest
  single-client share (in the Gram, resp. in the median's Weiszfeld weights, with the
  edge for ``|B| - 1`` clients): a direction carried by one client is that client's own
  (an undetected outlier's, typically), not a shared one. The rank is capped at the static
  width ``w = max_rank`` (``saturated`` says when more directions passed).

  **Noise level.** With ``noise_level=None``, ``sigma`` is estimated twice: first from the
  median eigenvalue of the benign Gram against the Marchenko-Pastur median (Gavish-Donoho's
  estimator, robust to a minority of signal directions), which gives a first rank ``r0``;
  then as the median over benign clients of the off-subspace residual
  ``||(I - U U^T) D_k||_F^2`` at rank ``r0`` divided by its degrees of freedom
  ``(m - r0)(n - r0 / |B|)`` (and the chi-square median ratio); the rank is then re-chosen.
  A per-client noise level ``(K,)`` (e.g. reported by clients) enters as its benign median.

  **Strength (``"auto"``).** Inside the subspace the empirical-Bayes model is
  ``C_k = Theta_k + E_k``, ``Theta_k`` the client's true coefficients (spread around a
  common centre with an unknown between-client covariance ``T``), ``E_k`` noise with
  ``sigma^2`` per entry. The best linear estimate of ``Theta_k`` from ``C_k`` and the
  centre is ``C_bar + T (T + sigma^2 I)^{-1} (C_k - C_bar)`` (James-Stein / Efron-Morris);
  the centre's own variance cancels from this optimum for the mean (``Cov(Theta_k - C_bar,
  C_k - C_bar) = T (1 - 1/|B|)``, ``Var(C_k - C_bar) = (T + sigma^2)(1 - 1/|B|)``) and to
  ``O(1/(|B| d))`` for a robust centre in ``d = r n`` dimensions. ``T + sigma^2 I`` is
  estimated by the (clipped, see below) scatter of the benign deviations
  ``Y = [C_k - C_bar]`` (``r x N``, ``N = (|B| - 1) n`` degrees of freedom); its
  eigenvectors ``P`` are the principal directions of how clients differ; each direction's
  variance per degree of freedom is the smaller of that with and without its largest
  single-client share; and in each the strength is the Gavish-Donoho optimal
  shrinker of the normalised singular value ``y_i = sqrt(lambda_i / (N sigma^2))``:
  ``s_i = sqrt((y_i^2 - beta - 1)^2 - 4 beta) / y_i^2`` above the bulk edge
  ``1 + sqrt(beta)`` (``beta = r / N``), else 0. This is James-Stein ``1 - sigma^2 /
  lambda_i`` corrected for the spread of sample eigenvalues: at ``h = 0`` every eigenvalue
  of pure noise lies inside the bulk and gets exactly 0, whereas the positive-part
  James-Stein would keep the largest noise eigenvalue (``(1 + sqrt beta)^2`` times the
  noise) partly. The returned ``subspace`` is rotated to ``U_hat P``, so ``S`` is the
  diagonal ``strength``.

  **Assumptions.** (1) Noise is isotropic, so the per-entry noise inside the subspace equals
  the off-subspace one measured by ``sigma``; this is exact for i.i.d. noise and strong
  directions (the fitted directions' extra noise lies along the signal, a relative
  ``sigma^2 (m - r) / theta_i^2``, at most ~10% just above the rank threshold). It fails
  for LoRA updates trained on few examples, where noise concentrates in the same directions
  as the signal: then ``sigma`` underestimates the in-subspace noise and ``"auto"`` pools
  too little (measured: with in-subspace noise std 1.0 on top of 0.3 i.i.d., K=30 m=64
  n=16 r=4, ``s`` ~ 0.9 where 0 is right, 18x the best error at h=0). No server-only
  statistic can tell in-subspace noise from heterogeneity (both are independent
  client-to-client variation of ``C_k``), so this needs the clients: pass
  ``subspace_noise``, the per-entry noise std of ``C_k`` (scalar, or ``(K,)`` reported by
  clients, of which the benign median is used; e.g. a client trains two adapters on the
  halves of its data, ``A_k`` and ``B_k``, and reports ``||U^T (A_k - B_k)||_F / sqrt(4 r
  n)``, the noise of a full-data update if its variance scales as 1 / samples), or use
  :func:`choose_strength`. With it, the rule is back within ~10% of the best fixed strength
  in the same experiment. (2) Heterogeneity and noise are independent across clients.
  (3) A benign majority inside ``B``.

  **Robustness (not steerable by a minority of undetected attackers in ``B``).** No single
  client can add a direction (leave-largest-share-out tests above), and every other
  statistic is a benign-set median or clipped: ``sigma`` is a median of per-client
  residuals (chi-square with ``(m - r) n`` degrees of freedom, so concentrated: a minority
  moves it at most to a neighbouring benign quantile); ``C_bar`` is a Huber centre started at
  the geometric median (breakdown 1/2) with its radius set from median distances, so a
  client beyond it pulls no more than one at the radius; in the scatter each client's deviation norm is clipped at the median
  plus ``3.09`` robust standard deviations (Huber-type weights), so no client adds more
  than that bound. A minority can therefore at most raise the strength in the directions
  it pushes (towards projection, each benign client keeping its own coefficients, the
  paper's refine), by an amount bounded by its share of the clipped scatter, or lower it by
  its share of the benign scatter (by sitting at the centre).

  Args:
    updates: ``(K, m, n)`` float client updates (bf16/f16 computed in f32).
    benign: ``(K,)`` bool, the detected benign set; non-finite clients are dropped from it.
    noise_level: per-entry noise std ``sigma`` (scalar, or ``(K,)`` per client whose benign
      median is used); ``None`` estimates it (see above). Sets the rank thresholds, and
      the strength too unless ``subspace_noise`` is given.
    subspace_noise: per-entry noise std of the coefficients ``C_k`` inside the subspace
      (scalar or ``(K,)``, benign median), for ``"auto"`` when the noise is not isotropic
      (see Assumptions); ``None`` uses ``sigma``.
    rank: refine rank ``0 <= r <= max_rank`` (int, may be traced); ``None`` chooses it.
    max_rank: static width ``w`` of ``subspace``; default :func:`default_max_rank`.
    strength: ``"auto"`` (default, server-only, above), or a float in ``[0, 1]``
      (may be traced, e.g. from :func:`choose_strength`): ``1`` is the projection
      ``U U^T D_k``, ``0`` one pooled update ``U C_bar`` for every benign client.

  Returns:
    :class:`Refinement`.

  Raises:
    ValueError: wrong shapes or dtype, ``strength`` outside ``[0, 1]`` and not ``"auto"``,
      ``rank`` or ``max_rank`` out of range, negative ``noise_level``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from clair_jax import synthetic
    >>> from clair_jax._src.refine import refine_updates
    >>> p = synthetic.make_problem(jax.random.key(0), num_clients=20, m=32, n=8, rank=3,
    ...                            fraction=0.0, attack="random", noise=0.3,
    ...                            heterogeneity=0.0)
    >>> out = refine_updates(p.updates, jnp.ones(20, bool))
    >>> int(out.rank), bool(jnp.all(out.strength < 0.1))
    (3, True)
  """
  max_rank = _check_inputs(updates, benign, strength, rank, max_rank, noise_level,
                          subspace_noise)
  fixed = None if isinstance(strength, str) else strength
  return _refine(jnp.asarray(updates), jnp.asarray(benign), _as_level(noise_level),
                 _as_level(subspace_noise), rank, fixed, max_rank=max_rank)


def _as_level(level):
  """``None`` -> NaN ("estimate"), so given and estimated noise share one compile."""
  return jnp.asarray(jnp.nan if level is None else level, jnp.result_type(float))


@functools.partial(jax.jit, static_argnames=("max_rank",))
def _refine(updates, benign, noise_level, subspace_noise, rank, strength, *, max_rank,
            voters=None):
  """Jitted core of :func:`refine_updates` (``strength=None`` is ``"auto"``, a NaN noise
  level is "estimate"; ``rank=None`` is an empty pytree, so it compiles separately)."""
  clients = client_stack.as_clients(updates)
  num_clients, m, n = clients.shape
  in_dtype = clients.dtype
  dtype = jnp.float32 if jnp.finfo(in_dtype).bits < 32 else in_dtype
  finite = clients.finite()
  benign = jnp.asarray(benign).astype(bool) & finite
  # The statistics count each group of near-duplicate clients once (``voters``);
  # every benign client is refined.
  stats = benign if voters is None else benign & jnp.asarray(voters).astype(bool)
  x_safe = clients.astype(dtype).masked(finite)
  x_benign = x_safe.masked(stats)
  count = jnp.sum(stats).astype(dtype)
  count_safe = jnp.maximum(count, 1.0)

  # Shared subspace: eigen-decomposition of the benign Gram sum_k D_k D_k^T.
  gram = x_benign.gram()
  eigvals, eigvecs = jnp.linalg.eigh(gram)
  eigvals = jnp.maximum(eigvals[::-1], 0.0)
  eigvecs = eigvecs[:, ::-1]
  basis = eigvecs[:, :max_rank]
  singular = jnp.sqrt(eigvals)

  # Stack geometry: p x q = min x max of (m, |B| n).
  width = count_safe * n
  p_dim = jnp.minimum(float(m), width)
  q_dim = jnp.maximum(float(m), width)
  beta = p_dim / q_dim
  threshold_factor = noise_edge(p_dim, q_dim)
  norms_sq = x_safe.sq_norms()

  def count_above(sigma):
    return jnp.sum(singular[:max_rank] > threshold_factor * sigma).astype(jnp.int32)

  def residual_sigma(r):
    mask = (jnp.arange(max_rank) < r).astype(dtype)
    coef = x_safe.coefficients(basis * mask[None, :])
    residual = jnp.maximum(norms_sq - jnp.sum(jnp.square(coef), axis=(1, 2)), 0.0)
    rf = r.astype(dtype)
    dof = jnp.maximum((m - rf) * (n - rf / count_safe), 1.0)
    return jnp.sqrt(robust.masked_median(residual, stats) / (dof * _chi2_median_ratio(dof)))

  # Estimated noise (used where none is given, NaN): first Gavish-Donoho's median
  # eigenvalue of X X^T against q sigma^2 times the Marchenko-Pastur median, then the
  # benign median off-subspace residual at the rank that first estimate gives.
  p_int = jnp.maximum(p_dim.astype(jnp.int32), 1)
  # (descending order: the median of the p nonzero eigenvalues)
  median_eig = 0.5 * (jnp.take(eigvals, (p_int - 1) // 2) + jnp.take(eigvals, p_int // 2))
  sigma0 = jnp.sqrt(median_eig / (q_dim * marchenko_pastur_median(beta)))
  r0 = count_above(sigma0)
  r_noise = r0 if rank is None else jnp.asarray(rank, jnp.int32)
  estimated = residual_sigma(jnp.minimum(r_noise, min(m - 1, max_rank)))
  given = _level(noise_level, stats, dtype)
  sigma = jnp.where(jnp.isnan(given), estimated, given)
  given_in = _level(subspace_noise, stats, dtype)
  sigma_in = jnp.where(jnp.isnan(given_in), sigma, given_in)
  if rank is None:
    # A direction is kept when its singular value passes the threshold both with and
    # without its largest single-client share: a direction carried by one client is that
    # client's own (an undetected outlier's, typically), not a shared one.
    # (floored at the accuracy of the Gram's eigenvalues, for noiseless or exact data)
    numerical = jnp.sqrt(jnp.finfo(dtype).eps) * singular[0]
    threshold = jnp.maximum(threshold_factor * sigma, numerical)
    shares = jnp.sum(jnp.square(x_benign.coefficients(basis)), axis=2)
    without_top = jnp.sum(shares, axis=0) - jnp.max(shares, axis=0)
    width_loo = jnp.maximum(count - 1.0, 1.0) * n
    threshold_loo = jnp.maximum(noise_edge(float(m), width_loo) * sigma, numerical)
    shared = (singular[:max_rank] > threshold) & (without_top > jnp.square(threshold_loo))
    used_stack = jnp.sum(shared)
    # Shared-update directions: the robust centre of the benign updates has noise sigma^2
    # / |B| per entry, so a common change too weak to stand out in the stack can stand out
    # there. Its part off the stack directions is tested against that (smaller) noise edge
    # and its significant left singular vectors are appended (orthogonal by construction).
    centre_full = x_benign.combination(geometric_median_weights(
        x_benign.combination_distances(), stats.astype(dtype)))
    stack_basis = basis * shared.astype(dtype)[None, :]
    off = centre_full - stack_basis @ (stack_basis.T @ centre_full)
    extra = min(max_rank, m, n)
    rows_left = m - used_stack.astype(dtype)
    floor_centre = numerical / jnp.sqrt(count_safe)
    edge_centre = jnp.maximum(
        noise_edge(rows_left, float(n)) * sigma / jnp.sqrt(count_safe), floor_centre)
    # Only the singular values above the centre's edge are read (the top ones, certified).
    off_vectors, off_values, off_right_t = subspace_lib.top_singular_triplets(
        off, extra, edge_centre)
    # The median is the weighted mean of the clients at its Weiszfeld fixed point, weights
    # 1 / ||D_k - centre||: as for the stack, each singular value must also pass without
    # its largest single-client share (one client can pull the median by ~ its distance
    # over |B|, which at high heterogeneity exceeds the centre's noise edge).
    distance = x_benign.distances(centre_full)
    pull = jnp.where(stats, 1.0 / jnp.maximum(distance, jnp.finfo(dtype).tiny), 0.0)
    pull = pull / jnp.maximum(jnp.sum(pull), jnp.finfo(dtype).tiny)
    along = x_benign.bilinear(off_vectors[:, :extra], off_right_t[:extra]) * pull[:, None]
    top_share = jnp.maximum(jnp.max(along, axis=0), 0.0)
    edge_loo = jnp.maximum(
        noise_edge(rows_left, float(n)) * sigma / jnp.sqrt(jnp.maximum(count - 1, 1)),
        floor_centre)
    from_centre = ((off_values[:extra] > edge_centre)
                   & (off_values[:extra] - top_share > edge_loo))
    candidates = jnp.concatenate([basis, off_vectors[:, :extra]], axis=1)
    flags = jnp.concatenate([shared, from_centre])
    # used directions first (stable: stack directions by singular value, then the centre's)
    order = jnp.argsort(~flags, stable=True)[:max_rank]
    basis = candidates[:, order]
    used = jnp.minimum(jnp.sum(flags), max_rank).astype(jnp.int32)
    passing = jnp.sum(singular > threshold) + jnp.sum(from_centre)
  else:
    used = jnp.asarray(rank, jnp.int32)
    passing = used
    threshold = jnp.zeros((), dtype)
  used = jnp.where(count > 0, used, 0)
  mask = jnp.arange(max_rank) < used
  maskf = mask.astype(dtype)
  subspace = basis * maskf[None, :]

  coefficients = x_safe.coefficients(subspace)
  centre = huber_centre(coefficients, stats.astype(dtype),
                        by_kernel=isinstance(clients, client_stack.FactoredClients))
  deviations = coefficients - centre[None]

  if strength is None:  # "auto"
    energy = jnp.sum(jnp.square(jnp.where(stats[:, None, None], deviations, 0.0)), axis=(1, 2))
    bound = robust.upper_fence(jnp.sqrt(energy), stats, CLIP_Z)
    weights = jnp.where(stats, jnp.minimum(1.0, jnp.square(bound) / jnp.maximum(
        energy, jnp.finfo(dtype).tiny)), 0.0)
    scatter = jnp.einsum("k,kwn,kvn->wv", weights, deviations, deviations)
    # Unused directions get eigenvalue -1 so they sort last and never mix with used ones.
    lam, rot = jnp.linalg.eigh(scatter - jnp.diag(1.0 - maskf))
    lam, rot = lam[::-1], rot[:, ::-1]
    dof = jnp.maximum(jnp.sum(weights) - 1.0, 0.0) * n
    used_f = used.astype(dtype)
    p_dev = jnp.maximum(jnp.minimum(used_f, dof), 1.0)
    q_dev = jnp.maximum(jnp.maximum(used_f, dof), 1.0)
    beta_dev = p_dev / q_dev
    # As for the rank: each direction's variance must also hold without its largest
    # single-client share (one undetected outlier cannot make a direction look varied).
    along = jnp.einsum("wv,kwn->kvn", rot, deviations)
    shares = weights[:, None] * jnp.sum(jnp.square(along), axis=2)
    dof_loo = jnp.maximum(jnp.sum(weights) - 2.0, 0.0) * n
    per_dof = jnp.minimum(
        jnp.maximum(lam, 0.0) / jnp.maximum(dof, 1.0),
        jnp.maximum(lam - jnp.max(shares, axis=0), 0.0) / jnp.maximum(dof_loo, 1.0))
    lam = jnp.where(dof_loo > 0, per_dof * dof, jnp.maximum(lam, 0.0))
    noise_energy = q_dev * jnp.square(sigma_in)
    y = jnp.sqrt(jnp.maximum(lam, 0.0) / jnp.maximum(noise_energy, jnp.finfo(dtype).tiny))
    factor = optimal_shrinkage_factor(y, beta_dev)
    # sigma = 0 (noiseless): keep every client's own coefficients.
    factor = jnp.where(noise_energy > 0, factor, 1.0)
    s = jnp.where(mask & (dof > 0), factor, 0.0).astype(dtype)
    subspace = subspace @ rot
    coefficients = jnp.einsum("wv,kwn->kvn", rot, coefficients)
    centre = rot.T @ centre
    deviations = coefficients - centre[None]
  else:
    s = jnp.asarray(strength, dtype) * maskf

  if isinstance(clients, client_stack.DenseClients):
    right = centre[None] + s[None, :, None] * deviations
    refined_benign = clients.project(subspace, right)
    refined = jnp.where(benign[:, None, None], refined_benign.astype(in_dtype),
                        clients.updates)
  else:  # factored clients: the caller builds the refined factors (never dense)
    refined = None
  # A non-finite client has no coefficients of its own: it is given the centre's, so its
  # refined factors (:func:`refined_factors`) are the consensus.
  coefficients = jnp.where(finite[:, None, None], coefficients, centre[None])
  consensus = (subspace @ centre).astype(in_dtype)
  saturated = (passing > max_rank) if rank is None else jnp.asarray(False)
  return Refinement(
      subspace=subspace,
      rank=used.astype(jnp.int32),
      centre=centre,
      strength=s,
      refined=refined,
      consensus=consensus,
      coefficients=coefficients,
      benign=benign,
      noise_level=jnp.asarray(sigma, dtype),
      subspace_noise=jnp.asarray(sigma_in, dtype),
      singular_values=singular[:max_rank],
      threshold=jnp.asarray(threshold, dtype),
      saturated=jnp.asarray(saturated),
  )


def refined_factors(refinement: Refinement) -> tuple[jax.Array, jax.Array]:
  r"""LoRA form of the refined updates: ``refined_k = left_k @ right_k`` for benign ``k``.

  .. math::
    \text{left}_k = U\ (m \times w),\qquad
    \text{right}_k = \bar C + \operatorname{diag}(s)(C_k - \bar C)\ (w \times n)

  The rank on the ``m`` side is ``refinement.rank`` (columns of ``U`` beyond it are zero,
  so a consumer may slice ``[:, :rank]`` / ``[:rank]`` once ``rank`` is concrete). For
  clients outside the benign set the factors give ``U diag(s) C_k + U (1 - diag(s)) C_bar``
  as for the others (a server serving every client uses these: a flagged client's update
  enters no statistic, and one flagged by mistake still gets the pooled refinement), and
  the consensus ``U C_bar`` for non-finite clients; ``refinement.refined`` returns the
  clients outside the benign set as sent.

  Args:
    refinement: a :class:`Refinement`.

  Returns:
    ``(left, right)``: ``(K, m, w)`` (the shared ``U`` broadcast) and ``(K, w, n)``.
  """
  coefficients = refinement.coefficients
  s = refinement.strength[None, :, None]
  right = refinement.centre[None] + s * (coefficients - refinement.centre[None])
  left = jnp.broadcast_to(refinement.subspace[None],
                          (coefficients.shape[0],) + refinement.subspace.shape)
  return left, right


# --------------------------------------------------------------------------- federated choice


def choose_strength(held_out_losses: jax.Array, candidates: jax.Array,
                    benign: jax.Array) -> jax.Array:
  r"""Strength from a federated evaluation round: benign median of held-out loss curves.

  Each client ``k`` evaluates the refined update it would get at every candidate strength
  ``s_j`` on its own held-out data and reports ``L_kj``. The server centres each client's
  curve (``L_kj - mean_j L_kj``: clients' loss levels differ far more than the curves'
  shapes, so the comparison is paired) and picks

  .. math::
    \hat s = s_{j^*},\qquad j^* = \arg\min_j \operatorname{median}_{k \in B}
      \big(L_{kj} - \tfrac1S \textstyle\sum_{j'} L_{kj'}\big).

  Why a minority cannot steer it: only clients in the benign set vote, and for each
  candidate the median lies between the benign-majority's order statistics: if a fraction
  ``eps < 1/2`` of ``B`` lies arbitrarily, each candidate's score stays between the
  honest clients' ``(1/2 - eps)``- and ``(1/2 + eps)``-quantiles (on the honest set), so
  the liars can only swap candidates whose honest scores are within that band, never
  push the choice to a candidate most honest clients find worse. Clients outside ``B``
  and clients reporting any non-finite loss do not vote. If nobody can vote, returns 1
  (projection: each client keeps its own coefficients).

  Args:
    held_out_losses: ``(K, S)`` reported losses.
    candidates: ``(S,)`` strengths in ``[0, 1]``.
    benign: ``(K,)`` bool.

  Returns:
    Scalar strength (one of ``candidates``), in the dtype of ``candidates``.

  Raises:
    ValueError: shapes disagree, or (concrete) candidates outside ``[0, 1]``.
  """
  losses_shape = getattr(held_out_losses, "shape", None)
  cand_shape = getattr(candidates, "shape", np.shape(candidates))
  benign_shape = getattr(benign, "shape", None)
  if losses_shape is None or len(losses_shape) != 2:
    raise ValueError(f"held_out_losses must have shape (K, S); got {losses_shape}")
  if tuple(cand_shape) != (losses_shape[1],):
    raise ValueError(f"candidates must have shape (S,) = ({losses_shape[1]},) to match "
                     f"held_out_losses {tuple(losses_shape)}; got {tuple(cand_shape)}")
  if benign_shape != (losses_shape[0],):
    raise ValueError(f"benign must have shape (K,) = ({losses_shape[0]},) to match "
                     f"held_out_losses {tuple(losses_shape)}; got {benign_shape}")
  if not _is_traced(candidates):
    values = np.asarray(candidates)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
      raise ValueError(f"candidates must lie in [0, 1]; got {values}")
  losses = jnp.asarray(held_out_losses)
  losses = losses.astype(jnp.promote_types(losses.dtype, jnp.float32))
  candidates = jnp.asarray(candidates)
  voters = jnp.asarray(benign).astype(bool) & jnp.all(jnp.isfinite(losses), axis=1)
  centred = losses - jnp.mean(jnp.where(jnp.isfinite(losses), losses, 0.0), axis=1,
                              keepdims=True)
  score = jnp.nanmedian(jnp.where(voters[:, None], centred, jnp.nan), axis=0)
  best = jnp.argmin(jnp.where(jnp.isfinite(score), score, jnp.inf))
  return jnp.where(jnp.any(voters), candidates[best], jnp.ones((), candidates.dtype))
