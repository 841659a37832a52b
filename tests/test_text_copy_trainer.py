"""The vmapped all-clients trainer equals a per-client loop; data and pre-training sanity."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clair_jax.text_copy import data as data_lib
from clair_jax.text_copy import model as model_lib
from clair_jax.text_copy import trainer as trainer_lib

TASK = data_lib.TaskConfig(num_base=6, num_new=4, seq_len=4)
CONFIG = model_lib.ModelConfig(vocab_size=TASK.vocab_size, max_len=TASK.total_len,
                               num_layers=1, embed_dim=16, num_heads=2, hidden_dim=16,
                               lora_rank=2)


def _setup(num_clients=3):
  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0))
  graphdef, _, params = trainer_lib.split_model(model)
  # Non-zero B so that every adapter receives a gradient through both factors.
  lora = trainer_lib.init_client_adapters(CONFIG, jax.random.key(1), num_clients)
  lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
  fed = data_lib.make_federation(0, TASK, data_lib.FederationConfig(
      num_clients=num_clients, num_train=5, num_test=4, contamination=0.0))
  return graphdef, params, lora, jnp.asarray(fed.train)


@pytest.mark.slow   # per-client loop compiled beside the vmapped step
def test_vmapped_step_equals_per_client_loop():
  graphdef, params, lora, seqs = _setup()
  tx = optax.adam(1e-2)
  opt_state = jax.vmap(tx.init)(lora)
  new_lora, _, losses = trainer_lib.make_local_step(graphdef, tx)(lora, opt_state, params, seqs)

  single = jax.jit(trainer_lib.client_step(graphdef, tx))  # the plain one-client step
  for k in range(seqs.shape[0]):
    lora_k = jax.tree.map(lambda x, k=k: x[k], lora)
    ref_lora, _, ref_loss = single(lora_k, tx.init(lora_k), params, seqs[k])
    np.testing.assert_allclose(losses[k], ref_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x, k=k: x[k], new_lora)),
                         jax.tree.leaves(ref_lora)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The step moved the adapters, and clients moved differently (their data differ).
  moved = [float(jnp.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(new_lora), jax.tree.leaves(lora))]
  assert min(moved) > 0
  first = jax.tree.leaves(new_lora)[0] - jax.tree.leaves(lora)[0]
  assert float(jnp.abs(first[0] - first[1]).max()) > 0


def test_local_train_trains_only_adapters_and_lowers_loss():
  graphdef, params, lora, seqs = _setup()
  before = jax.vmap(lambda lora_k, s: trainer_lib.copy_loss(graphdef, lora_k, params, s))(lora, seqs)
  params_before = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  trained, losses = trainer_lib.local_train(
      graphdef, params, lora, seqs, config=trainer_lib.LocalConfig(steps=30, chunk=10),
      progress=False)
  assert losses.shape == (30, seqs.shape[0])
  after = jax.vmap(lambda lora_k, s: trainer_lib.copy_loss(graphdef, lora_k, params, s))(trained, seqs)
  assert np.all(np.asarray(after) < np.asarray(before))
  jax.tree.map(np.testing.assert_array_equal, params_before, nnx.to_pure_dict(params))


def test_federation_layout_and_attacks():
  fed_cfg = data_lib.FederationConfig(
      num_clients=10, num_train=3, num_test=2, contamination=0.4,
      attacks=("random_targets", "permutation", "reversed", "scaled_random"))
  fed = data_lib.make_federation(1, TASK, fed_cfg)
  assert fed.train.shape == (10, 3, TASK.total_len)
  assert fed.kinds[:6] == ("benign",) * 6 and set(fed.kinds[6:]) == set(fed_cfg.attacks)
  t = TASK.seq_len
  sep = fed.train[:, :, t]
  assert np.all(sep == data_lib.SEP)
  copies = np.all(fed.train[:, :, :t] == fed.train[:, :, t + 1:], axis=(1, 2))
  np.testing.assert_array_equal(copies, [k in ("benign", "scaled_random") for k in fed.kinds])
  rev = fed.kinds.index("reversed")
  np.testing.assert_array_equal(fed.train[rev, :, t + 1:], fed.train[rev, :, :t][:, ::-1])
  assert np.all(fed.test[:, :, :t] == fed.test[:, :, t + 1:])
  # Benign inputs come from the new part (plus a few base tokens), never SEP.
  assert np.all(fed.train[:6, :, :t] >= 1)


def test_pretraining_lowers_copy_loss():
  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0))
  graphdef, lora, params = trainer_lib.split_model(model)
  sample = trainer_lib.sample_base_batch(TASK.num_base, TASK.seq_len)
  _, losses = trainer_lib.pretrain(
      graphdef, lora, params, sample_batch=sample, key=jax.random.key(0), progress=False,
      config=trainer_lib.PretrainConfig(steps=60, batch_size=32, chunk=30))
  assert losses.shape == (60,)
  assert losses[-10:].mean() < 0.7 * losses[:5].mean()
