"""One run of the text-copy study: pre-train, local LoRA, aggregate, evaluate, report.

``run_experiment(config, seed)`` is the whole pipeline for one seed; ``PRESETS`` holds the
``smoke`` / ``cpu`` / ``gpu`` sizes used by ``clair-jax text-copy``.

Why these settings. Each client has only 4 training sequences (noisy local estimates);
its new-token distribution is ``Dirichlet(0.5)`` over 8 new tokens (heterogeneous, but
all clients need the same skill: copying the new tokens, a low-rank change of the base
model); 30% are contaminated, a third of them with scaled random updates (``30x`` a
typical norm), which is what breaks FedAvg. CLAIR's refinement projects each benign
client's *own* update onto the shared subspace: it removes the off-subspace part of the
local noise but does not pool the clients' coefficients. On this task all benign clients
want nearly the same update, so robust *global* aggregates (median, trimmed mean,
geometric median) pool much more and score higher than CLAIR; CLAIR's gain over local
is small (see the README table). Fewer examples (3) or larger adapters (rank 8) made
CLAIR's gain over local smaller, not larger, in our runs.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clair_jax.text_copy import checkpoint as ckpt
from clair_jax.text_copy import data as data_lib
from clair_jax.text_copy import evaluate as eval_lib
from clair_jax.text_copy import federation as fed_lib
from clair_jax.text_copy import model as model_lib
from clair_jax.text_copy import trainer as trainer_lib


class ExperimentConfig(NamedTuple):
  """Everything one run needs.

  Attributes:
    task: vocabulary / sequence layout.
    federation: clients, data per client, heterogeneity, contamination.
    model: Transformer size (``vocab_size`` / ``max_len`` are filled from ``task``).
    pretrain: central pre-training schedule.
    local: local LoRA schedule.
    clair_rank: rank ``r`` passed to CLAIR and the oracle.
    shared_init: every client starts from the same server-broadcast adapter init.
    trim: trimmed-mean fraction per side.
    side: orientation handed to CLAIR (``federation.orient``): ``"out"`` shares the
      output side of each module's update.
  """

  task: data_lib.TaskConfig
  federation: data_lib.FederationConfig
  model: model_lib.ModelConfig
  pretrain: trainer_lib.PretrainConfig
  local: trainer_lib.LocalConfig
  clair_rank: int = 4
  shared_init: bool = True
  trim: float = 0.2
  side: str = "out"


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


def tiny_config() -> ExperimentConfig:
  """A seconds-long configuration for tests and the notebook's test mode."""
  return _make(
      data_lib.TaskConfig(num_base=8, num_new=4, seq_len=4),
      data_lib.FederationConfig(num_clients=8, num_train=4, num_test=8, contamination=0.25,
                                attacks=("permutation", "scaled_random")),
      model_lib.ModelConfig(num_layers=1, embed_dim=16, num_heads=2, hidden_dim=16,
                            lora_rank=2),
      trainer_lib.PretrainConfig(steps=20, batch_size=16, chunk=10),
      trainer_lib.LocalConfig(steps=40, chunk=20),
      clair_rank=2)


def run_experiment(
    config: ExperimentConfig, seed: int, *, out_dir: str | None = None, progress: bool = True,
) -> dict:
  """Runs the whole study for one seed.

  Steps: generate data (``data.make_federation``); pre-train the base model on base-token
  copies; train every client's LoRA adapter at once (vmapped); replace update attackers'
  adapters; per module, run CLAIR and the baselines on ``D_k = A_k B_k``; evaluate every
  method on each benign client's held-out data; detection metrics of CLAIR's joint verdict.

  Args:
    config: ``ExperimentConfig``.
    seed: integer seed (data, initialisation, attacks).
    out_dir: when given, the base model and the client adapters are saved there
      (``checkpoint.save_state``).
    progress: tqdm bars.

  Returns:
    a JSON-serialisable report dict (``methods``, ``detection``, ``per_client``,
    ``module_scores``, ``curves``, ``timing``).
  """
  timing = {}
  t_start = time.perf_counter()
  key = jax.random.key(seed)
  k_model, k_pre, k_lora, k_local, k_poison = jax.random.split(key, 5)
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
  lora = trainer_lib.init_client_adapters(config.model, k_lora, num_clients)
  if config.shared_init:
    lora = jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), lora)
  t0 = time.perf_counter()
  lora, local_losses = trainer_lib.local_train(
      graphdef, params, lora, jnp.asarray(fed.train), config=config.local, key=k_local,
      progress=progress)
  timing["local_train_s"] = time.perf_counter() - t0

  paths = model_lib.adapted_modules(config.model)
  lora_pure = fed_lib.poison_adapters(
      nnx.to_pure_dict(lora), paths, fed.kinds, scale=config.federation.poison_scale,
      key=k_poison)
  if out_dir is not None:
    meta = {"model": config.model._asdict(), "seed": seed, "kinds": list(fed.kinds)}
    ckpt.save_state(os.path.join(out_dir, "base_model.npz"), params, meta)
    ckpt.save_state(os.path.join(out_dir, "client_adapters.npz"), lora_pure, meta)

  updates = fed_lib.module_updates(lora_pure, paths)
  num_bad = int(np.sum(~fed.benign))
  agg = fed_lib.aggregate(updates, rank=config.clair_rank, benign=fed.benign,
                          num_byzantine=num_bad, trim=config.trim, side=config.side)
  timing.update(agg.timing)

  t0 = time.perf_counter()
  flagged = {"clair": agg.verdict.contaminated, "oracle": ~fed.benign}
  per_client = eval_lib.evaluate_methods(graphdef, lora0, params, agg, fed.test, flagged)
  timing["evaluate_s"] = time.perf_counter() - t0
  timing["total_s"] = time.perf_counter() - t_start

  benign = fed.benign
  methods = eval_lib.summarize(per_client, benign)
  detection = eval_lib.detection_metrics(agg.verdict.contaminated, benign)
  names = [model_lib.module_name(p) for p in paths]
  finite = lambda a: np.where(np.isfinite(a), a, None).tolist()  # inf -> null in JSON
  return {
      "seed": seed,
      "methods": methods,
      "detection": detection,
      "per_client": {
          "kinds": list(fed.kinds),
          "benign": benign.tolist(),
          "flagged": agg.verdict.contaminated.tolist(),
          "joint_score": finite(agg.verdict.joint_scores),
          "joint_cut": agg.verdict.cut,
          "token_acc": {m: v["token_acc"].tolist() for m, v in per_client.items()},
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
