"""One run of the text-copy study: pre-train, local LoRA, aggregate, evaluate, report.

``run_experiment(config, seed)`` is the whole pipeline for one seed; ``PRESETS`` holds the
``smoke`` / ``cpu`` / ``gpu`` sizes used by ``clair-jax text-copy`` and ``with_task``
switches a configuration between the ``copy`` and ``skills`` tasks (``data``).

Why these settings. Each client has only 4 training sequences (noisy local estimates);
its new-token distribution is ``Dirichlet(0.5)`` over 8 new tokens; 30% are
contaminated, a quarter of them with scaled random updates (``30x`` a typical norm),
which is what breaks FedAvg. On ``copy`` every benign client needs nearly the same
change, so robust *global* rules pool well; on ``skills`` clients need different maps
built from 3 shared skills, so no global rule can serve them.

CLAIR here is the core's whole-model pipeline on the factored LoRA updates
(``federation``: :mod:`clair_jax._src.joint`, as :func:`clair_jax.aggregate_adapters`):
detection per module with one joint verdict across modules, then per module the core
refinement with that benign set: partial pooling of the kept clients' in-subspace
coefficients toward a robust centre, ``U ((1 - s) C_bar + s C_k)``, as LoRA adapters.
Every client is served its refined adapter, flagged ones included: a flagged client's
update never enters the statistics (subspace, centre, strength), but a
benign client flagged by mistake then loses only its influence, not the federation's
pooling (an attacker gets its own update projected and pulled to the centre, which harms
nobody else). The strength ``s`` comes either from the server alone
(``strength="auto"``, row ``clair_server_only``) or from a *federated evaluation round*
(``strength_mode="evaluation_round"``): every client reports the token error (``1 -``
token accuracy; ``round_metric="loss"`` reports cross-entropy instead) of its refined
adapter on its own validation split at each candidate strength (one strength for the whole
model), contaminated clients lie (0 at ``s = 1``), the server aggregates the kept clients'
reports (``clair_jax.choose_strength``: median of the centred curves, ties to the smaller
strength, i.e. to more pooling). Why the token error: on ``copy`` the cross-entropy is
lowest at ``s ~ 0.1-0.2`` while the token accuracy is best at ``s = 0`` (partial pooling
calibrates the probabilities but flips a few argmaxes), so a loss-based round pools less
than the reported metric wants; on ``skills`` both pick ``s ~ 0.3-0.6``. Row ``clair`` is the configured default mode; the
references ``clair_projection`` (``s = 1``), ``clair_consensus`` (one broadcast update),
``clair_true_benign`` (the default pipeline given the true benign set),
``clair_client_noise`` (the server-side rule told the in-subspace noise by the clients,
measured from two half-data adapters each) and
``local_large_data`` (each benign client trained locally on ``large_data`` sequences of
its own task: an upper reference, not a method) sit beside it.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clair_jax import choose_strength
from clair_jax.text_copy import checkpoint as ckpt
from clair_jax.text_copy import data as data_lib
from clair_jax.text_copy import evaluate as eval_lib
from clair_jax.text_copy import federation as fed_lib
from clair_jax.text_copy import model as model_lib
from clair_jax.text_copy import trainer as trainer_lib


class ExperimentConfig(NamedTuple):
  """Everything one run needs.

  Attributes:
    task: vocabulary / sequence layout and task name (``copy`` / ``skills``).
    federation: clients, data per client, heterogeneity, contamination.
    model: Transformer size (``vocab_size`` / ``max_len`` are filled from ``task``).
    pretrain: central pre-training schedule.
    local: local LoRA schedule.
    clair_rank: CLAIR's detection rank ``r`` (the refinement picks its own width).
    shared_init: every client starts from the same server-broadcast adapter init.
    side: orientation handed to CLAIR (``federation.orient``): ``"out"`` shares the
      output side of each module's update.
    strength_mode: how row ``clair`` picks the refinement strength:
      ``"evaluation_round"`` (federated evaluation round) or ``"auto"`` (server only).
    strength_candidates: candidate strengths of the evaluation round.
    round_metric: what clients report in the evaluation round (``evaluate.ROUND_METRICS``):
      ``"token_error"`` (the 0-1 loss of the reported metric) or ``"loss"``
      (cross-entropy).
    large_data: training sequences per benign client of the ``local_large_data``
      reference (0 leaves it out).
    split_noise: also run row ``clair_client_noise``: the server-side ``"auto"`` strength
      with the in-subspace noise reported by the clients from two half-data adapters
      (``federation.split_half_noise``; contaminated clients report 0).
  """

  task: data_lib.TaskConfig
  federation: data_lib.FederationConfig
  model: model_lib.ModelConfig
  pretrain: trainer_lib.PretrainConfig
  local: trainer_lib.LocalConfig
  clair_rank: int = 4
  shared_init: bool = True
  side: str = "out"
  strength_mode: str = "evaluation_round"
  strength_candidates: tuple[float, ...] = tuple(i / 10 for i in range(11))
  round_metric: str = "token_error"
  large_data: int = 32
  split_noise: bool = True


STRENGTH_MODES = ("evaluation_round", "auto")


def _make(task, federation, model, pretrain, local, **kw) -> ExperimentConfig:
  model = model._replace(vocab_size=task.vocab_size, max_len=task.total_len)
  return ExperimentConfig(task, federation, model, pretrain, local, **kw)


PRESETS = {
    "smoke": _make(
        data_lib.TaskConfig(num_base=24, num_new=8, seq_len=8),
        data_lib.FederationConfig(num_clients=20, num_train=4, num_test=64, alpha=0.5,
                                  contamination=0.3),
        model_lib.ModelConfig(num_layers=2, embed_dim=64, num_heads=4, hidden_dim=64,
                              lora_rank=4),
        trainer_lib.PretrainConfig(steps=400, batch_size=64, learning_rate=3e-3),
        trainer_lib.LocalConfig(steps=200, learning_rate=1e-2),
        clair_rank=4),
    "cpu": _make(
        data_lib.TaskConfig(num_base=24, num_new=8, seq_len=8),
        data_lib.FederationConfig(num_clients=30, num_train=4, num_test=128, alpha=0.5,
                                  contamination=0.3),
        model_lib.ModelConfig(num_layers=2, embed_dim=64, num_heads=4, hidden_dim=64,
                              lora_rank=4),
        trainer_lib.PretrainConfig(steps=500, batch_size=64, learning_rate=3e-3),
        trainer_lib.LocalConfig(steps=200, learning_rate=1e-2),
        clair_rank=4),
    "gpu": _make(
        data_lib.TaskConfig(num_base=48, num_new=16, seq_len=12),
        data_lib.FederationConfig(num_clients=60, num_train=6, num_test=256, alpha=0.5,
                                  contamination=0.3),
        model_lib.ModelConfig(num_layers=4, embed_dim=128, num_heads=8, hidden_dim=512,
                              lora_rank=8),
        trainer_lib.PretrainConfig(steps=3000, batch_size=128, learning_rate=2e-3),
        trainer_lib.LocalConfig(steps=300, learning_rate=5e-3),
        clair_rank=8),
}


def with_task(config: ExperimentConfig, name: str) -> ExperimentConfig:
  """``config`` with the task switched to ``name`` (``"copy"`` or ``"skills"``)."""
  task = config.task._replace(name=name)
  data_lib.check_task(task)
  return config._replace(task=task)


def tiny_config(task: str = "copy") -> ExperimentConfig:
  """A seconds-long configuration for tests and the notebook's test mode."""
  config = _make(
      data_lib.TaskConfig(num_base=8, num_new=4, seq_len=4),
      data_lib.FederationConfig(num_clients=8, num_train=4, num_test=8, num_val=4,
                                contamination=0.25, attacks=("permutation", "scaled_random")),
      model_lib.ModelConfig(num_layers=1, embed_dim=16, num_heads=2, hidden_dim=16,
                            lora_rank=2),
      trainer_lib.PretrainConfig(steps=20, batch_size=16, chunk=10),
      trainer_lib.LocalConfig(steps=40, chunk=20),
      clair_rank=2, strength_candidates=(0.0, 0.5, 1.0), large_data=8)
  return with_task(config, task)


def _mean_strength(refinement) -> float:
  """Mean of a refinement's per-direction strengths over its used directions."""
  rank = int(refinement.rank)
  return float(np.mean(np.asarray(refinement.strength)[:rank])) if rank else 0.0


def train_large_data(config: ExperimentConfig, fed, graphdef, params, lora_init, seed: int,
                     *, key: jax.Array, progress: bool = True):
  """The ``local_large_data`` reference: benign clients trained on much more of their data.

  Each benign client trains its adapter from the shared initialisation with the local
  schedule on ``config.large_data`` fresh clean sequences of its own task
  (``data.client_sequences``, stream ``default_rng([seed, 3])``).

  Returns:
    ``(factors {path: (lora_a (B, in, r), lora_b (B, r, out))}, index (B,))``: the adapters
    of the ``B`` benign clients and their client indices.
  """
  index = np.flatnonzero(fed.benign)
  rng = np.random.default_rng([seed, 3])
  seqs = np.stack([
      data_lib.client_sequences(rng, config.task, fed, int(k), config.federation.base_mix,
                                config.large_data) for k in index])
  lora = jax.tree.map(lambda x: x[index], lora_init)
  lora, _ = trainer_lib.local_train(graphdef, params, lora, jnp.asarray(seqs),
                                    config=config.local, key=key, progress=progress)
  pure = nnx.to_pure_dict(lora)
  paths = model_lib.adapted_modules(config.model)
  factors = {}
  for path in paths:
    node = fed_lib.get_path(pure, path)["lora"]
    factors[path] = (node["lora_a"], node["lora_b"])
  return factors, index


def half_data_updates(config: ExperimentConfig, fed, graphdef, params, lora_init, *,
                      key: jax.Array, progress: bool = True):
  """Every client's two adapters trained on the two halves of its training data.

  Returns:
    ``(half_a, half_b)``: ``{path: (left, right)}`` oriented factored updates of each half
    (``federation.module_factors``).
  """
  half = fed.train.shape[1] // 2
  if half < 1:
    raise ValueError(f"split_noise needs >= 2 training sequences, got {fed.train.shape[1]}")
  paths = model_lib.adapted_modules(config.model)
  out = []
  for part, k in zip((fed.train[:, :half], fed.train[:, half:2 * half]),
                     jax.random.split(key)):
    lora, _ = trainer_lib.local_train(graphdef, params, lora_init, jnp.asarray(part),
                                      config=config.local, key=k, progress=progress)
    out.append(fed_lib.module_factors(nnx.to_pure_dict(lora), paths, config.side))
  return tuple(out)


def at_strength(refinements: dict, strength: float) -> dict:
  """``{path: ModuleRefinement}`` at another fixed strength (``federation.with_strength``)."""
  return {p: fed_lib.with_strength(r, strength) for p, r in refinements.items()}


def evaluation_round(config, fed, graphdef, lora_template, params, factors, fixed, keep):
  """The federated evaluation round of the refinement strength (see the module docstring).

  Args:
    config, fed: the run's configuration and data (``fed.val`` is each client's
      validation split; ``~fed.benign`` are the clients that lie).
    graphdef, lora_template, params: model parts.
    factors: ``{path: (left, right)}`` the factored updates handed to CLAIR.
    fixed: ``{path: ModuleRefinement}`` the refinement with the benign set ``keep`` at a
      fixed strength: every candidate is read from it (:func:`at_strength`).
    keep: ``(K,)`` bool, the clients the server keeps (refined, and whose reports count).

  Returns:
    ``(strength, reported (K, S))``.
  """
  candidates = np.asarray(config.strength_candidates, np.float32)
  adapters_at = lambda s: fed_lib.refined_adapters(at_strength(fixed, s), factors,
                                                   config.side)
  honest = eval_lib.strength_losses(graphdef, lora_template, params, fed.val, adapters_at,
                                    candidates, config.round_metric)
  reported = eval_lib.lie(honest, candidates, ~fed.benign)
  strength = choose_strength(jnp.asarray(reported), jnp.asarray(candidates),
                             jnp.asarray(keep))
  return float(strength), reported


def run_experiment(
    config: ExperimentConfig, seed: int, *, out_dir: str | None = None, progress: bool = True,
) -> dict:
  """Runs the whole study for one seed.

  Steps: generate data (``data.make_federation``); pre-train the base model on base-token
  copies; train every client's LoRA adapter at once (vmapped); replace update attackers'
  adapters; per module, run CLAIR's detection (factored, ``D_k = left_k right_k``) and the
  global rules (dense ``A_k B_k``); refine (server-only strength, then the evaluation round
  on the validation splits, then with the clients' split-half noise); train the
  ``local_large_data`` reference; evaluate every method on each client's held-out test
  split; detection metrics of CLAIR's joint verdict.

  Args:
    config: ``ExperimentConfig``.
    seed: integer seed (data, initialisation, attacks).
    out_dir: when given, the base model and the client adapters are saved there
      (``checkpoint.save_state``).
    progress: tqdm bars.

  Returns:
    a JSON-serialisable report dict (``methods``, ``detection``, ``per_client``,
    ``refine``, ``module_scores``, ``curves``, ``timing``).
  """
  if config.strength_mode not in STRENGTH_MODES:
    raise ValueError(f"strength_mode must be one of {STRENGTH_MODES}, got "
                     f"{config.strength_mode!r}")
  timing = {}
  t_start = time.perf_counter()
  key = jax.random.key(seed)
  k_model, k_pre, k_lora, k_local, k_poison = jax.random.split(key, 5)
  k_rules, k_large, k_half = jax.random.split(jax.random.fold_in(key, 1), 3)
  fed = data_lib.make_federation(seed, config.task, config.federation)
  model = model_lib.Transformer(config.model, rngs=nnx.Rngs(k_model))
  graphdef, lora0, params = trainer_lib.split_model(model)

  t0 = time.perf_counter()
  params, pre_losses = trainer_lib.pretrain(
      graphdef, lora0, params,
      sample_batch=trainer_lib.sample_base_batch(config.task.num_base, config.task.seq_len),
      config=config.pretrain, key=k_pre, progress=progress)
  timing["pretrain_s"] = time.perf_counter() - t0

  num_clients = config.federation.num_clients
  lora_init = trainer_lib.init_client_adapters(config.model, k_lora, num_clients)
  if config.shared_init:
    lora_init = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), lora_init)
  t0 = time.perf_counter()
  lora, local_losses = trainer_lib.local_train(
      graphdef, params, lora_init, jnp.asarray(fed.train), config=config.local, key=k_local,
      progress=progress)
  timing["local_train_s"] = time.perf_counter() - t0

  paths = model_lib.adapted_modules(config.model)
  lora_pure = fed_lib.poison_adapters(
      nnx.to_pure_dict(lora), paths, fed.kinds, scale=config.federation.poison_scale,
      key=k_poison)
  if out_dir is not None:
    meta = {"model": config.model._asdict(), "seed": seed, "kinds": list(fed.kinds),
            "task": config.task.name}
    ckpt.save_state(os.path.join(out_dir, "base_model.npz"), params, meta)
    ckpt.save_state(os.path.join(out_dir, "client_adapters.npz"), lora_pure, meta)

  num_bad = int(np.sum(~fed.benign))
  agg = fed_lib.aggregate(lora_pure, paths, rank=config.clair_rank, benign=fed.benign,
                          num_byzantine=num_bad, side=config.side, key=k_rules)
  timing.update(agg.timing)
  flagged = agg.verdict.contaminated
  factors, rank = agg.factors, config.clair_rank
  adapters = lambda refinements: fed_lib.refined_adapters(refinements, factors, config.side)

  # The federated evaluation round (for the detected set and for the true benign set): one
  # fixed-strength refinement each, every candidate strength read from it. s = 1 is also
  # the row clair_projection.
  t0 = time.perf_counter()
  projection = fed_lib.refine(factors, ~flagged, rank, 1.0)
  true_fixed = fed_lib.refine(factors, fed.benign, rank, 1.0)
  s_round, reported = evaluation_round(config, fed, graphdef, lora0, params, factors,
                                       projection, ~flagged)
  s_true, _ = evaluation_round(config, fed, graphdef, lora0, params, factors, true_fixed,
                               fed.benign)
  timing["evaluation_round_s"] = time.perf_counter() - t0
  detected, true_benign = agg.refinements["detected"], agg.refinements["true_benign"]
  if config.strength_mode == "evaluation_round":
    other_name = "clair_server_only"
    clair_ref = at_strength(projection, s_round)
    other_ref = detected
    true_ref = at_strength(true_fixed, s_true)
  else:
    other_name = "clair_evaluation_round"
    clair_ref = detected
    other_ref = at_strength(projection, s_round)
    true_ref = true_benign
  lowrank = {
      "clair_consensus": fed_lib.consensus_adapters(detected, num_clients, config.side),
      "clair": adapters(clair_ref),
      other_name: adapters(other_ref),
      "clair_projection": adapters(projection),
      "clair_true_benign": adapters(true_ref),
  }
  dense = dict(agg.deltas)

  if config.split_noise:
    t0 = time.perf_counter()
    half_a, half_b = half_data_updates(config, fed, graphdef, params, lora_init, key=k_half,
                                       progress=progress)
    noise = fed_lib.split_half_noise(detected, half_a, half_b)
    liars = jnp.asarray(~fed.benign)
    noise = {p: jnp.where(liars, 0.0, v) for p, v in noise.items()}
    client_noise_ref = fed_lib.refine(factors, ~flagged, rank, "auto", subspace_noise=noise)
    lowrank["clair_client_noise"] = adapters(client_noise_ref)
    timing["split_noise_s"] = time.perf_counter() - t0

  if config.large_data:
    t0 = time.perf_counter()
    large, index = train_large_data(config, fed, graphdef, params, lora_init, seed,
                                    key=k_large, progress=progress)
    timing["large_data_s"] = time.perf_counter() - t0

  # the consensus first: the report lists the dense rules, the consensus, then clair
  order = ("clair_consensus", "clair", other_name, "clair_client_noise", "clair_projection",
           "clair_true_benign")
  lowrank = {m: lowrank[m] for m in order if m in lowrank}
  t0 = time.perf_counter()
  per_client = eval_lib.evaluate_methods(graphdef, lora0, params, fed.test, dense=dense,
                                         lowrank=lowrank)
  if config.large_data:
    _, lowrank_fn = eval_lib.make_evaluators(graphdef)
    metrics = lowrank_fn(lora0, params, large, jnp.asarray(fed.test[index]))
    per_client["local_large_data"] = {}
    for name, values in metrics.items():
      full = np.full(num_clients, np.nan)
      full[index] = np.asarray(values)
      per_client["local_large_data"][name] = full
  timing["evaluate_s"] = time.perf_counter() - t0
  timing["total_s"] = time.perf_counter() - t_start

  benign = fed.benign
  methods = eval_lib.summarize(per_client, benign)
  detection = eval_lib.detection_metrics(flagged, benign)
  names = [model_lib.module_name(p) for p in paths]
  finite = lambda a: np.where(np.isfinite(a), a, None).tolist()  # inf/nan -> null in JSON
  keep = ~flagged
  return {
      "seed": seed,
      "task": config.task.name,
      "methods": methods,
      "detection": detection,
      "flag_rates": eval_lib.flag_rates(flagged, fed.kinds),
      "refine": {
          "strength_mode": config.strength_mode,
          "round_metric": config.round_metric,
          "strength_evaluation_round": s_round,
          "strength_true_benign": s_true,
          # server-only strength: the mean of the per-direction strengths over the used
          # directions of each module
          "strength_auto": {n: _mean_strength(detected[p]) for n, p in zip(names, paths)},
          "rank": {n: int(detected[p].rank) for n, p in zip(names, paths)},
          "width": {n: int(detected[p].shared.shape[-1]) for n, p in zip(names, paths)},
          "saturated": {n: bool(detected[p].saturated) for n, p in zip(names, paths)},
          "noise_level": {n: float(detected[p].noise_level) for n, p in zip(names, paths)},
          **({"strength_client_noise": {n: _mean_strength(client_noise_ref[p])
                                        for n, p in zip(names, paths)},
              "subspace_noise_benign_median": {
                  n: float(np.median(np.asarray(noise[p])[~flagged & fed.benign]))
                  for n, p in zip(names, paths)}}
             if config.split_noise else {}),
          "candidates": list(config.strength_candidates),
          "reported_loss_kept_mean": finite(reported[keep].mean(axis=0)),
      },
      "per_client": {
          "kinds": list(fed.kinds),
          "benign": benign.tolist(),
          "flagged": flagged.tolist(),
          "joint_score": finite(agg.verdict.joint_scores),
          "joint_cut": agg.verdict.cut,
          "token_acc": {m: finite(v["token_acc"]) for m, v in per_client.items()},
      },
      "module_scores": {
          "modules": names,
          "scores": [finite(s) for s in agg.verdict.module_scores],
          "thresholds": agg.verdict.module_thresholds.tolist(),
          "flags": agg.verdict.module_flags.tolist(),
      },
      "curves": {
          "pretrain_loss": pre_losses.tolist(),
          "local_loss_benign": np.nanmean(np.where(benign, local_losses, np.nan), 1).tolist(),
          "local_loss_contaminated": (
              np.nanmean(np.where(~benign, local_losses, np.nan), 1).tolist()
              if num_bad else []),
      },
      "timing": timing,
  }
