"""From trained client adapters to per-module updates, aggregation and refined adapters.

Orientation. ``nnx.LoRALinear`` computes ``y = x W + x A B`` with ``A = lora_a (in, r)``,
``B = lora_b (r, out)``, so a client's weight delta of one module is
``Delta W_k = A_k B_k`` of shape ``(in, out)``. The server broadcasts one LoRA
initialisation (the same ``A_0`` for every client, as in common federated LoRA practice)
and ``B`` starts at zero, so what a client *learns* is mostly in ``B_k``: the output
directions its adapter writes. Benign clients all write the new tokens (copy them, or map
them with skills), so their output directions share a subspace, while a corrupted-target client
writes other outputs and a random update writes everywhere. We therefore hand CLAIR
``D_k = (A_k B_k)^T = B_k^T A_k^T`` of shape ``(out, in)`` (``side="out"``, the default):
the shared structure is the column space (output side, ``m = out``), the client detail
the coefficients on the input side. (``side="in"`` passes ``A_k B_k`` instead; with a
shared ``A_0`` its column space is ``~span(A_0)`` for *every* client, attackers
included, which is why it is not the default.)

Refinement (per module, core API :func:`clair_jax.refine_updates`): the kept
clients' oriented updates ``D_k (m, n)`` are pooled partially inside a shared subspace,
``Dtilde_k = U (C_bar + s (C_k - C_bar))`` with ``U (m, w)`` the shared subspace (its
``Refinement.rank`` columns used), ``C_k = U^T D_k`` and ``C_bar`` a robust centre of the
kept clients' coefficients; ``s = 1`` is the projection ``U U^T D_k``, ``s = 0`` one
pooled update (``Refinement.consensus``). Refined updates go back as LoRA adapters of rank
``w`` (:func:`refined_factors`): with ``side="out"``, ``Delta W~_k = Dtilde_k^T``, i.e.
``lora_a = right_k^T (in, w)`` per client and ``lora_b = U^T (w, out)`` shared by all
clients. Flagged clients get their refined adapter too (their updates never enter the
statistics; see ``experiment``).

Joint verdict (one per client, across ``J`` modules): the core's rule,
:func:`clair_jax._src.joint.joint_verdict` (geometric mean over modules of score /
threshold, then one robust cut capped at 1; its docstring says why), which
:func:`clair_jax.aggregate_adapters` uses on PEFT adapters too. Every module is then
refined with the jointly benign clients, so that all modules refine with the same set.
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
from clair_jax import refine_updates
from clair_jax import refined_factors
from clair_jax._src.joint import JointVerdict as Verdict
from clair_jax._src.joint import joint_verdict
from clair_jax._src.joint import robust_cut  # noqa: F401  (re-exported for the study's users)

Path = tuple


def get_path(tree: dict, path: Path) -> Any:
  """``tree[p0][p1]...`` for a pure-dict state."""
  for p in path:
    tree = tree[p]
  return tree


def module_updates(lora: dict, paths: tuple[Path, ...]) -> dict[Path, jax.Array]:
  """Per-module, per-client LoRA updates ``D_k = A_k B_k``.

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


def orient(delta_w: jax.Array, side: str) -> jax.Array:
  """``(K, in, out)`` weight deltas -> the matrices handed to CLAIR (and back: an involution).

  ``side="out"``: ``D_k = (A_k B_k)^T`` of shape ``(out, in)``, shared column space on the
  output side; ``side="in"``: ``D_k = A_k B_k`` of shape ``(in, out)``.
  """
  if side == "in":
    return delta_w
  if side == "out":
    return jnp.swapaxes(delta_w, -1, -2)
  raise ValueError(f"side must be 'out' or 'in', got {side!r}")


def to_lora_factors(left: jax.Array, right: jax.Array, side: str):
  """LoRA ``(lora_a (K, in, r), lora_b (K, r, out))`` of ``D_k = left_k right_k``.

  ``side="in"``: ``Delta W = D`` so ``A = left``, ``B = right``; ``side="out"``:
  ``Delta W = D^T = right^T left^T`` so ``A = right^T``, ``B = left^T``.
  """
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


class Aggregation(NamedTuple):
  """CLAIR's verdict and refinements, and every global rule's updates.

  Attributes:
    mats: ``{path: (K, m, n)}`` the oriented updates handed to CLAIR (``orient``).
    deltas: ``{method: {path: (K, in, out)}}`` dense per-client updates of ``base``,
      ``local`` and the global rules (``baseline_rules``).
    verdict: CLAIR's joint ``Verdict``.
    refinements: ``{"detected" | "true_benign": {path: Refinement}}``: per module, the
      server-only refinement (``strength="auto"``) of the clients CLAIR keeps, and of the
      true benign set (a reference).
    timing: seconds spent in CLAIR (detection + server-only refinement) and the baselines.
  """

  mats: dict
  deltas: dict
  verdict: Verdict
  refinements: dict
  timing: dict


def detect(mats: dict, rank: int, clair_options: dict | None = None) -> Verdict:
  """CLAIR on every module (one call per module) and the joint verdict across modules."""
  clair_options = dict(clair_options or {})
  results = {p: clair_jax.clair(u, rank, **clair_options)[:3] for p, u in mats.items()}
  scores = np.stack([np.asarray(results[p][1]) for p in mats])
  thresholds = np.array([float(results[p][2]) for p in mats])
  return joint_verdict(scores, thresholds)


def _refine_auto(updates, keep):
  return refine_updates(updates, keep, strength="auto")


def _refine_fixed(updates, keep, strength):
  return refine_updates(updates, keep, strength=strength)


def _refine_auto_noise(updates_and_noise, keep):
  updates, noise = updates_and_noise
  return refine_updates(updates, keep, strength="auto", subspace_noise=noise)


def refine(mats: dict, keep: np.ndarray, strength="auto", subspace_noise: dict | None = None,
           ) -> dict:
  """Per-module :func:`refine_updates` of the clients in ``keep`` (shared by all modules).

  Args:
    mats: ``{path: (K, m, n)}`` oriented updates.
    keep: ``(K,)`` bool, clients treated as benign.
    strength: ``"auto"`` (chosen per module) or one float for every module.
    subspace_noise: ``{path: (K,)}`` client-reported noise of the in-subspace coefficients
      (``"auto"`` only; see ``split_half_noise``).

  Returns:
    ``{path: Refinement}``.
  """
  keep = jnp.asarray(keep, bool)
  if isinstance(strength, str):
    if strength != "auto":
      raise ValueError(f"strength must be 'auto' or a number, got {strength!r}")
    if subspace_noise is not None:
      pairs = {p: (u, jnp.asarray(subspace_noise[p], u.dtype)) for p, u in mats.items()}
      return map_modules(_refine_auto_noise, pairs, keep)
    return map_modules(_refine_auto, mats, keep)
  return map_modules(_refine_fixed, mats, keep, jnp.asarray(strength, jnp.float32))


def with_strength(refinement, strength: float):
  """The refinement's LoRA factors at another fixed strength, without refitting.

  With a fixed strength, :func:`refine_updates` does not rotate the subspace, and the
  subspace, centre and coefficients do not depend on the strength; ``refined_factors``
  reads ``centre + strength * (coefficients - centre)``. So a refinement computed once (at
  any fixed strength) gives the factors at every candidate of the evaluation round. Only
  :func:`refined_factors` may be used on the result (its ``refined`` field is stale).
  """
  used = jnp.arange(refinement.strength.shape[-1]) < refinement.rank
  value = jnp.where(used, jnp.asarray(strength, refinement.strength.dtype), 0.0)
  return refinement._replace(strength=value)


def split_half_noise(refinements: dict, half_a: dict, half_b: dict) -> dict:
  """Per-client noise of the in-subspace coefficients from two half-data adapters.

  Client ``k`` trained two adapters on the two halves of its data; with ``U`` the shared
  subspace (its ``r`` used columns, sent by the server) and ``A_k``, ``B_k`` the oriented
  half-data updates, it reports

  .. math::
    \\hat\\sigma_k = \\|U^T (A_k - B_k)\\|_F / \\sqrt{4 r n},

  the per-entry noise std of a full-data coefficient ``C_k = U^T D_k`` if the update's
  noise variance scales as 1 / samples (``Var(A - B) = 2 * 2 Var(D)``). This is the
  ``subspace_noise`` input of :func:`refine_updates`.

  Args:
    refinements: ``{path: Refinement}`` (the subspace and rank of each module).
    half_a, half_b: ``{path: (K, m, n)}`` oriented updates trained on each half.

  Returns:
    ``{path: (K,)}`` reported noise levels.
  """
  out = {}
  for p, r in refinements.items():
    diff = jnp.einsum("mw,kmn->kwn", r.subspace, half_a[p] - half_b[p])
    n = diff.shape[-1]
    dof = 4.0 * jnp.maximum(r.rank, 1).astype(diff.dtype) * n
    out[p] = jnp.sqrt(jnp.sum(jnp.square(diff), axis=(1, 2)) / dof)
  return out


def refined_adapters(refinements: dict, side: str) -> dict:
  """LoRA factors ``{path: (lora_a (K, in, w), lora_b (K, w, out))}`` of refinements.

  The refined update of client ``k`` is ``left_k right_k`` (:func:`refined_factors`:
  ``left`` the shared ``(m, w)`` subspace, ``right`` the client's ``(w, n)``
  coefficients), so it is a LoRA adapter of rank ``w`` (``Refinement.rank`` of its
  columns are used); ``to_lora_factors`` puts the shared side on ``lora_b`` for
  ``side="out"``.
  """
  return {p: to_lora_factors(*refined_factors(r), side) for p, r in refinements.items()}


def consensus_deltas(refinements: dict, num_clients: int, side: str) -> dict:
  """``{path: (K, in, out)}``: the consensus update ``Refinement.consensus`` for everyone."""
  out = {}
  for p, r in refinements.items():
    c = orient(r.consensus, side)
    out[p] = jnp.broadcast_to(c, (num_clients,) + c.shape)
  return out


def aggregate(
    updates: dict[Path, jax.Array], *, rank: int, benign: np.ndarray, num_byzantine: int,
    side: str = "out", clair_options: dict | None = None, key: jax.Array | None = None,
) -> Aggregation:
  """Runs CLAIR per module (joint verdict, server-only refinement) and every global rule.

  Args:
    updates: ``{path: (K, in, out)}`` weight deltas ``A_k B_k`` from ``module_updates``.
    rank: CLAIR's detection rank ``r``.
    benign: ``(K,)`` ground truth (used by the ``true_benign`` reference only).
    num_byzantine: ``f``, the configured number of contaminated clients (multi-Krum,
      trimmed mean, NNM).
    side: orientation handed to CLAIR (``orient``).
    clair_options: extra keyword options for :func:`clair_jax.clair`.
    key: PRNG key of randomised rules (bucketing).

  Returns:
    ``Aggregation`` (deltas back in ``(K, in, out)``).
  """
  key = jax.random.key(0) if key is None else key
  paths = tuple(updates)
  mats = {p: orient(u, side) for p, u in updates.items()}
  num_clients = next(iter(mats.values())).shape[0]
  t0 = time.perf_counter()
  verdict = detect(mats, rank, clair_options)
  detected = refine(mats, ~verdict.contaminated, "auto")
  jax.block_until_ready(detected)
  t1 = time.perf_counter()
  true_benign = refine(mats, np.asarray(benign, bool), "auto")

  deltas = {"base": {p: jnp.zeros_like(u) for p, u in updates.items()}, "local": updates}
  for name, rule in baseline_rules(num_clients, num_byzantine, key=key).items():
    estimates = map_modules(rule, mats)
    deltas[name] = {p: orient(estimates[p], side) for p in paths}
  jax.block_until_ready(deltas)
  t2 = time.perf_counter()
  return Aggregation(
      mats, deltas, verdict, {"detected": detected, "true_benign": true_benign},
      {"clair_s": t1 - t0, "baselines_s": t2 - t1})
