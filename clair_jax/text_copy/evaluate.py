"""Per-client evaluation of every method and detection metrics.

Dense methods (``base``, ``local``, ``fedavg``, ``median``, ...) are evaluated by merging
client ``k``'s update into the kernels, ``W + Delta_k``, with zero adapters. CLAIR and the
oracle are evaluated through their refined *LoRA adapters* (rank ``r``, ``lora_a`` shared,
``lora_b`` per client); a flagged client keeps its own dense update. Everything is vmapped
over the client axis inside one jit per method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clair_jax.text_copy import trainer as trainer_lib
from clair_jax.text_copy.federation import get_path

METHODS = ("base", "local", "fedavg", "median", "trimmed_mean", "krum", "geometric_median",
           "clair", "oracle")
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


def evaluate_methods(graphdef, lora_template, params, aggregation, test, flagged) -> dict:
  """Per-client metrics of every method in ``METHODS``.

  CLAIR / oracle clients in their benign set are evaluated through the refined low-rank
  adapters; clients they flag keep their dense local update.

  Args:
    graphdef, lora_template, params: model parts (``trainer.split_model``).
    aggregation: ``federation.Aggregation``.
    test: ``(K, N, 2T+1)`` held-out data of every client.
    flagged: ``{"clair": (K,) bool, "oracle": (K,) bool}`` clients not refined.

  Returns:
    ``{method: {metric: (K,) numpy}}``.
  """
  dense_fn, lowrank_fn = make_evaluators(graphdef)
  test = jnp.asarray(test)
  out = {}
  for method in METHODS:
    dense = dense_fn(lora_template, params, aggregation.deltas[method], test)
    dense = {k: np.asarray(v) for k, v in dense.items()}
    if method in aggregation.adapters:
      lowrank = lowrank_fn(lora_template, params, aggregation.adapters[method], test)
      keep = ~np.asarray(flagged[method])
      dense = {k: np.where(keep, np.asarray(lowrank[k]), dense[k]) for k in dense}
    out[method] = dense
  return out


def summarize(per_client: dict, benign: np.ndarray) -> dict:
  """Mean over benign clients: ``{method: {metric: float}}``."""
  benign = np.asarray(benign, bool)
  return {m: {k: float(np.mean(v[benign])) for k, v in d.items()} for m, d in per_client.items()}


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
