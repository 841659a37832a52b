"""Per-client evaluation of every method and detection metrics.

Dense methods (``base``, ``local``, the global rules) are evaluated by merging client
``k``'s update into the kernels, ``W + Delta_k``, with zero adapters. CLAIR's refinements
(``clair_consensus`` included) are evaluated through their refined *LoRA adapters* (shared
subspace on one side, per-client coefficients on the other), flagged clients included.
``local_large_data`` is evaluated through the adapters trained on the large data.
Everything is vmapped over the client axis inside one jit per structure.

The federated evaluation round of CLAIR's refinement strength: every client evaluates its
refined adapter at each candidate strength on its own *validation* split
(``strength_losses``) and reports the losses; contaminated clients lie (``lie``); the
server aggregates the reports of the clients it kept (``clair_jax.choose_strength``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clair_jax.text_copy import trainer as trainer_lib
from clair_jax.text_copy.federation import get_path

# Methods every report has (the peer defences are added when ``clair_jax.baselines`` has
# them; see ``federation.baseline_rules``).
METHODS = ("base", "local", "fedavg", "median", "trimmed_mean", "multi_krum",
           "geometric_median", "clair", "clair_server_only", "clair_projection",
           "clair_consensus", "clair_true_benign", "local_large_data")
# The Done-when comparison: CLAIR's default against each of these.
BASELINES = ("local", "fedavg", "median", "trimmed_mean", "multi_krum", "geometric_median")
METRICS = ("token_acc", "seq_acc", "loss")


def _copy_state(state):
  return jax.tree.map(lambda x: x, state)


def merged_params(params, deltas: dict):
  """Base state with ``kernel <- kernel + delta`` at every adapted path (one client).

  Args:
    params: base ``nnx.State`` (not modified).
    deltas: ``{path: (in, out)}``.

  Returns:
    a new ``nnx.State``.
  """
  pure = nnx.to_pure_dict(params)
  for path, delta in deltas.items():
    node = get_path(pure, path)
    node["kernel"] = node["kernel"] + delta.astype(node["kernel"].dtype)
  state = _copy_state(params)
  nnx.replace_by_pure_dict(state, pure)
  return state


def adapter_state(lora_template, factors: dict):
  """Adapter ``nnx.State`` from ``{path: (lora_a (in, r), lora_b (r, out))}`` (any rank ``r``)."""
  pure = nnx.to_pure_dict(lora_template)
  for path, (a, b) in factors.items():
    node = get_path(pure, path)["lora"]
    node["lora_a"], node["lora_b"] = a, b
  state = _copy_state(lora_template)
  nnx.replace_by_pure_dict(state, pure)
  return state


@functools.lru_cache(maxsize=8)
def make_evaluators(graphdef):
  """Builds the two jitted, client-vmapped evaluators for one model structure.

  Returns:
    ``(dense, lowrank)``:

    * ``dense(lora_template, params, deltas {path: (K, in, out)}, test (K, N, 2T+1))``:
      client ``k`` runs ``W + Delta_k`` with zero adapters;
    * ``lowrank(lora_template, params, factors {path: (a (K, in, r), b (K, r, out))}, test)``:
      client ``k`` runs ``W + a_k b_k`` through its LoRA adapters.

    Both return ``{metric: (K,)}`` (``trainer.copy_metrics`` on the client's own data).
  """
  @jax.jit
  def dense(lora_template, params, deltas, test):
    zero = jax.tree.map(jnp.zeros_like, lora_template)
    def one(d, s):
      return trainer_lib.copy_metrics(graphdef, zero, merged_params(params, d), s)
    return jax.vmap(one)(deltas, test)

  @jax.jit
  def lowrank(lora_template, params, factors, test):
    def one(f, s):
      return trainer_lib.copy_metrics(graphdef, adapter_state(lora_template, f), params, s)
    return jax.vmap(one)(factors, test)

  return dense, lowrank


def evaluate_methods(
    graphdef, lora_template, params, test, *, dense: dict, lowrank: dict | None = None,
) -> dict:
  """Per-client metrics of every method.

  Args:
    graphdef, lora_template, params: model parts (``trainer.split_model``).
    test: ``(K, N, 2T+1)`` held-out data of every client.
    dense: ``{method: {path: (K, in, out)}}`` methods evaluated as ``W + Delta_k``.
    lowrank: ``{method: {path: (lora_a (K, in, w), lora_b (K, w, out))}}`` methods
      evaluated through LoRA adapters.

  Returns:
    ``{method: {metric: (K,) numpy}}`` in the order of ``dense`` then ``lowrank``.
  """
  dense_fn, lowrank_fn = make_evaluators(graphdef)
  test = jnp.asarray(test)
  lowrank = lowrank or {}
  out = {}
  for method, deltas in dense.items():
    out[method] = {k: np.asarray(v)
                   for k, v in dense_fn(lora_template, params, deltas, test).items()}
  for method, factors in lowrank.items():
    out[method] = {k: np.asarray(v)
                   for k, v in lowrank_fn(lora_template, params, factors, test).items()}
  return out


LIE_LOSS = 10.0


def lie(losses: np.ndarray, candidates: np.ndarray, liars: np.ndarray) -> np.ndarray:
  """Contaminated clients' reports in the evaluation round: loss 0 at the largest
  candidate strength (their own update kept the most), ``LIE_LOSS`` at every other one.

  Args:
    losses: ``(K, S)`` honest held-out losses.
    candidates: ``(S,)`` candidate strengths.
    liars: ``(K,)`` bool, the contaminated clients (ground truth: every one lies).

  Returns:
    ``(K, S)`` reported losses.
  """
  candidates = np.asarray(candidates)
  fake = np.where(candidates == candidates.max(), 0.0, LIE_LOSS)
  return np.where(np.asarray(liars, bool)[:, None], fake[None, :], np.asarray(losses))


ROUND_METRICS = ("token_error", "loss")


def strength_losses(graphdef, lora_template, params, val, adapters_at, candidates,
                    metric: str = "token_error") -> np.ndarray:
  """Every client's honest validation loss of its refined adapter at each candidate strength.

  Args:
    graphdef, lora_template, params: model parts.
    val: ``(K, N, 2T+1)`` each client's validation split.
    adapters_at: ``strength -> {path: (lora_a (K, in, w), lora_b (K, w, out))}``.
    candidates: ``(S,)`` candidate strengths.
    metric: what a client reports: ``"token_error"`` (``1 -`` token accuracy, the 0-1
      loss of the reported metric) or ``"loss"`` (token cross-entropy).

  Returns:
    ``(K, S)`` numpy losses (a client with a non-finite adapter reports ``inf``).
  """
  if metric not in ROUND_METRICS:
    raise ValueError(f"metric must be one of {ROUND_METRICS}, got {metric!r}")
  _, lowrank_fn = make_evaluators(graphdef)
  val = jnp.asarray(val)
  columns = []
  for s in np.asarray(candidates, float):
    metrics = lowrank_fn(lora_template, params, adapters_at(float(s)), val)
    loss = np.asarray(metrics["loss"])
    value = 1.0 - np.asarray(metrics["token_acc"]) if metric == "token_error" else loss
    columns.append(np.where(np.isfinite(loss), value, np.inf))
  return np.stack(columns, axis=1)


def summarize(per_client: dict, benign: np.ndarray) -> dict:
  """Mean over benign clients: ``{method: {metric: float}}``."""
  benign = np.asarray(benign, bool)
  return {m: {k: float(np.mean(v[benign])) for k, v in d.items()} for m, d in per_client.items()}


def flag_rates(flagged: np.ndarray, kinds) -> dict:
  """``{kind: [flagged, total]}`` per client kind (``"benign"`` and each attack)."""
  flagged = np.asarray(flagged, bool)
  kinds = np.asarray(kinds)
  return {str(k): [int(np.sum(flagged[kinds == k])), int(np.sum(kinds == k))]
          for k in dict.fromkeys(kinds.tolist())}


def detection_metrics(flagged: np.ndarray, benign: np.ndarray) -> dict:
  """Precision, recall and F1 of ``flagged`` against the contaminated set ``~benign``.

  Conventions: precision is 1 when nothing is flagged, recall is 1 when nobody is
  contaminated; F1 is 0 when precision + recall is 0.
  """
  flagged = np.asarray(flagged, bool)
  bad = ~np.asarray(benign, bool)
  tp = int(np.sum(flagged & bad))
  precision = tp / flagged.sum() if flagged.sum() else 1.0
  recall = tp / bad.sum() if bad.sum() else 1.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  exact = bool(np.array_equal(flagged, bad))
  return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
          "exact": exact, "tp": tp, "fp": int(np.sum(flagged & ~bad)),
          "fn": int(np.sum(~flagged & bad))}
