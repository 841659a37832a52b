"""From trained client adapters to per-module updates, aggregation and refined adapters.

Orientation. ``nnx.LoRALinear`` computes ``y = x W + x A B`` with ``A = lora_a (in, r)``,
``B = lora_b (r, out)``, so a client's weight delta of one module is
``Delta W_k = A_k B_k`` of shape ``(in, out)``. The server broadcasts one LoRA
initialisation (the same ``A_0`` for every client, as in common federated LoRA practice)
and ``B`` starts at zero, so what a client *learns* is mostly in ``B_k``: the output
directions its adapter writes. Benign clients learn the same thing (copy the new
tokens), so their output directions share a subspace, while a corrupted-target client
writes other outputs and a random update writes everywhere. We therefore hand CLAIR
``D_k = (A_k B_k)^T = B_k^T A_k^T`` of shape ``(out, in)`` (``side="out"``, the default):
the shared structure is the column space (output side, ``m = out``), the client detail
the coefficients on the input side. (``side="in"`` passes ``A_k B_k`` instead; with a
shared ``A_0`` its column space is ``~span(A_0)`` for *every* client, attackers
included, which is why it is not the default.)

Refined updates go back as LoRA adapters of rank ``r`` (the CLAIR rank): with
``side="out"``, ``Dtilde_k = Uhat (Uhat^T D_k)`` means ``Delta W~_k = (D_k^T Uhat) Uhat^T``,
i.e. ``lora_a = D_k^T Uhat (in, r)`` per client and ``lora_b = Uhat^T (r, out)`` shared
by all clients. Flagged clients keep their own adapter.

Joint verdict (one per client, across ``J`` modules). Each module ``j`` gives CLAIR scores
``s_jk`` and a threshold ``t_j`` (``contaminated_jk = s_jk > t_j``). A data attacker's
update is only moderately off the benign subspace in each single module, but it is off in
*most* modules, so the evidence is pooled: the joint score is the geometric mean of the
normalised scores, ``z_k = exp(mean_j log(s_jk / t_j))`` (``+inf`` if any module is
non-finite). Averaging ``J`` noisy per-module statistics shrinks the benign spread, and the
cut is then set on ``z`` by the same robust logic CLAIR uses per module: client ``k`` is
contaminated iff ``z_k > 1`` (beyond a typical module threshold) or
``z_k > med + 3 * 1.4826 * MAD``, with ``med`` and ``MAD`` the median and median absolute
deviation of ``z`` over the clients not yet flagged, iterated from all clients until the
flagged set is stable (a concentration step; valid while fewer than half are
contaminated). Every module's subspace is then refitted on the jointly benign clients
(:func:`clair_jax.fit_subspace`) so that all modules refine with the same client set.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax
from clair_jax import baselines

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


class Verdict(NamedTuple):
  """Joint contamination verdict across modules.

  Attributes:
    contaminated: ``(K,)`` bool.
    joint_scores: ``(K,)`` geometric mean over modules of ``scores / threshold``.
    cut: the final cut on ``joint_scores`` (``contaminated == joint_scores > cut``).
    module_scores: ``(J, K)`` per-module CLAIR scores.
    module_thresholds: ``(J,)`` per-module thresholds.
    module_flags: ``(J, K)`` bool, per-module verdicts.
  """

  contaminated: np.ndarray
  joint_scores: np.ndarray
  cut: float
  module_scores: np.ndarray
  module_thresholds: np.ndarray
  module_flags: np.ndarray


def robust_cut(joint: np.ndarray, *, mad_multiplier: float = 3.0, max_iters: int = 20) -> float:
  """Iterated robust outlier cut ``min(1, med + c * 1.4826 * MAD)`` over unflagged clients.

  Args:
    joint: ``(K,)`` joint scores (``+inf`` allowed).
    mad_multiplier: ``c``.
    max_iters: cap on the concentration iterations.

  Returns:
    the cut (a float).
  """
  keep = np.isfinite(joint)
  cut = 1.0
  for _ in range(max_iters):
    values = joint[keep]
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    cut = min(1.0, med + mad_multiplier * mad)
    new_keep = np.isfinite(joint) & (joint <= cut)
    if new_keep.sum() < 2 or np.array_equal(new_keep, keep):
      break
    keep = new_keep
  return float(cut)


def joint_verdict(scores: np.ndarray, thresholds: np.ndarray) -> Verdict:
  """One verdict per client from per-module scores (rule in the module docstring).

  Args:
    scores: ``(J, K)`` per-module scores (``+inf`` / NaN allowed: treated as ``+inf``).
    thresholds: ``(J,)`` per-module thresholds (positive).

  Returns:
    ``Verdict``.
  """
  scores = np.asarray(scores, dtype=np.float64)
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if scores.ndim != 2 or thresholds.shape != scores.shape[:1]:
    raise ValueError(
        f"joint_verdict expects scores (J, K) and thresholds (J,), got {scores.shape} "
        f"and {thresholds.shape}")
  if np.any(thresholds <= 0):
    raise ValueError(f"thresholds must be positive, got {thresholds}")
  scores = np.where(np.isnan(scores), np.inf, scores)
  normalised = np.maximum(scores / thresholds[:, None], 1e-12)
  joint = np.exp(np.mean(np.log(normalised), axis=0))
  cut = robust_cut(joint)
  return Verdict(joint > cut, joint, cut, scores, thresholds, scores > thresholds[:, None])


class Aggregation(NamedTuple):
  """Every method's per-client updates, plus CLAIR's verdict and adapters.

  Attributes:
    deltas: ``{method: {path: (K, in, out)}}`` dense per-client updates.
    adapters: ``{method: {path: (lora_a (K, in, r), lora_b (K, r, out))}}`` low-rank
      refined adapters for ``clair`` and ``oracle``.
    verdict: CLAIR's joint ``Verdict``.
    timing: seconds spent in CLAIR and in the baselines.
  """

  deltas: dict
  adapters: dict
  verdict: Verdict
  timing: dict


def factor_refined(updates: jax.Array, mask: jax.Array, subspace: jax.Array):
  """Low-rank factors of the refined updates ``Uhat (Uhat^T D_k)`` of the clients in ``mask``.

  Args:
    updates: ``(K, m, n)`` (oriented, see ``orient``).
    mask: ``(K,)`` bool, refined clients (the others get zero factors; callers keep their
      dense update).
    subspace: ``(m, r)`` orthonormal ``Uhat``.

  Returns:
    ``(left (K, m, r), right (K, r, n))`` with ``left[k] = Uhat`` (shared) and
    ``right[k] = Uhat^T D_k``; ``to_lora_factors`` turns them into LoRA factors.
  """
  safe = jnp.where(mask[:, None, None], updates, 0.0)
  coeffs = jnp.einsum("mr,kmn->krn", subspace, safe)
  left = jnp.broadcast_to(subspace, (updates.shape[0],) + subspace.shape)
  return jnp.where(mask[:, None, None], left, 0.0), coeffs


def refine_to_adapters(updates: jax.Array, mask: jax.Array, rank: int):
  """Fits ``Uhat`` on the clients in ``mask`` and factors each client's refined update.

  .. math::
    \\hat U = \\operatorname{top}_r \\operatorname{left-sv}([D_k]_{k \\in mask}),\\quad
    \\tilde D_k = \\hat U (\\hat U^T D_k) \\ (k \\in mask),\\quad
    \\tilde D_k = D_k\\ (k \\notin mask)

  Args:
    updates: ``(K, m, n)`` (oriented, see ``orient``).
    mask: ``(K,)`` bool, clients treated as benign.
    rank: ``r``.

  Returns:
    ``((left (K, m, r), right (K, r, n)), dense (K, m, n))``: factors of the refined
    updates (zero for flagged clients) and the dense refined updates (flagged clients as
    sent).
  """
  safe = jnp.where(mask[:, None, None], updates, 0.0)
  subspace = clair_jax.fit_subspace(safe, mask, rank)
  left, right = factor_refined(updates, mask, subspace)
  dense = jnp.where(mask[:, None, None], jnp.einsum("kmr,krn->kmn", left, right), updates)
  return (left, right), dense


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
    groups.setdefault(tuple(u.shape), []).append(path)
  return groups


def _map_modules(fn, updates: dict) -> dict:
  """Applies ``fn`` (one module's ``(K, m, n)`` -> pytree) to every module, vmapped and
  jitted over the modules that share a shape; returns ``{path: fn(updates[path])}``."""
  out = {}
  batched = jax.jit(jax.vmap(fn))
  for paths in _group_by_shape(updates).values():
    result = batched(jnp.stack([updates[p] for p in paths]))
    for j, p in enumerate(paths):
      out[p] = jax.tree.map(lambda x, j=j: x[j], result)
  return out


def aggregate(
    updates: dict[Path, jax.Array], *, rank: int, benign: np.ndarray, num_byzantine: int,
    trim: float = 0.2, side: str = "out", clair_options: dict | None = None,
) -> Aggregation:
  """Runs CLAIR per module (joint verdict) and every baseline per module.

  CLAIR runs once per module; the baselines and the refits process all modules of one
  shape in a single jitted ``jax.vmap`` call.

  Args:
    updates: ``{path: (K, in, out)}`` weight deltas ``A_k B_k`` from ``module_updates``.
    rank: CLAIR / oracle subspace rank ``r``.
    benign: ``(K,)`` ground truth (used by ``oracle`` only).
    num_byzantine: ``f`` assumed by Krum.
    trim: trimmed-mean fraction per side.
    side: orientation handed to CLAIR (``orient``).
    clair_options: extra keyword options for :func:`clair_jax.clair`.

  Returns:
    ``Aggregation`` (deltas back in ``(K, in, out)``).
  """
  clair_options = dict(clair_options or {})
  paths = tuple(updates)
  mats = {p: orient(u, side) for p, u in updates.items()}
  t0 = time.perf_counter()
  # One call per module (clair is jitted inside; one compile per module shape).
  results = {p: clair_jax.clair(mats[p], rank, **clair_options)[:3] for p in paths}
  scores = np.stack([np.asarray(results[p][1]) for p in paths])
  thresholds = np.array([float(results[p][2]) for p in paths])
  verdict = joint_verdict(scores, thresholds)
  keep = jnp.asarray(~verdict.contaminated)
  refined = _map_modules(lambda u: refine_to_adapters(u, keep, rank), mats)
  clair_deltas = {p: orient(refined[p][1], side) for p in paths}
  clair_adapters = {p: to_lora_factors(*refined[p][0], side) for p in paths}
  jax.block_until_ready(clair_deltas)
  t1 = time.perf_counter()

  truth = jnp.asarray(benign)
  deltas = {"base": {p: jnp.zeros_like(u) for p, u in updates.items()}, "local": updates}
  rules = {
      "fedavg": lambda u: baselines.fedavg(u).estimates,
      "median": lambda u: baselines.coordinate_median(u).estimates,
      "trimmed_mean": lambda u: baselines.trimmed_mean(u, trim).estimates,
      "krum": lambda u: baselines.krum(u, num_byzantine).estimates,
      "geometric_median": lambda u: baselines.geometric_median(u).estimates,
  }
  for name, rule in rules.items():
    estimates = _map_modules(rule, mats)
    deltas[name] = {p: orient(estimates[p], side) for p in paths}
  deltas["clair"] = clair_deltas

  def oracle(u):
    result = baselines.oracle(u, truth, rank)
    return result.estimates, factor_refined(u, truth, result.subspace)

  oracle_out = _map_modules(oracle, mats)
  deltas["oracle"] = {p: orient(oracle_out[p][0], side) for p in paths}
  oracle_adapters = {p: to_lora_factors(*oracle_out[p][1], side) for p in paths}
  jax.block_until_ready(deltas)
  t2 = time.perf_counter()
  return Aggregation(
      deltas, {"clair": clair_adapters, "oracle": oracle_adapters}, verdict,
      {"clair_s": t1 - t0, "baselines_s": t2 - t1})
