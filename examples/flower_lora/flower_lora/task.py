"""What the server and the clients share: configuration, base model, data, LoRA <-> arrays.

The model, data and trainer are ``clair_jax.text_copy``'s (the paper's text-copy study):
a small decoder-only Transformer pre-trained to copy sequences of base tokens; each client
LoRA-fine-tunes it on 4 sequences that use new tokens from its own distribution. The sizes
are the ``smoke`` preset's, so a round takes seconds on a CPU.

Every node builds the same base model: pre-trained from ``seed`` for ``pretrain-steps``
steps (a few seconds), cached in ``base-checkpoint`` (default: a file in the temporary
directory, keyed by the settings), so the simulation's workers and later runs reuse it. On
several machines, copy one checkpoint to every SuperNode and point ``base-checkpoint`` at it
(pre-training on different CPUs may differ in the last bits).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clair_jax.adapters import Adapter
from clair_jax.adapters import from_flax_lora_state
from clair_jax.adapters import to_flax_lora_state
from clair_jax.text_copy import checkpoint
from clair_jax.text_copy import data
from clair_jax.text_copy import experiment
from clair_jax.text_copy import model as model_lib
from clair_jax.text_copy import trainer

PRESET = "smoke"


class Setup(NamedTuple):
  """Everything a node needs.

  Attributes:
    config: the text-copy ``ExperimentConfig`` (model, task, federation, local training).
    federation: every partition's data (``train``, ``test``) and kind (benign / attack).
    graphdef: the Transformer's graph.
    params: the pre-trained base model (frozen).
    lora: a LoRA state of the right structure (values unused).
  """

  config: experiment.ExperimentConfig
  federation: data.Federation
  graphdef: object
  params: object
  lora: object


def experiment_config(run_config, num_partitions: int) -> experiment.ExperimentConfig:
  """The ``smoke`` preset with the run's federation: ``num_partitions`` clients, the last
  ``num-byzantine`` of them sending scaled random updates."""
  base = experiment.PRESETS[PRESET]
  num_byzantine = int(run_config["num-byzantine"])
  federation = base.federation._replace(
      num_clients=num_partitions, num_test=64,
      contamination=num_byzantine / num_partitions, attacks=("scaled_random",),
      poison_scale=float(run_config["poison-scale"]))
  local = base.local._replace(steps=int(run_config["local-steps"]),
                              learning_rate=float(run_config["learning-rate"]))
  pretrain = base.pretrain._replace(steps=int(run_config["pretrain-steps"]))
  return base._replace(federation=federation, local=local, pretrain=pretrain)


def initial_adapter(config: experiment.ExperimentConfig, seed: int) -> dict:
  """LoRA's init, shared by every node: random ``A``, zero ``B``; PEFT-keyed float32."""
  model = model_lib.Transformer(config.model, rngs=nnx.Rngs(seed + 1))
  adapter = from_flax_lora_state(nnx.state(model, nnx.LoRAParam))
  return {k: np.asarray(v, np.float32) for k, v in adapter.tensors.items()}


def _checkpoint_path(run_config, config) -> str:
  path = str(run_config["base-checkpoint"])
  if path:
    return path
  settings = json.dumps([config.model, config.task, config.pretrain,
                         int(run_config["seed"])], default=str)
  digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), f"clair-flower-lora-base-{digest}.npz")


def base_params(run_config, config, graphdef, lora, params):
  """The pre-trained base model: read from the checkpoint, or pre-trained and written."""
  path = _checkpoint_path(run_config, config)
  if os.path.exists(path):
    pure, _ = checkpoint.load_state(path)
    return checkpoint.restore_into(params, pure)
  key = jax.random.key(int(run_config["seed"]))
  params, _ = trainer.pretrain(
      graphdef, lora, params,
      sample_batch=trainer.sample_base_batch(config.task.num_base, config.task.seq_len),
      config=config.pretrain, key=key, progress=False)
  partial = f"{path}.{os.getpid()}.npz"  # written whole, then renamed: workers race here
  checkpoint.save_state(partial, params, {"seed": int(run_config["seed"])})
  os.replace(partial, path)
  return params


@functools.lru_cache(maxsize=2)
def _setup(frozen_config: tuple, num_partitions: int) -> Setup:
  run_config = dict(frozen_config)
  config = experiment_config(run_config, num_partitions)
  seed = int(run_config["seed"])
  federation = data.make_federation(seed, config.task, config.federation)
  model = model_lib.Transformer(config.model, rngs=nnx.Rngs(seed))
  graphdef, lora, params = trainer.split_model(model)
  params = base_params(run_config, config, graphdef, lora, params)
  return Setup(config, federation, graphdef, params, lora)


def setup(run_config, num_partitions: int) -> Setup:
  """The node's :class:`Setup`, built once per process."""
  return _setup(tuple(sorted(run_config.items())), num_partitions)


def load_adapter(node: Setup, tensors: dict):
  """A LoRA state holding the PEFT-keyed ``tensors`` (any float dtype)."""
  tree = to_flax_lora_state(Adapter({k: np.asarray(v, np.float32) for k, v in tensors.items()}))
  lora = jax.tree.map(lambda x: x, node.lora)
  nnx.replace_by_pure_dict(lora, jax.tree.map(jnp.asarray, tree))
  return lora


def adapter_tensors(lora) -> dict:
  """PEFT-keyed float32 tensors of a LoRA state."""
  return {k: np.asarray(v, np.float32) for k, v in from_flax_lora_state(lora).tensors.items()}


def local_train(node: Setup, lora, partition: int, seed: int):
  """``LocalConfig`` steps of full-batch Adam on the partition's training sequences.

  Returns:
    ``(lora, final loss)``.
  """
  stacked = jax.tree.map(lambda x: x[None], lora)
  seqs = jnp.asarray(node.federation.train[partition][None])
  trained, losses = trainer.local_train(node.graphdef, node.params, stacked, seqs,
                                        config=node.config.local,
                                        key=jax.random.key(seed), progress=False)
  return jax.tree.map(lambda x: x[0], trained), float(losses[-1, 0])


def scaled_random(sent: dict, honest: dict, scale: float, rng: np.random.Generator) -> dict:
  """A Byzantine reply: per module ``B = B_sent + c G`` (``G`` Gaussian, ``A`` as sent), ``c``
  such that the update is ``scale`` times as large as the node's honest one."""
  out = dict(sent)
  for key in sent:
    if not key.endswith("lora_B.weight"):
      continue
    a_key = key.replace("lora_B.weight", "lora_A.weight")
    honest_update = honest[key] @ honest[a_key] - sent[key] @ sent[a_key]
    gaussian = rng.normal(size=sent[key].shape)
    size = np.linalg.norm(gaussian @ sent[a_key])
    c = scale * np.linalg.norm(honest_update) / size if size > 0 else 0.0
    out[key] = (sent[key] + c * gaussian).astype(np.float32)
  return out


def copy_metrics(node: Setup, lora, partition: int) -> dict:
  """Token / exact-sequence accuracy and loss on the partition's held-out sequences."""
  found = trainer.copy_metrics(node.graphdef, lora, node.params,
                               jnp.asarray(node.federation.test[partition]))
  return {name: float(value) for name, value in found.items()}
