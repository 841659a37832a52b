"""From trained client adapters to factored per-module updates, CLAIR through the core, and
refined adapters.

Orientation. ``nnx.LoRALinear`` computes ``y = x W + x A B`` with ``A = lora_a (in, r)``,
``B = lora_b (r, out)``, so a client's weight delta of one module is
``Delta W_k = A_k B_k`` of shape ``(in, out)``. The server broadcasts one LoRA
initialisation (the same ``A_0`` for every client, as in common federated LoRA practice)
and ``B`` starts at zero, so what a client *learns* is mostly in ``B_k``: the output
directions its adapter writes. Benign clients all write the new tokens (copy them, or map
them with skills), so their output directions share a subspace, while a corrupted-target client
writes other outputs and a random update writes everywhere. We therefore hand CLAIR
``D_k = (A_k B_k)^T = B_k^T A_k^T`` of shape ``(out, in)`` (``side="out"``, the default), as
its factors ``left_k = B_k^T`` ``(out, r)`` and ``right_k = A_k^T`` ``(r, in)``
(:func:`oriented_factors`): the shared structure is the column space (output side,
``m = out``), the client detail the coefficients on the input side. (``side="in"`` passes
``left_k = A_k``, ``right_k = B_k``; with a shared ``A_0`` its column space is
``~span(A_0)`` for *every* client, attackers included, which is why it is not the default.)
This is PEFT's ``B A`` orientation, the one :func:`clair_jax.aggregate_adapters` uses.

CLAIR is the core's whole-model pipeline (:mod:`clair_jax._src.joint`, which
:func:`clair_jax.aggregate_adapters` runs on PEFT adapters), on the factors: no dense
``(K, m, n)`` stack is formed for it.

1. :func:`detect`: :func:`clair_jax._src.joint.detect_modules` on every module (the exact
   factored reduction of ``clair(FactoredUpdates(left, right), rank)``, same-shape modules
   in one compiled call), then one verdict per client,
   :func:`clair_jax._src.joint.joint_verdict` (geometric mean over modules of score /
   threshold, then one robust cut capped at 1; its docstring says why).
2. :func:`refine`: :func:`clair_jax._src.joint.refine_modules` on every module with one
   benign set shared by all modules (the joint verdict's, or the true one for the
   reference row). Its :class:`clair_jax._src.joint.ModuleRefinement` is the refinement
   in factored form: ``shared`` ``U`` ``(m, w)``, the robust centre ``C_bar`` ``(w, n)``,
   the strength ``s`` ``(w,)`` and ``coefficients[k] = U^T left_k`` ``(w, q)``; client
   ``k``'s refined update is ``U ((1 - s) C_bar + s U^T left_k right_k)``
   (:func:`clair_jax._src.joint.refined_right`; ``s = 1`` keeps the client's own
   coefficients, ``s = 0`` gives every client the consensus ``U C_bar``).
3. Refined updates go back as LoRA adapters of rank ``w`` (:func:`refined_adapters`): with
   ``side="out"``, ``Delta W~_k = Dtilde_k^T``, i.e. ``lora_a = right_k^T (in, w)`` per
   client and ``lora_b = U^T (w, out)`` shared by all clients. Flagged clients get their
   refined adapter too (their updates never enter the statistics; see ``experiment``).

With a fixed strength the refine does not rotate its subspace, and ``U``, ``C_bar`` and
the coefficients do not depend on the strength: one refinement at ``s = 1`` gives every
fixed strength (:func:`with_strength`), which is how the federated evaluation round gets
its candidates. A client with a non-finite factor in any module is left out of detection
and refinement, as :func:`clair_jax.aggregate_adapters` does (it is flagged with score
``+inf``, and receives the consensus ``U C_bar``).

Why not :func:`clair_jax.aggregate_adapters` itself: it detects again on every call and
refines only with its own verdict at one strength, while the study refines with the true
benign set too, at several fixed strengths, and with client-reported noise
(:func:`split_half_noise`), and also supports ``side="in"``. The functions it composes are
the ones called here.

The global rules (FedAvg, median, trimmed mean, multi-Krum, ...) are defined on dense
updates, so they (and the dense evaluation of ``local``) still read the weight deltas
``A_k B_k`` (:func:`module_updates`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax
from clair_jax import baselines
from clair_jax._src import joint
from clair_jax._src.joint import JointVerdict as Verdict
from clair_jax._src.joint import joint_verdict
from clair_jax._src.joint import robust_cut  # noqa: F401  (re-exported for the study's users)

Path = tuple
SIDES = ("out", "in")


def get_path(tree: dict, path: Path) -> Any:
  """``tree[p0][p1]...`` for a pure-dict state."""
  for p in path:
    tree = tree[p]
  return tree


def module_updates(lora: dict, paths: tuple[Path, ...]) -> dict[Path, jax.Array]:
  """Per-module, per-client dense weight deltas ``A_k B_k`` (the global rules, ``local``).

  Args:
    lora: stacked adapters as a pure dict (``nnx.to_pure_dict``), leaves ``(K, ...)``.
    paths: adapted module paths (``model.adapted_modules``).

  Returns:
    ``{path: (K, in, out)}``.
  """
  out = {}
  for path in paths:
    node = get_path(lora, path)["lora"]
    out[path] = jnp.einsum("kir,kro->kio", node["lora_a"], node["lora_b"])
  return out


def oriented_factors(lora_a: jax.Array, lora_b: jax.Array, side: str):
  """``(left (K, m, q), right (K, q, n))`` with ``left_k right_k = orient(A_k B_k, side)``.

  ``side="out"``: ``left = B^T``, ``right = A^T`` (``m = out``); ``side="in"``:
  ``left = A``, ``right = B`` (``m = in``). The inverse of :func:`to_lora_factors`.
  """
  _check_side(side)
  if side == "in":
    return lora_a, lora_b
  return jnp.swapaxes(lora_b, -1, -2), jnp.swapaxes(lora_a, -1, -2)


def module_factors(lora: dict, paths: tuple[Path, ...], side: str) -> dict:
  """Per-module, per-client factored updates handed to CLAIR (:func:`oriented_factors`).

  Args:
    lora: stacked adapters as a pure dict, leaves ``(K, ...)``.
    paths: adapted module paths.
    side: ``"out"`` or ``"in"``.

  Returns:
    ``{path: (left (K, m, q), right (K, q, n))}``.
  """
  out = {}
  for path in paths:
    node = get_path(lora, path)["lora"]
    out[path] = oriented_factors(jnp.asarray(node["lora_a"]), jnp.asarray(node["lora_b"]),
                                 side)
  return out


def poison_adapters(
    lora: dict, paths: tuple[Path, ...], kinds: tuple[str, ...], *, scale: float,
    key: jax.Array,
) -> dict:
  """Replaces update attackers' adapters (``scaled_random``, ``nan``) in place of training.

  A ``scaled_random`` client sends Gaussian factors rescaled so that
  ``||A B||_F = scale * median_k ||A_k B_k||_F`` (median over the other clients, per module);
  a ``nan`` client sends NaN factors.

  Args:
    lora: stacked adapters (pure dict), leaves ``(K, ...)``.
    paths: adapted module paths.
    kinds: per-client kind (``data.client_kinds``).
    scale: norm multiple of a ``scaled_random`` update.
    key: PRNG key.

  Returns:
    new pure dict with the attackers' factors replaced.
  """
  kinds = np.asarray(kinds)
  rand = jnp.asarray(kinds == "scaled_random")
  nan = jnp.asarray(kinds == "nan")
  honest = jnp.asarray((kinds != "scaled_random") & (kinds != "nan"))
  lora = jax.tree.map(lambda x: x, lora)
  for path in paths:
    node = get_path(lora, path)["lora"]
    a, b = node["lora_a"], node["lora_b"]
    key, ka, kb = jax.random.split(key, 3)
    ra, rb = jax.random.normal(ka, a.shape), jax.random.normal(kb, b.shape)
    norms = jnp.linalg.norm(jnp.einsum("kir,kro->kio", a, b), axis=(1, 2))
    typical = jnp.nanmedian(jnp.where(honest, norms, jnp.nan))
    rnorm = jnp.linalg.norm(jnp.einsum("kir,kro->kio", ra, rb), axis=(1, 2))
    c = jnp.sqrt(scale * typical / rnorm)[:, None, None]
    a = jnp.where(rand[:, None, None], c * ra, a)
    b = jnp.where(rand[:, None, None], c * rb, b)
    a = jnp.where(nan[:, None, None], jnp.nan, a)
    b = jnp.where(nan[:, None, None], jnp.nan, b)
    node["lora_a"], node["lora_b"] = a, b
  return lora


def _check_side(side: str) -> None:
  if side not in SIDES:
    raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def orient(delta_w: jax.Array, side: str) -> jax.Array:
  """``(K, in, out)`` weight deltas -> the dense matrices the global rules read (an involution).

  ``side="out"``: ``D_k = (A_k B_k)^T`` of shape ``(out, in)``, shared column space on the
  output side; ``side="in"``: ``D_k = A_k B_k`` of shape ``(in, out)``.
  """
  _check_side(side)
  return delta_w if side == "in" else jnp.swapaxes(delta_w, -1, -2)


def to_lora_factors(left: jax.Array, right: jax.Array, side: str):
  """LoRA ``(lora_a (K, in, r), lora_b (K, r, out))`` of ``D_k = left_k right_k``.

  ``side="in"``: ``Delta W = D`` so ``A = left``, ``B = right``; ``side="out"``:
  ``Delta W = D^T = right^T left^T`` so ``A = right^T``, ``B = left^T``.
  """
  _check_side(side)
  if side == "in":
    return left, right
  return jnp.swapaxes(right, -1, -2), jnp.swapaxes(left, -1, -2)


def _group_by_shape(updates: dict) -> dict[tuple, list]:
  groups: dict[tuple, list] = {}
  for path, u in updates.items():
    shapes = tuple(tuple(x.shape) for x in jax.tree.leaves(u))
    groups.setdefault(shapes, []).append(path)
  return groups


@functools.lru_cache(maxsize=64)
def _batched(fn, num_args: int):
  return jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * num_args))


def map_modules(fn, updates: dict, *args) -> dict:
  """Applies ``fn(u, *args)`` (one module's ``(K, m, n)`` -> pytree) to every module.

  Modules that share a shape go through one jitted ``jax.vmap`` call (``args`` are
  shared by all modules, not mapped); returns ``{path: fn(updates[path], *args)}``.
  ``updates[path]`` may also be a tuple whose first entry is the ``(K, m, n)`` update
  (per-module extras ride along, mapped like it). The compiled call is cached per
  ``fn``, so pass module-level functions and put what changes between calls in ``args``.
  """
  out = {}
  batched = _batched(fn, len(args))
  for paths in _group_by_shape(updates).values():
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[updates[p] for p in paths])
    result = batched(stacked, *args)
    for j, p in enumerate(paths):
      out[p] = jax.tree.map(lambda x, j=j: x[j], result)
  return out


def baseline_rules(num_clients: int, num_byzantine: int, *, key: jax.Array) -> dict:
  """The global aggregation rules compared with CLAIR, ``{name: (K, m, n) -> (K, m, n)}``.

  Consistent with the synthetic study: ``trimmed_mean`` trims the configured
  contamination fraction ``f / K`` at each end, ``multi_krum`` averages the ``K - f``
  clients with the smallest Krum scores for ``f = num_byzantine``. The peer defences
  (``nnm_trimmed_mean``, ``centered_clipping``, ``bucketing``) are included when
  :mod:`clair_jax.baselines` provides them.
  """
  f = int(num_byzantine)
  trim = min(f / num_clients, 0.49)
  rules = {
      "fedavg": lambda u: baselines.fedavg(u).estimates,
      "median": lambda u: baselines.coordinate_median(u).estimates,
      "trimmed_mean": lambda u: baselines.trimmed_mean(u, trim).estimates,
      "multi_krum": lambda u: baselines.multi_krum(u, f).estimates,
      "geometric_median": lambda u: baselines.geometric_median(u).estimates,
  }
  if hasattr(baselines, "nnm_trimmed_mean"):
    rules["nnm_trimmed_mean"] = lambda u: baselines.nnm_trimmed_mean(u, f).estimates
  if hasattr(baselines, "centered_clipping"):
    rules["centered_clipping"] = lambda u: baselines.centered_clipping(u).estimates
  if hasattr(baselines, "bucketing"):
    rules["bucketing"] = lambda u: baselines.bucketing(u, key=key).estimates
  return rules


# --------------------------------------------------------------------------- CLAIR


def finite_clients(factors: dict) -> np.ndarray:
  """``(K,)`` bool: clients whose factors are finite in every module."""
  ok = [jnp.all(jnp.isfinite(x), axis=(1, 2)) for pair in factors.values() for x in pair]
  return np.asarray(functools.reduce(jnp.logical_and, ok))


def _finite_rows(factors: dict) -> tuple[np.ndarray, int]:
  """Indices of the finite clients (at least 3) and the number of clients."""
  finite = finite_clients(factors)
  rows = np.flatnonzero(finite)
  if rows.size < 3:
    raise ValueError(f"CLAIR needs at least 3 clients with finite adapters; got {rows.size} "
                     f"of {finite.size}.")
  return rows, finite.size


def _stack(factors: dict, paths: list, rows: np.ndarray):
  """``(J, K', m, q)`` and ``(J, K', q, n)`` stacks of the modules ``paths``, clients ``rows``."""
  left = jnp.stack([factors[p][0][rows] for p in paths])
  right = jnp.stack([factors[p][1][rows] for p in paths])
  return left, right


def _options(clair_options: dict | None) -> clair_jax.ClairOptions:
  """:class:`clair_jax.ClairOptions` of the study (the orientation is ours: ``side``)."""
  clair_options = dict(clair_options or {})
  if "side" in clair_options:
    raise ValueError("the orientation is set by the study's side ('out' / 'in'); "
                     "leave ClairOptions.side at 'left'.")
  return clair_jax.ClairOptions(**clair_options)


def _full_verdict(verdict: Verdict, rows: np.ndarray, num_clients: int) -> Verdict:
  """A verdict over the clients ``rows`` spread to all clients: the others flagged, ``+inf``."""
  def full(values, fill):
    out = np.full(values.shape[:-1] + (num_clients,), fill,
                  np.result_type(values.dtype, np.asarray(fill).dtype))
    out[..., rows] = values
    return out
  scores = full(verdict.module_scores, np.inf)
  return Verdict(full(verdict.contaminated, True), full(verdict.joint_scores, np.inf),
                 verdict.cut, scores, verdict.module_thresholds,
                 scores > verdict.module_thresholds[:, None])


def detect(factors: dict, rank: int, clair_options: dict | None = None,
           batching: str | None = None) -> Verdict:
  """CLAIR's detection on every module (core, factored) and the joint verdict across modules.

  Args:
    factors: ``{path: (left (K, m, q), right (K, q, n))}`` (:func:`module_factors`).
    rank: detection rank ``r``.
    clair_options: fields of :class:`clair_jax.ClairOptions`.
    batching: ``"vmap"`` / ``"map"`` over modules (default
      :func:`clair_jax._src.joint.default_batching`).

  Returns:
    the joint ``Verdict`` over all ``K`` clients (non-finite ones flagged with ``+inf``).
  """
  opts = joint.detection_options(_options(clair_options))
  batching = batching or joint.default_batching()
  rows, num_clients = _finite_rows(factors)
  weights = jnp.ones((rows.size,), jnp.float32)
  scores, thresholds = {}, {}
  for paths in _group_by_shape(factors).values():
    left, right = _stack(factors, paths, rows)
    found = jax.device_get(joint.detect_modules(left, right, weights, rank, opts,
                                                batching=batching))
    for j, path in enumerate(paths):
      scores[path] = np.asarray(found.scores[j], np.float64)
      thresholds[path] = float(found.threshold[j])
  verdict = joint_verdict(np.stack([scores[p] for p in factors]),
                          np.array([thresholds[p] for p in factors]))
  return _full_verdict(verdict, rows, num_clients)


@functools.partial(jax.jit, static_argnames=("rank", "opts", "batching"))
def _refine_modules_with_noise(left, right, noise, benign, rank: int, opts, batching: str):
  """:func:`clair_jax._src.joint.refine_modules` with client-reported in-subspace noise.

  ``noise`` is ``(J, K)``: per module, each client's reported noise (the refine uses the
  benign median). ``refine_modules`` takes ``subspace_noise`` from its static options, one
  value for every module, while the refine itself reads it as an array, so the per-module
  value is set inside the trace, on the same traced body.
  """
  def one(left_j, right_and_noise):
    right_j, noise_j = right_and_noise
    return joint.refine_module(left_j, right_j, benign, rank,
                               opts._replace(subspace_noise=noise_j))
  return joint.over_modules(one, batching)(left, (right, noise))


def _all_clients(refinement: joint.ModuleRefinement, rows: np.ndarray,
                 num_clients: int) -> joint.ModuleRefinement:
  """A refinement of the clients ``rows`` with ``coefficients`` for all clients (0 elsewhere)."""
  coefficients = refinement.coefficients
  full = jnp.zeros((num_clients,) + coefficients.shape[1:], coefficients.dtype)
  return refinement._replace(coefficients=full.at[rows].set(coefficients))


def _check_strength(strength):
  if isinstance(strength, str):
    if strength != "auto":
      raise ValueError(f"strength must be 'auto' or a number in [0, 1], got {strength!r}")
    return strength
  strength = float(strength)
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength must be 'auto' or a number in [0, 1], got {strength!r}")
  return strength


def refine(factors: dict, keep: np.ndarray, rank: int, strength="auto", *,
           subspace_noise: dict | None = None, clair_options: dict | None = None,
           batching: str | None = None) -> dict:
  """The core's per-module refine with the benign set ``keep`` (shared by all modules).

  :func:`clair_jax._src.joint.refine_modules` on the finite clients' factors (pooled
  refine; ``clair_options={"refine": "projection"}`` gives the paper's projection on the
  rank-``rank`` subspace of the kept clients).

  Args:
    factors: ``{path: (left (K, m, q), right (K, q, n))}``.
    keep: ``(K,)`` bool, clients treated as benign.
    rank: CLAIR's detection rank (the rank of ``refine="projection"``; the pooled refine
      picks its own).
    strength: ``"auto"`` (chosen per module and direction) or one float for every module.
    subspace_noise: ``{path: (K,)}`` client-reported noise of the in-subspace coefficients
      (``"auto"`` only; see :func:`split_half_noise`).
    clair_options: other fields of :class:`clair_jax.ClairOptions`.
    batching: see :func:`detect`.

  Returns:
    ``{path: ModuleRefinement}``, ``coefficients`` ``(K, w, q)`` for every client (zero for
    a non-finite one; :func:`refined_rights` gives it the consensus).
  """
  opts = _options(clair_options)._replace(refine_strength=_check_strength(strength))
  batching = batching or joint.default_batching()
  rows, num_clients = _finite_rows(factors)
  benign = jnp.asarray(np.asarray(keep, bool)[rows])
  out = {}
  for paths in _group_by_shape(factors).values():
    left, right = _stack(factors, paths, rows)
    if subspace_noise is None:
      found = joint.refine_modules(left, right, benign, rank, opts, batching=batching)
    else:
      noise = jnp.stack([jnp.asarray(subspace_noise[p], left.dtype)[rows] for p in paths])
      found = _refine_modules_with_noise(left, right, noise, benign, rank, opts, batching)
    for j, path in enumerate(paths):
      out[path] = _all_clients(jax.tree.map(lambda x, j=j: x[j], found), rows, num_clients)
  return out


def with_strength(refinement: joint.ModuleRefinement, strength: float):
  """The refinement at another fixed strength, without refitting.

  With a fixed strength the core's refine does not rotate its subspace, and ``shared``,
  ``centre`` and ``coefficients`` do not depend on the strength (only ``s`` does, on the
  ``rank`` used directions). So a refinement computed once at a fixed strength gives every
  candidate of the evaluation round.
  """
  used = jnp.arange(refinement.strength.shape[-1]) < refinement.rank
  value = jnp.where(used, jnp.asarray(strength, refinement.strength.dtype), 0.0)
  return refinement._replace(strength=value)


def refined_rights(refinement: joint.ModuleRefinement, right: jax.Array,
                   finite: np.ndarray) -> jax.Array:
  """``(K, w, n)``: every client's ``(1 - s) C_bar + s coefficients_k right_k``.

  :func:`clair_jax._src.joint.refined_right` for all clients at once; a non-finite client
  (no coefficients of its own) gets the centre, so its refined update is the consensus.
  """
  ok = jnp.asarray(finite)[:, None, None]
  s = refinement.strength[:, None]
  own = jnp.einsum("kwq,kqn->kwn", refinement.coefficients, jnp.where(ok, right, 0.0))
  return jnp.where(ok, (1.0 - s) * refinement.centre + s * own, refinement.centre)


def refined_adapters(refinements: dict, factors: dict, side: str) -> dict:
  """LoRA factors ``{path: (lora_a (K, in, w), lora_b (K, w, out))}`` of refinements.

  Client ``k``'s refined update is ``shared @ right_k`` (:func:`refined_rights`), a LoRA
  adapter of rank ``w`` (``rank`` of its columns used); :func:`to_lora_factors` puts the
  shared side on ``lora_b`` for ``side="out"``.
  """
  finite = finite_clients(factors)
  out = {}
  for path, refinement in refinements.items():
    right = refined_rights(refinement, factors[path][1], finite)
    left = jnp.broadcast_to(refinement.shared, (right.shape[0],) + refinement.shared.shape)
    out[path] = to_lora_factors(left, right, side)
  return out


def consensus_adapters(refinements: dict, num_clients: int, side: str) -> dict:
  """LoRA factors of the consensus ``shared @ centre`` (one update) for every client."""
  out = {}
  for path, refinement in refinements.items():
    left = jnp.broadcast_to(refinement.shared, (num_clients,) + refinement.shared.shape)
    right = jnp.broadcast_to(refinement.centre, (num_clients,) + refinement.centre.shape)
    out[path] = to_lora_factors(left, right, side)
  return out


def split_half_noise(refinements: dict, half_a: dict, half_b: dict) -> dict:
  """Per-client noise of the in-subspace coefficients from two half-data adapters.

  Client ``k`` trained two adapters on the two halves of its data; with ``U`` the shared
  subspace (its ``r`` used columns, sent by the server) and ``A_k``, ``B_k`` the oriented
  half-data updates, it reports

  .. math::
    \\hat\\sigma_k = \\|U^T (A_k - B_k)\\|_F / \\sqrt{4 r n},

  the per-entry noise std of a full-data coefficient ``U^T D_k`` if the update's noise
  variance scales as 1 / samples (``Var(A - B) = 2 * 2 Var(D)``); ``U^T A_k`` is computed
  from the factors, ``(U^T left) right``. This is the ``subspace_noise`` of :func:`refine`.

  Args:
    refinements: ``{path: ModuleRefinement}`` (the subspace and rank of each module).
    half_a, half_b: ``{path: (left, right)}`` oriented factored updates trained on each half.

  Returns:
    ``{path: (K,)}`` reported noise levels.
  """
  def coefficients(shared, pair):
    left, right = pair
    return jnp.einsum("kwq,kqn->kwn", jnp.einsum("mw,kmq->kwq", shared, left), right)

  out = {}
  for path, r in refinements.items():
    diff = coefficients(r.shared, half_a[path]) - coefficients(r.shared, half_b[path])
    n = diff.shape[-1]
    dof = 4.0 * jnp.maximum(r.rank, 1).astype(diff.dtype) * n
    out[path] = jnp.sqrt(jnp.sum(jnp.square(diff), axis=(1, 2)) / dof)
  return out


# --------------------------------------------------------------------------- the round


class Aggregation(NamedTuple):
  """CLAIR's verdict and refinements, and every global rule's updates.

  Attributes:
    factors: ``{path: (left (K, m, q), right (K, q, n))}`` the factored updates handed to
      CLAIR (:func:`module_factors`).
    deltas: ``{method: {path: (K, in, out)}}`` dense per-client updates of ``base``,
      ``local`` and the global rules (``baseline_rules``).
    verdict: CLAIR's joint ``Verdict``.
    refinements: ``{"detected" | "true_benign": {path: ModuleRefinement}}``: per module,
      the server-only refinement (``strength="auto"``) of the clients CLAIR keeps, and of
      the true benign set (a reference).
    timing: seconds spent in CLAIR (detection + server-only refinement) and the baselines.
  """

  factors: dict
  deltas: dict
  verdict: Verdict
  refinements: dict
  timing: dict


def aggregate(
    lora: dict, paths: tuple[Path, ...], *, rank: int, benign: np.ndarray, num_byzantine: int,
    side: str = "out", clair_options: dict | None = None, key: jax.Array | None = None,
) -> Aggregation:
  """Runs CLAIR on every module (joint verdict, server-only refinement) and every global rule.

  Args:
    lora: the clients' stacked adapters as a pure dict (after ``poison_adapters``).
    paths: adapted module paths.
    rank: CLAIR's detection rank ``r``.
    benign: ``(K,)`` ground truth (used by the ``true_benign`` reference only).
    num_byzantine: ``f``, the configured number of contaminated clients (multi-Krum,
      trimmed mean, NNM).
    side: orientation handed to CLAIR (:func:`oriented_factors`).
    clair_options: fields of :class:`clair_jax.ClairOptions` (detection and refine).
    key: PRNG key of randomised rules (bucketing).

  Returns:
    ``Aggregation`` (deltas in ``(K, in, out)``).
  """
  key = jax.random.key(0) if key is None else key
  factors = module_factors(lora, paths, side)
  t0 = time.perf_counter()
  verdict = detect(factors, rank, clair_options)
  detected = refine(factors, ~verdict.contaminated, rank, "auto",
                    clair_options=clair_options)
  jax.block_until_ready(detected)
  t1 = time.perf_counter()
  true_benign = refine(factors, np.asarray(benign, bool), rank, "auto",
                       clair_options=clair_options)

  updates = module_updates(lora, paths)
  num_clients = next(iter(updates.values())).shape[0]
  mats = {p: orient(u, side) for p, u in updates.items()}
  deltas = {"base": {p: jnp.zeros_like(u) for p, u in updates.items()}, "local": updates}
  for name, rule in baseline_rules(num_clients, num_byzantine, key=key).items():
    estimates = map_modules(rule, mats)
    deltas[name] = {p: orient(estimates[p], side) for p in paths}
  jax.block_until_ready(deltas)
  t2 = time.perf_counter()
  return Aggregation(
      factors, deltas, verdict, {"detected": detected, "true_benign": true_benign},
      {"clair_s": t1 - t0, "baselines_s": t2 - t1})
