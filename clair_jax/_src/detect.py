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

from clair_jax._src.robust import robust_threshold
from clair_jax._src.robust import weighted_median
from clair_jax._src.subspace import fit_columns
from clair_jax._src.subspace import subspace_coefficients

# Spectral-tail energy below this fraction of a client's energy is round-off, not noise.
TAIL_FRACTION_FLOOR = 1e-5
# A squared singular value below this fraction of the client's energy is round-off.
RANK_FRACTION_FLOOR = 1e-6


def noise_width(width, n: int, rank: int):
  """Columns a client's noise spans, in ``[r + 1, n]`` (``n`` when ``width`` is None).

  A dense noisy ``m x n`` update spans ``n``; a LoRA update of rank ``q`` spans ``q``
  (:attr:`ClientSpectra.width`). Every noise count below (degrees of freedom, the tail's
  share) uses it, so a dense LoRA update and its factored reduction score the same.
  """
  if width is None:
    return jnp.asarray(float(n))
  return jnp.clip(width, rank + 1, n)


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


def majority_mass(weights: jax.Array) -> jax.Array:
  """``floor(W / 2) + 1`` (at most ``W``) for total client weight ``W = sum_k w_k``: the
  smallest weight of a benign set that is a majority (:func:`majority_size` for 0/1
  weights)."""
  total = jnp.sum(weights)
  return jnp.minimum(jnp.floor(total / 2) + 1, total)


def weighted_smallest_sum(values: jax.Array, weights: jax.Array, mass: jax.Array) -> jax.Array:
  """``sum_i w_i v_i`` over the smallest values until their weight reaches ``mass`` (the
  last one counted in part); :func:`smallest_sum` for 0/1 weights and integer ``mass``."""
  order = jnp.argsort(jnp.where(weights > 0, values, jnp.inf))
  ordered, w = values[order], jnp.maximum(weights[order], 0.0)
  before = jnp.cumsum(w) - w
  taken = jnp.clip(mass - before, 0.0, w)
  return jnp.sum(jnp.where(taken > 0, ordered * taken, 0.0))


def weighted_smallest_mask(values: jax.Array, weights: jax.Array, mass: jax.Array) -> jax.Array:
  """The clients of smallest ``values`` whose weight first reaches ``mass`` (ties by index);
  :func:`smallest_mask` for 0/1 weights and integer ``mass``."""
  valid = weights > 0
  order = jnp.argsort(jnp.where(valid, values, jnp.inf))
  w = jnp.where(valid, weights, 0.0)[order]
  before = jnp.cumsum(w) - w
  chosen = jnp.zeros(values.shape, bool).at[order].set(before < mass)
  return chosen & valid


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
  weights: jax.Array          # (K,) 1 / size of the client's near-duplicate group; 0 inactive
  width: jax.Array            # (K,) columns each client's noise spans (ClientSpectra.width)
  representative: jax.Array   # (K,) bool, one client per near-duplicate group


def prepare_clients(columns: jax.Array, active: jax.Array,
                    spectra: ClientSpectra | None = None,
                    rank: int | None = None, sketch: bool = False) -> Clients:
  """:class:`Clients` from the column layout (inactive clients already zeroed).

  With the clients' ``spectra`` (:func:`client_spectra`) and ``rank``, near-duplicate
  clients share one unit of weight (:func:`duplicate_weights`); otherwise exact
  duplicates do. ``sketch`` (clients sharded over devices) compares clients on a
  random sketch instead of gathering them.
  """
  energy = jnp.sum(columns**2, axis=(0, 2))
  own_tail = None if spectra is None else spectra.tail
  width = (jnp.full(active.shape, columns.shape[2], columns.dtype) if spectra is None
           else spectra.width)
  weights, representative = duplicate_weights(columns, active, energy, own_tail, rank, width,
                                              sketch)
  return Clients(columns, active, energy, own_tail, weights, width, representative)


# Relative distance below which two clients' updates count as the same (round-off).
DUPLICATE_ROUNDOFF = 1e-6


# Size of the sketch that sharded clients' pairwise distances are computed on.
SKETCH_ROWS = 16
SKETCH_SIZE = 128


def duplicate_weights(columns: jax.Array, active: jax.Array, energy: jax.Array,
                      own_tail: jax.Array | None = None,
                      rank: int | None = None, width: jax.Array | None = None,
                      sketch: bool = False) -> tuple[jax.Array, jax.Array]:
  r"""Weight ``1 / |G_k|`` for each client, ``G_k`` its group of near-duplicates.

  Clients that trained independently carry independent noise, so two of them differ by at
  least both noises: :math:`\|D_i - D_j\|_F^2 \approx \|\Delta_i - \Delta_j\|_F^2 +
  (\sigma_i^2 + \sigma_j^2)\, m n`. Each client's own noise level comes from its own
  spectrum (the tail beyond rank ``r``, :func:`client_spectra`):
  :math:`\hat\sigma_k^2 = t_k / ((m - r)(n - r))`, a statistic no other client can move
  (it is biased low, which only makes the test stricter). Clients ``i`` and ``j`` are
  near-duplicates when

  .. math::
    \|D_i - D_j\|_F^2 \le \tfrac12 (\hat\sigma_i^2 + \hat\sigma_j^2)\, m n
      + 10^{-6} (\|D_i\|_F^2 + \|D_j\|_F^2),

  i.e. they share more than half of what would be their independent noise. For benign
  clients the left side concentrates at or above twice the right (``m n`` degrees of
  freedom), so an honest pair essentially never qualifies; a group of clients sending one
  crafted vector (ALIE, min-max, min-sum, Opt-ALIE, copies of one client), with or without
  small independent perturbations, does. Counting every group as *one* client keeps it
  from winning the majority count or setting the noise level (:func:`majority_mass`,
  :func:`weighted_median`). Without spectral tails (``n <= r``) only exact duplicates
  (up to round-off) are grouped.

  Returns:
    ``((K,) weights, (K,) representatives)``: ``1 / #{j active: j near-duplicate of k}``
    (``k`` included; 0 for inactive clients), and one client per group (the first).
  """
  m, _, n = columns.shape
  if sketch:
    # Clients sharded over devices: pairwise distances of all clients would gather every
    # update. A Johnson-Lindenstrauss sketch G_L^T D_k G_R (a x b, a b = SKETCH_SIZE)
    # preserves squared distances to a relative ~sqrt(2 / (a b)) (~12%), well inside the
    # factor-2 margin of the test below; only the (K, a b) sketches move.
    a, b = min(m, SKETCH_ROWS), min(n, SKETCH_SIZE // min(m, SKETCH_ROWS))
    key_left, key_right = jax.random.split(jax.random.key(0))
    left = jax.random.normal(key_left, (m, a), columns.dtype) / math.sqrt(a)
    right = jax.random.normal(key_right, (n, b), columns.dtype) / math.sqrt(b)
    sketches = jnp.einsum("mkn,ma,nb->kab", columns, left, right).reshape(columns.shape[1], -1)
    sketch_energy = jnp.sum(sketches**2, axis=1)
    inner = sketches @ sketches.T
    distance = sketch_energy[:, None] + sketch_energy[None, :] - 2.0 * inner
  else:
    inner = jnp.einsum("mkn,mjn->kj", columns, columns)
    distance = energy[:, None] + energy[None, :] - 2.0 * inner
  bound = DUPLICATE_ROUNDOFF * (energy[:, None] + energy[None, :])
  if own_tail is not None and rank is not None and min(m, n) > rank:
    columns_spanned = noise_width(width, n, rank)
    noise = own_tail * m * columns_spanned / ((m - rank) * (columns_spanned - rank))
    bound = bound + 0.5 * (noise[:, None] + noise[None, :])
  same = (distance <= bound) & active[:, None] & active[None, :]
  same = same | jnp.diag(active)
  group = jnp.sum(same, axis=1)
  weights = jnp.where(active, 1.0 / jnp.maximum(group, 1), 0.0).astype(columns.dtype)
  # One representative per group: no earlier client is its near-duplicate.
  earlier = jnp.arange(same.shape[0])[None, :] < jnp.arange(same.shape[0])[:, None]
  return weights, active & ~jnp.any(same & earlier, axis=1)


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
  unsupported: jax.Array       # weight of benign clients with no significant signal in U
  objective: jax.Array         # trimmed sum of unexplained fractions (lower is better)
  incomplete: jax.Array        # bool: the benign residual holds a direction most of B carry
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
  h = majority_mass(clients.weights)
  width = subspaces.shape[2]
  stacked = jnp.transpose(subspaces, (1, 0, 2)).reshape(m, num_candidates * width)
  explained = jnp.sum(subspace_coefficients(columns, stacked) ** 2, axis=2)  # (C r, K)
  explained = jnp.sum(explained.reshape(num_candidates, width, num_clients), axis=1)
  fractions = _unexplained(explained, clients.energy[None, :])                # (C, K)
  costs = jax.vmap(lambda f: weighted_smallest_sum(f, clients.weights, h))(fractions)
  costs = jnp.where(jnp.all(active[members], axis=1), costs, jnp.inf)
  best = jnp.argmin(costs)
  return weighted_smallest_mask(fractions[best], clients.weights, h)


class ClientSpectra(NamedTuple):
  """What each client's own block says, from one batched small-Gram ``eigh``."""

  tail: jax.Array | None  # (K,) energy beyond the top r singular values; None if min(m, n) <= r
  left: jax.Array         # (K, m, min(r, m, n)) top left singular vectors (zero if unresolved)
  width: jax.Array        # (K,) columns the noise spans: n if full rank, else the numerical rank


def client_spectra(updates: jax.Array, rank: int) -> ClientSpectra:
  """Each client's spectral tail and own top-``rank`` subspace (:func:`own_subspaces`).

  The tail ``sum_{i > r} s_i(D_k)^2``: for a benign client (rank-``r`` signal plus noise)
  this is noise only, so it calibrates the client's *own* noise level. The subspaces are
  the consensus search's candidates (:func:`consensus_start`).
  """
  _, m, n = updates.shape
  squared, left = own_subspaces(updates, min(rank, m, n))
  # A client of numerical rank q < min(m, n) (a LoRA adapter of rank q) has noise on q
  # columns' worth of degrees of freedom, not n (see sampling_floors).
  energy = jnp.sum(squared, axis=1, keepdims=True)
  numerical_rank = jnp.sum(squared > RANK_FRACTION_FLOOR * energy, axis=1)
  width = jnp.where(numerical_rank >= min(m, n), n, numerical_rank).astype(updates.dtype)
  if min(m, n) <= rank:
    return ClientSpectra(None, left, width)
  tail = jnp.sum(squared[:, : min(m, n) - rank], axis=1)                # ascending
  return ClientSpectra(jnp.maximum(tail, 0.0), left, width)


def count_unsupported(columns, benign, subspace, own_tail, floor, coefficients=None,
                      weights=None, width=None):
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
  ``(m, K, n)``; ``coefficients``: ``U^T D_k`` if already computed; ``weights``: the
  clients' weights (near-duplicates count as one, :func:`duplicate_weights`), so the
  result is a weighted count.
  """
  if own_tail is None:
    return jnp.asarray(0.0, columns.dtype)
  if weights is None:
    weights = jnp.ones(benign.shape, columns.dtype)
  m, _, n = columns.shape
  rank = subspace.shape[1]
  columns_spanned = noise_width(width, n, rank)
  noise_variance = jnp.maximum(own_tail / ((m - rank) * (columns_spanned - rank)),
                               floor**2 / (m * n))
  dof = rank * columns_spanned
  if coefficients is None:
    coefficients = subspace_coefficients(columns, subspace)
  energy = jnp.sum(coefficients**2, axis=(0, 2))
  supported = energy > noise_variance * (dof + 4.0 * jnp.sqrt(2.0 * dof))
  return jnp.sum(jnp.where(benign & ~supported, weights, 0.0))


# Candidate directions per subspace dimension that the benign-set fit considers.
CANDIDATE_FACTOR = 2


# The median benign client must hold this multiple of the noise energy that the best
# noise direction would give it before a residual direction counts as carried.
RESIDUAL_CARRIED_FACTOR = 2.0


def residual_direction_carried(residual, weights, noise_variance, noise_columns,
                               residual_rows: int) -> jax.Array:
  r"""Whether the benign set's residual holds a direction that most of the set carries.

  A split whose subspace swapped one of the benign majority's directions for a direction
  of a coordinated minority (a tilt, the shared part of noisy ALIE updates) can pass every
  per-client test when each client's share of the lost direction is below its noise;
  pooled over the set, the lost direction stands out. With ``y`` the top direction of the
  benign clients' residual inside the candidate span (the fitted directions after the
  first ``r``) and
  :math:`\hat\sigma_k^2` each client's own noise variance, the residual is *carried* when

  .. math::
    \operatorname{med}^{(w)}_{k \in B}
      \frac{\|y^\top D_k\|^2}{\hat\sigma_k^2\, n_k\,(1 + \sqrt{(m - r) / (W n)})^2}
      \ \ge\ 2,

  where the bracket is the Marchenko-Pastur edge: the share of per-client noise that the
  best of ``m - r`` noise directions fitted on ``W`` clients collects. Noise alone stays
  near 1; a minority's direction has its median at the noise level.

  Args:
    residual: ``(c - r, K, n)`` coefficients on the candidate directions not in ``U``.
    weights: ``(K,)`` benign-set weights (0 outside).
    noise_variance: ``(K,)`` per-entry noise variance of each client (0: unknown, left out).
    noise_columns: ``(K,)`` or scalar, columns each client's noise spans (``n`` for dense
      noisy updates, the rank for LoRA ones; :func:`noise_width`).
    residual_rows: ``m - r``.

  Returns:
    scalar bool.
  """
  if residual.shape[0] == 0:
    return jnp.asarray(False)
  gram = jnp.einsum("k,akn,bkn->ab", weights, residual, residual)
  _, vectors = jnp.linalg.eigh(gram)
  energy = jnp.sum(jnp.tensordot(vectors[:, -1], residual, axes=(0, 0)) ** 2, axis=1)
  total = jnp.maximum(jnp.sum(weights), jnp.finfo(energy.dtype).tiny)
  typical_columns = weighted_median(jnp.broadcast_to(noise_columns, weights.shape), weights)
  edge = (1.0 + jnp.sqrt(residual_rows / (total * typical_columns))) ** 2
  known = noise_variance > 0
  ratio = energy / jnp.where(known, noise_variance * noise_columns * edge, 1.0)
  return weighted_median(ratio, jnp.where(known, weights, 0.0)) >= RESIDUAL_CARRIED_FACTOR


def better_split(first: Split, second: Split) -> jax.Array:
  """Whether ``first`` beats ``second``: a benign residual that most of the set does not
  carry (:func:`residual_direction_carried`), then fewer unsupported benign clients, then
  lower trimmed objective (the sum of the ``h`` smallest unexplained fractions)."""
  unsupported = (first.unsupported < second.unsupported) | (
      (first.unsupported == second.unsupported) & (first.objective <= second.objective))
  return (~first.incomplete & second.incomplete) | (
      (first.incomplete == second.incomplete) & unsupported)


def select_split(first: Split, second: Split) -> Split:
  """The better of two splits (see :func:`better_split`), elementwise so it traces."""
  take_first = better_split(first, second)
  return jax.tree.map(lambda a, b: jnp.where(take_first, a, b), first, second)


# Standard deviations of sampling noise that the default threshold floors allow.
FLOOR_DEVIATIONS = 4.0


def sampling_floors(m: int, n, rank: int) -> tuple[jax.Array, jax.Array]:
  r"""Default floors of the residual and structure thresholds, from degrees of freedom.

  A benign client's squared residual is its noise on ``d = (m - r) n`` degrees of
  freedom, so its ratio to a typical one has log-scale standard deviation about
  :math:`1/\sqrt{2d}`; the structure test also divides by the client's own tail,
  estimated on ``d_t = (m - r)(n - r)`` degrees of freedom:
  :math:`\sqrt{1/(2d) + 1/(2 d_t)}`. Each floor is ``exp(4 sd)``: a benign client passes
  it but for a ``~3e-5`` tail, and an attacker must keep its off-subspace part within that
  margin of its noise (the damage it can do shrinks with it). Heteroscedastic or
  heavy-tailed benign clients widen the thresholds through their own spread
  (:func:`robust_threshold`). ``n`` is the number of columns the noise spans (the
  clients' typical :attr:`ClientSpectra.width`; may be traced). ``m x n`` of 16 x 4 at
  rank 2 gives (1.46, 1.93); 64 x 16 at rank 4 gives (1.09, 1.15).
  """
  rows = max(m - rank, 1)
  d = rows * jnp.maximum(n, 1.0)
  d_tail = rows * jnp.maximum(n - rank, 1.0)
  residual = jnp.exp(FLOOR_DEVIATIONS / jnp.sqrt(2 * d))
  structure = jnp.exp(FLOOR_DEVIATIONS * jnp.sqrt(1 / (2 * d) + 1 / (2 * d_tail)))
  return residual, structure


def score_split(
    clients: Clients,
    benign: jax.Array,
    rank: int,
    *,
    threshold_ratio: float | None,
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
  # Near-duplicates share one unit of weight in every fit, median and count.
  weights = jnp.where(benign, clients.weights, 0.0)
  m, num_clients, n = columns.shape
  width = min(CANDIDATE_FACTOR * rank, m, num_clients * n)
  # Only the top `rank` directions must converge; the candidates after them are kept as
  # the iteration leaves them (see fit_columns's `converge`).
  candidates, next_basis = fit_columns(columns, weights, width, fit_method, basis,
                                       converge=rank)
  if next_basis is None:
    next_basis = jnp.zeros((m, 0), columns.dtype)
  # U^T D_k once: the residuals, the objective and the support count all need it.
  candidate_coefficients = subspace_coefficients(columns, candidates)
  subspace, coefficients = candidates[:, :rank], candidate_coefficients[:rank]
  residuals = residual_norms(columns, subspace, coefficients)
  if own_tail is not None:
    # A client whose own update has rank <= r (a LoRA adapter of rank <= r, noiseless
    # data) has no spectral tail, so its own noise level is unknown: the structure test
    # abstains for it (score 0) and it does not enter the tests' medians and spreads.
    has_tail = own_tail > TAIL_FRACTION_FLOOR * clients.energy
    spanned = noise_width(clients.width, n, rank)
    expected = jnp.maximum(jnp.sqrt(own_tail * spanned / (spanned - rank)), scale_floor)
  if fixed_scale is None:
    scale = jnp.maximum(weighted_median(residuals, weights), scale_floor)
    if own_tail is not None:
      # The residual scale is never below the noise that the clients' own spectra
      # predict, over *all* active clients: a minority of clean or identical updates
      # inside the benign set cannot drag it down (they are not a weighted majority).
      # (A client with no tail is noiseless to round-off: it predicts ~0.)
      scale = jnp.maximum(scale, weighted_median(expected, clients.weights))
  else:
    scale = jnp.asarray(fixed_scale, residuals.dtype)
  # The fitted U carries the benign noise: projecting a client with in-subspace
  # coefficients C_k onto it leaves sigma^2 (m - r) sum_j |C_kj|^2 / lambda_j on average
  # (first-order perturbation of U, lambda_j the benign energy on direction j), so a
  # client far larger than the others inside the subspace (an in-subspace boost) is not
  # mistaken for one off it: each test divides by sqrt(1 + leverage_k / n), n the columns
  # the client's noise spans (ClientSpectra.width).
  inside = jnp.sum(coefficients**2, axis=2)                                # (r, K)
  direction_energy = jnp.sum(inside * weights[None, :], axis=1)
  leverage = jnp.sum(
      inside / jnp.maximum(direction_energy, jnp.finfo(inside.dtype).tiny)[:, None], axis=0)
  inflation = jnp.sqrt(1.0 + leverage / jnp.maximum(jnp.minimum(clients.width, n), 1.0))
  residual_scores = jnp.where(active, residuals / (scale * inflation), jnp.inf)
  if threshold_ratio is not None:
    residual_floor = structure_floor = threshold_ratio
  else:
    # The noise of a client of numerical rank q < min(m, n) spans q columns, not n.
    width = weighted_median(jnp.minimum(clients.width, n), clients.weights)
    residual_floor, structure_floor = sampling_floors(m, width, rank)
    if own_tail is not None:
      # Clients without a spectral tail have rank <= r: their residual lives on at most
      # (m - r) r degrees of freedom, and nothing says it is i.i.d. noise there.
      tailless = jnp.where(has_tail, 0.0, clients.weights)
      residual_floor = jnp.where(2 * jnp.sum(tailless) >= jnp.sum(clients.weights),
                                 sampling_floors(m, min(n, rank), rank)[0], residual_floor)
  residual_threshold = robust_threshold(residual_scores, benign, residual_floor,
                                        mad_multiplier, clients.weights)
  scores = residual_scores / residual_threshold
  if own_tail is None:
    structure_scores = jnp.zeros_like(residual_scores)
    structure_threshold = jnp.asarray(jnp.inf, residuals.dtype)
  else:
    structure = jnp.where(has_tail, residuals / (expected * inflation), 0.0)
    reference = jnp.where(has_tail, weights, 0.0)
    structure = structure / jnp.maximum(weighted_median(structure, reference), 1.0)
    structure_scores = jnp.where(active, structure, jnp.inf)
    structure_threshold = robust_threshold(structure_scores, reference > 0, structure_floor,
                                           mad_multiplier, clients.weights)
    scores = jnp.maximum(scores, structure_scores / structure_threshold)
  h = majority_mass(clients.weights)
  new_benign = active & (scores <= 1.0)
  new_benign = jnp.where(jnp.sum(jnp.where(new_benign, clients.weights, 0.0)) >= h, new_benign,
                         weighted_smallest_mask(scores, clients.weights, h))
  unexplained = unexplained_fraction(columns, subspace, coefficients, clients.energy)
  objective = weighted_smallest_sum(unexplained, clients.weights, h)
  unsupported = count_unsupported(columns, new_benign, subspace, own_tail, scale_floor,
                                  coefficients, clients.weights, clients.width)
  if own_tail is None:
    noise_variance = jnp.full(active.shape, scale**2 / (max(m - rank, 1) * n), columns.dtype)
    spanned = jnp.asarray(float(n), columns.dtype)
  else:
    noise_variance = jnp.where(has_tail, own_tail / ((m - rank) * (spanned - rank)), 0.0)
  incomplete = residual_direction_carried(
      candidate_coefficients[rank:], jnp.where(new_benign, clients.weights, 0.0),
      noise_variance, spanned, m - rank)
  return Split(new_benign, subspace, scores, residual_scores, structure_scores,
               jnp.stack([residual_threshold, structure_threshold]), scale, unsupported,
               objective, incomplete, jnp.asarray(0, jnp.int32), next_basis)


def concentrate(
    clients: Clients,
    start: jax.Array,
    rank: int,
    *,
    max_steps: int,
    threshold_ratio: float | None,
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
