"""Central pre-training and federated local LoRA training (all clients at once).

The hot loops are plain ``jax.jit`` functions over ``nnx.split`` state with ``nnx.merge``
inside. Local training stacks every client's adapter state (``nnx.LoRAParam`` leaves) and
optimizer state on a leading client axis and ``jax.vmap``s one step over it: one compiled
step trains all ``K`` clients, no Python loop over clients.
"""

from __future__ import annotations

import functools
from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from clair_jax.text_copy import model as model_lib


class PretrainConfig(NamedTuple):
  """Central pre-training on copies of base-token sequences.

  Attributes:
    steps: optimizer steps.
    batch_size: sequences per step (fresh random sequences every step).
    learning_rate: peak AdamW learning rate (cosine decay, short warm-up).
    chunk: steps per compiled ``lax.scan`` call (progress bar granularity).
  """

  steps: int = 1500
  batch_size: int = 64
  learning_rate: float = 3e-3
  chunk: int = 50


class LocalConfig(NamedTuple):
  """Local LoRA fine-tuning, full batch on each client's few examples.

  Attributes:
    steps: optimizer steps.
    learning_rate: Adam learning rate on the LoRA parameters only.
    batch_size: sequences per step, drawn with replacement from the client's own data
      (``None``: full batch).
    chunk: steps per compiled ``lax.scan`` call.
  """

  steps: int = 200
  learning_rate: float = 1e-2
  batch_size: int | None = None
  chunk: int = 25


def split_model(model: model_lib.Transformer):
  """``model -> (graphdef, lora, params)``: adapters (``nnx.LoRAParam``) and the rest."""
  return nnx.split(model, nnx.LoRAParam, ...)


def copy_logits_and_targets(graphdef, lora, params, seqs: jax.Array):
  """Runs the model on ``seqs[:, :-1]`` and returns the copy-part logits and targets.

  Args:
    graphdef: from ``split_model``.
    lora: adapter state.
    params: the rest of the state.
    seqs: ``(B, 2T+1)`` int sequences ``x SEP y``.

  Returns:
    ``(logits (B, T, V), targets (B, T))``: position ``T+i`` predicts ``y_{i+1}``.
  """
  model = nnx.merge(graphdef, lora, params)
  t = (seqs.shape[-1] - 1) // 2
  logits = model(seqs[:, :-1])
  return logits[:, t:], seqs[:, t + 1:]


def copy_loss(graphdef, lora, params, seqs: jax.Array) -> jax.Array:
  """Mean token cross-entropy on the copied half, ``-1/(B T) sum log p(y_i | x, y_<i)``."""
  logits, targets = copy_logits_and_targets(graphdef, lora, params, seqs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def copy_metrics(graphdef, lora, params, seqs: jax.Array) -> dict[str, jax.Array]:
  """Token accuracy, exact-sequence accuracy and loss on ``seqs`` (teacher forcing).

  A sequence is exact when every copied token is the argmax; then greedy decoding
  reproduces it, so teacher-forced exact accuracy equals greedy exact accuracy.

  Returns:
    dict of scalars ``token_acc``, ``seq_acc``, ``loss``.
  """
  logits, targets = copy_logits_and_targets(graphdef, lora, params, seqs)
  correct = jnp.argmax(logits, axis=-1) == targets
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return {"token_acc": correct.mean(), "seq_acc": correct.all(axis=-1).mean(), "loss": loss}


def _progress(total: int, desc: str, enabled: bool):
  return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def train_in_chunks(step, state, key: jax.Array, *, steps: int, chunk: int, desc: str,
                    progress: bool = True):
  """Runs ``state, loss = step(state, key)`` for ``steps`` steps, ``chunk`` per compiled call.

  One jitted ``lax.scan`` over ``chunk`` steps serves pre-training and local training (the
  progress bar advances per chunk; a shorter last chunk compiles once more). Each chunk
  splits a fresh key from ``key`` and one key per step from it.

  Returns:
    ``(state, losses)``: the final state and the stacked per-step losses (numpy,
    ``(steps, ...)``).
  """
  @functools.partial(jax.jit, static_argnums=2)
  def run_chunk(state, key, num):
    return jax.lax.scan(step, state, jax.random.split(key, num))

  losses = []
  with _progress(steps, desc, progress) as bar:
    done = 0
    while done < steps:
      num = min(chunk, steps - done)
      key, sub = jax.random.split(key)
      state, chunk_losses = run_chunk(state, sub, num)
      losses.append(np.asarray(chunk_losses))
      done += num
      bar.update(num)
      bar.set_postfix(loss=f"{float(np.nanmean(chunk_losses[-1])):.3f}")
  return state, np.concatenate(losses)


def pretrain(
    graphdef, lora, params, *, sample_batch: Callable[[jax.Array, int], jax.Array],
    config: PretrainConfig, key: jax.Array, progress: bool = True,
):
  """Trains the base parameters (not the adapters) on freshly sampled batches.

  Args:
    graphdef, lora, params: from ``split_model``; ``lora`` is held fixed (``B = 0``).
    sample_batch: ``(key, batch_size) -> (batch_size, 2T+1)`` jittable data sampler.
    config: ``PretrainConfig``.
    key: PRNG key.
    progress: show a tqdm bar.

  Returns:
    ``(params, losses)``: trained base state and the ``(steps,)`` loss curve (numpy).
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(100, config.steps // 10 + 1), config.steps)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(params)

  def step(carry, key):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(
        lambda p: copy_loss(graphdef, lora, p, sample_batch(key, config.batch_size)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = train_in_chunks(step, (params, opt_state), key, steps=config.steps,
                                        chunk=config.chunk, desc="pre-training",
                                        progress=progress)
  return params, losses


def init_client_adapters(config: model_lib.ModelConfig, key: jax.Array, num_clients: int):
  """Fresh adapters for ``num_clients`` clients, stacked on a leading axis.

  Each client gets its own random ``A`` (``lora_a``) and ``B = 0``, as if it had built the
  LoRA model locally from its own seed.

  Returns:
    adapter state with leaves ``(K, ...)``.
  """
  def one(k):
    return nnx.split(model_lib.Transformer(config, rngs=nnx.Rngs(k)), nnx.LoRAParam, ...)[1]
  return jax.vmap(one)(jax.random.split(key, num_clients))


def make_local_step(graphdef, tx: optax.GradientTransformation):
  """Builds the jitted, client-vmapped local step.

  ``step(lora (K,...), opt_state (K,...), params, seqs (K, N, 2T+1))`` takes one optimizer
  step of ``copy_loss`` on every client's own batch, training only its adapter; ``params``
  (the base model) is shared. Returns ``(lora, opt_state, losses (K,))``.
  """
  return jax.jit(vmapped_client_step(graphdef, tx))


def client_step(graphdef, tx: optax.GradientTransformation):
  """One optimizer step of one client: ``(lora, opt_state, params, seqs) -> (lora, opt_state, loss)``."""
  def step(lora, opt_state, params, seqs):
    loss, grads = jax.value_and_grad(copy_loss, argnums=1)(graphdef, lora, params, seqs)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
  return step


def vmapped_client_step(graphdef, tx: optax.GradientTransformation):
  """``client_step`` vmapped over a leading client axis of ``lora, opt_state, seqs``."""
  return jax.vmap(client_step(graphdef, tx), in_axes=(0, 0, None, 0))


def local_train(
    graphdef, params, lora, seqs: jax.Array, *, config: LocalConfig,
    key: jax.Array | None = None, progress: bool = True,
):
  """Full-batch local LoRA training of all clients at once.

  Args:
    graphdef, params: base model (shared, frozen).
    lora: stacked initial adapters ``(K, ...)`` from ``init_client_adapters``.
    seqs: ``(K, N, 2T+1)`` each client's training sequences.
    config: ``LocalConfig``.
    key: PRNG key for minibatch sampling (needed when ``config.batch_size`` is set).
    progress: show a tqdm bar.

  Returns:
    ``(lora, losses)``: trained stacked adapters and the ``(steps, K)`` loss curves.
  """
  tx = optax.adam(config.learning_rate)
  opt_state = jax.vmap(tx.init)(lora)
  step = vmapped_client_step(graphdef, tx)

  num_clients, num_seqs = seqs.shape[:2]
  if config.batch_size is not None and key is None:
    raise ValueError("local_train needs a key when config.batch_size is set")
  key = jax.random.key(0) if key is None else key

  def batch(key):
    if config.batch_size is None:
      return seqs
    idx = jax.random.randint(key, (num_clients, config.batch_size), 0, num_seqs)
    return jnp.take_along_axis(seqs, idx[:, :, None], axis=1)

  def body(carry, key):
    lora, opt_state = carry
    lora, opt_state, loss = step(lora, opt_state, params, batch(key))
    return (lora, opt_state), loss

  (lora, _), losses = train_in_chunks(body, (lora, opt_state), key, steps=config.steps,
                                      chunk=config.chunk, desc="local LoRA (all clients)",
                                      progress=progress)
  return lora, losses


def sample_base_batch(num_base: int, seq_len: int) -> Callable[[jax.Array, int], jax.Array]:
  """Jittable pre-training sampler: copies of uniform base-token sequences."""
  def sample(key, batch_size):
    tokens = jax.random.randint(key, (batch_size, seq_len), 1, 1 + num_base, dtype=jnp.int32)
    sep = jnp.zeros((batch_size, 1), jnp.int32)
    return jnp.concatenate([tokens, sep, tokens], axis=-1)
  return sample
