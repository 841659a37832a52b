"""Detection: robust starts and the rank-aware trimming (concentration) loop.

The convex program alone absorbs a *coherent* contaminated group into ``L``, and any
SVD-based start is outvoted by a coherent group with larger norms (see CLAIR.md,
"Parameters"). Two ideas fix this, both counting clients rather than energy:

* **Consensus start**: every client proposes the subspace of its own block; a proposal is
  scored by the sum of the ``h = floor(K/2) + 1`` smallest *fractions* of client energy it
  leaves unexplained (a least-trimmed-squares criterion, scale-free per client), so the
  subspace that explains a majority of clients wins whatever the norms.
* **Concentration**: fit ``U`` on the current benign set, score every client by its
  off-subspace residual relative to the benign median, re-split, repeat until stable
  (C-steps as in FAST-MCD / least trimmed squares).

The steps read a :class:`Clients` (the updates in the column layout ``(m, K, n)``, their
energies and an ``active`` mask of finite clients), prepared once per call; inactive
clients never enter a median, a count or a fit, so dropping a NaN client changes nothing
for the others.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._src.subspace import fit_columns
from clair_jax._src.subspace import subspace_coefficients

# Consistency constant turning a median absolute deviation into a Gaussian std.
MAD_TO_STD = 1.4826
# Spectral-tail energy below this fraction of a client's energy is round-off, not noise.
TAIL_FRACTION_FLOOR = 1e-5


def masked_quantile(values: jax.Array, mask: jax.Array, quantile: float) -> jax.Array:
  """Linear-interpolated ``quantile`` of ``values[mask]`` with a static shape."""
  count = jnp.sum(mask)
  ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
  position = quantile * jnp.maximum(count - 1, 0)
  low = jnp.floor(position).astype(jnp.int32)
  high = jnp.minimum(low + 1, jnp.maximum(count - 1, 0))
  weight = position - low
  value = (1 - weight) * ordered[low] + weight * jnp.where(weight > 0, ordered[high], 0.0)
  return jnp.where(count > 0, value, 0.0)


def masked_median(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Median of ``values[mask]`` with a static shape (``mask`` may be traced)."""
  return masked_quantile(values, mask, 0.5)


def smallest_sum(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """Sum of the ``count`` smallest entries of ``values[mask]``."""
  ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
  return jnp.sum(jnp.where(jnp.arange(values.shape[0]) < count, ordered, 0.0))


def smallest_mask(values: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
  """Boolean mask of the ``count`` smallest entries of ``values[mask]`` (ties by index)."""
  ranks = jnp.argsort(jnp.argsort(jnp.where(mask, values, jnp.inf)))
  return mask & (ranks < count)


def majority_size(active: jax.Array) -> jax.Array:
  """``h = floor(K_active / 2) + 1``: the smallest benign set that is a majority."""
  return jnp.sum(active) // 2 + 1


class Clients(NamedTuple):
  """The normalised client data that every detection step reads, prepared once.

  The updates are kept in the column layout ``(m, K, n)``
  (:func:`clair_jax._src.subspace.to_columns`): a fit, a projection or a residual is then
  one GEMM over all clients, with no per-step copy or transpose, and clients sharded on
  ``K`` stay in place.
  """

  columns: jax.Array          # (m, K, n) normalised updates, inactive clients zero
  active: jax.Array           # (K,) bool, finite clients
  energy: jax.Array           # (K,) ||D_k||_F^2
  own_tail: jax.Array | None  # (K,) spectral tail beyond rank r (client_spectra), or None


def prepare_clients(columns: jax.Array, active: jax.Array,
                    own_tail: jax.Array | None = None) -> Clients:
  """:class:`Clients` from the column layout (inactive clients already zeroed)."""
  return Clients(columns, active, jnp.sum(columns**2, axis=(0, 2)), own_tail)


def residual_norms(columns: jax.Array, subspace: jax.Array,
                   coefficients: jax.Array | None = None) -> jax.Array:
  """Off-subspace residual ``||(I - U U^T) D_k||_F`` for each client, ``(K,)``.

  ``columns`` is the column layout ``(m, K, n)``; ``coefficients`` optionally the
  :func:`clair_jax._src.subspace.subspace_coefficients` ``U^T D_k`` already computed.
  """
  if coefficients is None:
    coefficients = subspace_coefficients(columns, subspace)
  projected = jnp.tensordot(subspace, coefficients, axes=(1, 0))
  return jnp.sqrt(jnp.sum((columns - projected) ** 2, axis=(0, 2)))


def unexplained_fraction(columns: jax.Array, subspace: jax.Array,
                         coefficients: jax.Array | None = None,
                         energy: jax.Array | None = None) -> jax.Array:
  """``||(I - U U^T) D_k||_F^2 / ||D_k||_F^2`` (0 for a zero block), ``(K,)``, from the
  column layout (see :func:`residual_norms`)."""
  if energy is None:
    energy = jnp.sum(columns**2, axis=(0, 2))
  if coefficients is None:
    coefficients = subspace_coefficients(columns, subspace)
  return _unexplained(jnp.sum(coefficients**2, axis=(0, 2)), energy)


def _unexplained(explained: jax.Array, energy: jax.Array) -> jax.Array:
  """``1 - explained / energy``, 0 where the energy is 0 (no division by zero)."""
  return jnp.where(energy > 0, 1.0 - explained / jnp.where(energy > 0, energy, 1.0), 0.0)


class Split(NamedTuple):
  """A benign/contaminated split and what it implies."""

  benign: jax.Array            # (K,) bool
  subspace: jax.Array          # (m, r), fitted on `benign`
  scores: jax.Array            # (K,) max over tests of score / its threshold; > 1 flags
  residual_scores: jax.Array   # (K,) residual / benign median residual
  structure_scores: jax.Array  # (K,) residual / own-noise expectation, benign-normalised
  thresholds: jax.Array        # (2,) thresholds of the two tests
  scale: jax.Array             # benign median residual (normalised units, floored)
  unsupported: jax.Array       # benign clients with no significant signal in `subspace`
  objective: jax.Array         # trimmed sum of unexplained fractions (lower is better)
  num_steps: jax.Array         # C-steps taken
  basis: jax.Array             # (m, s) warm start of the next iterative fit ((m, 0): none)


def own_subspaces(blocks: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Each block's squared singular values and top-``rank`` left singular vectors.

  From one batched ``eigh`` of the small Gram (``B_k^T B_k``, ``p x p`` with ``p = n``, or
  ``B_k B_k^T`` when ``m < n``): ``u_i = B_k w_i / ||B_k w_i||``. Cheaper than a batched
  SVD of the ``m x n`` blocks by the ratio of ``m`` to ``n``; the squared spectrum
  leaves a direction with ``s_i^2 <= p eps s_1^2`` undetermined, so its column is zero
  (a block of rank below ``rank`` proposes a smaller subspace).

  Args:
    blocks: ``(C, m, p)`` blocks.
    rank: number of vectors ``r`` (at most ``min(m, p)``).

  Returns:
    ``((C, min(m, p)) squared singular values ascending, (C, m, r) vectors)``.
  """
  _, m, p = blocks.shape
  if p <= m:
    squared, right = jnp.linalg.eigh(jnp.einsum("kmn,kmp->knp", blocks, blocks))
    projected = jnp.einsum("kmn,knr->kmr", blocks, right[:, :, ::-1][:, :, :rank])
    norms = jnp.sqrt(jnp.sum(projected**2, axis=1, keepdims=True))
    left = projected / jnp.where(norms > 0, norms, 1.0)
  else:
    squared, vectors = jnp.linalg.eigh(jnp.einsum("kmn,kpn->kmp", blocks, blocks))
    left = vectors[:, :, ::-1][:, :, :rank]
  top = squared[:, ::-1][:, :rank]
  resolved = top > jnp.finfo(blocks.dtype).eps * min(m, p) * top[:, :1]
  return squared, jnp.where(resolved[:, None, :], left, 0.0)


def consensus_start(
    clients: Clients, rank: int, num_candidates: int, own_left: jax.Array | None = None,
) -> jax.Array:
  """Benign set proposed by the single-client subspace that explains the most clients.

  Candidate ``j`` is the top-``rank`` left singular subspace of client ``j``'s block (of
  ``ceil(rank / n)`` consecutive clients when ``n < rank``; see :func:`own_subspaces`).
  Its cost is the sum of the ``h`` smallest unexplained fractions over active clients;
  the best candidate's ``h`` best-explained clients are returned. Every candidate's
  fractions come from one GEMM (``C r x m`` against the stacked updates).

  Args:
    clients: :class:`Clients` (normalised, inactive clients zeroed).
    rank: subspace dimension.
    num_candidates: how many clients (evenly spaced) propose a subspace.
    own_left: optional ``(K, m, rank)`` every client's own top subspace (from
      :func:`client_spectra`), reused when ``n >= rank``.

  Returns:
    ``(K,)`` bool benign mask of size ``h``.
  """
  columns, active = clients.columns, clients.active
  m, num_clients, n = columns.shape
  group = math.ceil(rank / n)
  candidate_ids = jnp.round(jnp.linspace(0, num_clients - 1, num_candidates)).astype(jnp.int32)
  offsets = jnp.arange(group)
  members = (candidate_ids[:, None] + offsets[None, :]) % num_clients  # (C, group)
  if group == 1:
    if own_left is None:
      own_left = own_subspaces(jnp.transpose(columns, (1, 0, 2)), rank)[1]
    # Every client proposing: no gather, so clients sharded on axis 0 stay in place.
    subspaces = own_left if num_candidates == num_clients else own_left[candidate_ids]
  else:
    proposals = jnp.transpose(columns[:, members], (1, 0, 2, 3)).reshape(
        num_candidates, m, group * n)
    subspaces = own_subspaces(proposals, rank)[1]                      # (C, m, r)
  h = majority_size(active)
  width = subspaces.shape[2]
  stacked = jnp.transpose(subspaces, (1, 0, 2)).reshape(m, num_candidates * width)
  explained = jnp.sum(subspace_coefficients(columns, stacked) ** 2, axis=2)  # (C r, K)
  explained = jnp.sum(explained.reshape(num_candidates, width, num_clients), axis=1)
  fractions = _unexplained(explained, clients.energy[None, :])                # (C, K)
  costs = jax.vmap(lambda f: smallest_sum(f, active, h))(fractions)
  costs = jnp.where(jnp.all(active[members], axis=1), costs, jnp.inf)
  best = jnp.argmin(costs)
  return smallest_mask(fractions[best], active, h)


class ClientSpectra(NamedTuple):
  """What each client's own block says, from one batched small-Gram ``eigh``."""

  tail: jax.Array | None  # (K,) energy beyond the top r singular values; None if min(m, n) <= r
  left: jax.Array         # (K, m, min(r, m, n)) top left singular vectors (zero if unresolved)


def client_spectra(updates: jax.Array, rank: int) -> ClientSpectra:
  """Each client's spectral tail and own top-``rank`` subspace (:func:`own_subspaces`).

  The tail ``sum_{i > r} s_i(D_k)^2``: for a benign client (rank-``r`` signal plus noise)
  this is noise only, so it calibrates the client's *own* noise level. The subspaces are
  the consensus search's candidates (:func:`consensus_start`).
  """
  _, m, n = updates.shape
  squared, left = own_subspaces(updates, min(rank, m, n))
  if min(m, n) <= rank:
    return ClientSpectra(None, left)
  tail = jnp.sum(squared[:, : min(m, n) - rank], axis=1)                # ascending
  return ClientSpectra(jnp.maximum(tail, 0.0), left)


def count_unsupported(columns, benign, subspace, own_tail, floor, coefficients=None):
  r"""How many clients of the ``benign`` set hold no significant signal in ``subspace``.

  Counting clients, not energy, is what lets a benign majority win against a coherent
  group with larger norms, even when each benign client's signal is weaker than its
  noise: residual tests cannot tell noise from a weak signal left out, but the subspace
  of the larger group holds *no signal* from the majority it calls benign. With the
  client's own noise variance :math:`\hat\sigma_k^2 = t_k / ((m - r)(n - r))` (its
  spectral tail, at least ``floor^2 / (m n)``), a client is supported when its in-subspace
  energy is 4 standard deviations above pure noise:
  :math:`\|U^\top D_k\|_F^2 > \hat\sigma_k^2 (r n + 4\sqrt{2 r n})`.
  Returns 0 when there is no spectral tail (``n <= r``). ``columns``: the column layout
  ``(m, K, n)``; ``coefficients``: ``U^T D_k`` if already computed.
  """
  if own_tail is None:
    return jnp.asarray(0, jnp.int32)
  m, _, n = columns.shape
  rank = subspace.shape[1]
  noise_variance = jnp.maximum(own_tail / ((m - rank) * (n - rank)), floor**2 / (m * n))
  dof = rank * n
  if coefficients is None:
    coefficients = subspace_coefficients(columns, subspace)
  energy = jnp.sum(coefficients**2, axis=(0, 2))
  supported = energy > noise_variance * (dof + 4.0 * jnp.sqrt(2.0 * dof))
  return jnp.sum(benign & ~supported).astype(jnp.int32)


def better_split(first: Split, second: Split) -> jax.Array:
  """Whether ``first`` beats ``second``: fewer unsupported benign clients, then lower
  trimmed objective (the sum of the ``h`` smallest unexplained fractions)."""
  return (first.unsupported < second.unsupported) | (
      (first.unsupported == second.unsupported) & (first.objective <= second.objective))


def select_split(first: Split, second: Split) -> Split:
  """The better of two splits (see :func:`better_split`), elementwise so it traces."""
  take_first = better_split(first, second)
  return jax.tree.map(lambda a, b: jnp.where(take_first, a, b), first, second)


def robust_threshold(scores, benign, threshold_ratio, mad_multiplier):
  """``max(rho, exp(med_B log s + z * 1.4826 * MAD_B(log s)))``.

  Scores are ratios (benign median ~1) and benign clients differ multiplicatively (one
  client's noise twice another's), so the band is set on the log scale: it reduces to the
  floor ``rho`` when benign clients agree and widens as they spread.
  """
  logs = jnp.log(jnp.maximum(scores, jnp.finfo(scores.dtype).tiny))
  centre = masked_median(logs, benign)
  spread = MAD_TO_STD * masked_median(jnp.abs(logs - centre), benign)
  return jnp.maximum(threshold_ratio, jnp.exp(centre + mad_multiplier * spread))


def score_split(
    clients: Clients,
    benign: jax.Array,
    rank: int,
    *,
    threshold_ratio: float,
    mad_multiplier: float,
    scale_floor: float,
    fixed_scale: jax.Array | None = None,
    basis: jax.Array | None = None,
    fit_method: str = "auto",
) -> Split:
  r"""Fits ``U`` on ``benign``, scores every client with two tests, returns the split.

  With residuals :math:`\rho_k = \|(I - \hat U \hat U^\top) D_k\|_F`:

  * residual test (garbage, large off-subspace updates):
    :math:`a_k = \rho_k / \max(\operatorname{med}_{j \in B} \rho_j, \epsilon)`;
  * structure test (heteroscedastic-robust; a client whose off-subspace part exceeds its
    *own* noise, as a coherent group does): with :math:`t_k` the tail energy of
    :math:`D_k` beyond its top ``r`` singular values,
    :math:`b_k = \rho_k / \sqrt{t_k\, n / (n - r)}`, divided by
    :math:`\max(\operatorname{med}_{j \in B} b_j, 1)`.

  Each test has threshold :func:`robust_threshold` (the floor ``threshold_ratio``, widened
  on the log scale by the benign spread),
  and the reported score is :math:`\max(a_k / \tau_a, b_k / \tau_b)`: a client is benign
  when it is at most 1. At least a majority ``h`` of active clients is kept (the ``h``
  lowest scores), since a contaminated majority is not identifiable. ``fixed_scale``
  replaces the benign median residual (a known noise level). ``basis`` warm-starts an
  iterative fit (:func:`clair_jax._src.subspace.fit_columns`, ``fit_method``). The
  structure test needs ``clients.own_tail`` (it is skipped when that is ``None``).
  """
  columns, active, own_tail = clients.columns, clients.active, clients.own_tail
  subspace, next_basis = fit_columns(columns, benign, rank, fit_method, basis)
  if next_basis is None:
    next_basis = jnp.zeros((columns.shape[0], 0), columns.dtype)
  # U^T D_k once: the residuals, the objective and the support count all need it.
  coefficients = subspace_coefficients(columns, subspace)
  residuals = residual_norms(columns, subspace, coefficients)
  if fixed_scale is None:
    scale = jnp.maximum(masked_median(residuals, benign), scale_floor)
  else:
    scale = jnp.asarray(fixed_scale, residuals.dtype)
  residual_scores = jnp.where(active, residuals / scale, jnp.inf)
  residual_threshold = robust_threshold(residual_scores, benign, threshold_ratio,
                                        mad_multiplier)
  scores = residual_scores / residual_threshold
  if own_tail is None:
    structure_scores = jnp.zeros_like(residual_scores)
    structure_threshold = jnp.asarray(jnp.inf, residuals.dtype)
  else:
    n = columns.shape[2]
    # A client whose own update has rank <= r (a LoRA adapter of rank <= r, noiseless
    # data) has no spectral tail, so its own noise level is unknown: the structure test
    # abstains for it (score 0) and it does not enter the test's median and spread.
    has_tail = own_tail > TAIL_FRACTION_FLOOR * clients.energy
    expected = jnp.maximum(jnp.sqrt(own_tail * n / (n - rank)), scale_floor)
    structure = jnp.where(has_tail, residuals / expected, 0.0)
    reference = benign & has_tail
    structure = structure / jnp.maximum(masked_median(structure, reference), 1.0)
    structure_scores = jnp.where(active, structure, jnp.inf)
    structure_threshold = robust_threshold(structure_scores, reference, threshold_ratio,
                                           mad_multiplier)
    scores = jnp.maximum(scores, structure_scores / structure_threshold)
  h = majority_size(active)
  new_benign = active & (scores <= 1.0)
  new_benign = jnp.where(jnp.sum(new_benign) >= h, new_benign, smallest_mask(scores, active, h))
  unexplained = unexplained_fraction(columns, subspace, coefficients, clients.energy)
  objective = smallest_sum(unexplained, active, h)
  unsupported = count_unsupported(columns, new_benign, subspace, own_tail, scale_floor,
                                  coefficients)
  return Split(new_benign, subspace, scores, residual_scores, structure_scores,
               jnp.stack([residual_threshold, structure_threshold]), scale, unsupported,
               objective, jnp.asarray(0, jnp.int32), next_basis)


def concentrate(
    clients: Clients,
    start: jax.Array,
    rank: int,
    *,
    max_steps: int,
    threshold_ratio: float,
    mad_multiplier: float,
    scale_floor: float,
    fixed_scale: jax.Array | None = None,
    fit_method: str = "auto",
) -> Split:
  """C-steps from ``start`` until the benign set stops changing (or ``max_steps``).

  Returns the split scored on the final benign set, so ``scores``, ``thresholds`` and
  ``subspace`` are consistent with each other. Each fit is warm-started from the previous
  one when ``fit_method`` is ``"auto"`` (iterative for large ``m``) or ``"iterative"``.
  """
  score = lambda benign, basis: score_split(
      clients, benign, rank, threshold_ratio=threshold_ratio,
      mad_multiplier=mad_multiplier, scale_floor=scale_floor, fixed_scale=fixed_scale,
      basis=basis if basis is not None and basis.shape[1] else None, fit_method=fit_method)
  first = score(start, None)
  state = (jnp.asarray(1, jnp.int32), start, first)

  def cond(state):
    step, previous, split = state
    return (step < max_steps) & jnp.any(previous != split.benign)

  def body(state):
    step, _, split = state
    return step + 1, split.benign, score(split.benign, split.basis)

  steps, _, split = jax.lax.while_loop(cond, body, state)
  return split._replace(num_steps=steps)
