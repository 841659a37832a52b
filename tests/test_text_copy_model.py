"""Text-copy Transformer: shapes, causality, LoRA at zero adapters equals the base model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clair_jax.text_copy import model as model_lib

CONFIG = model_lib.ModelConfig(vocab_size=13, max_len=9, num_layers=2, embed_dim=16,
                               num_heads=2, hidden_dim=24, lora_rank=3)


def _tokens(key, batch=3, length=9):
  return jax.random.randint(jax.random.key(key), (batch, length), 0, CONFIG.vocab_size)


def test_output_shape_and_adapter_shapes():
  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0))
  assert model(_tokens(0)).shape == (3, 9, CONFIG.vocab_size)
  _, lora, _ = nnx.split(model, nnx.LoRAParam, ...)
  pure = nnx.to_pure_dict(lora)
  paths = model_lib.adapted_modules(CONFIG)
  assert len(paths) == CONFIG.num_layers * 7
  assert len(jax.tree.leaves(pure)) == 2 * len(paths)
  node = pure["layers"][1]["mlp"]["down"]["lora"]
  assert node["lora_a"].shape == (CONFIG.hidden_dim, CONFIG.lora_rank)
  assert node["lora_b"].shape == (CONFIG.lora_rank, CONFIG.embed_dim)


def test_zero_adapters_equal_base_model():
  """B = 0 (the LoRA init): the LoRA model computes exactly ``x W``; B != 0 changes it."""
  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(1))
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  pure = nnx.to_pure_dict(lora)
  assert all(float(jnp.abs(b).max()) == 0.0
             for b in jax.tree.leaves(jax.tree.map(lambda x: x, pure))
             if b.shape[0] == CONFIG.lora_rank)
  tokens = _tokens(1)
  with_lora = nnx.merge(graphdef, lora, rest)(tokens)

  # The base model: same kernels, adapters removed (lora_a zeroed too, no LoRA path left).
  no_lora = jax.tree.map(jnp.zeros_like, lora)
  base = nnx.merge(graphdef, no_lora, rest)(tokens)
  np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(base))

  # A plain (non-LoRA) computation of the first projection agrees as well.
  q = model.layers[0].attn.q
  x = jax.random.normal(jax.random.key(2), (4, CONFIG.embed_dim))
  np.testing.assert_allclose(q(x), x @ q.kernel[...], rtol=1e-6, atol=1e-6)

  # Non-zero B must change the output (the test above could not pass vacuously).
  bumped = jax.tree.map(lambda x: x + 0.1, lora)
  changed = nnx.merge(graphdef, bumped, rest)(tokens)
  assert float(jnp.abs(changed - with_lora).max()) > 1e-3


def test_causal():
  """Changing a later token does not change earlier logits."""
  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(3))
  tokens = _tokens(3)
  other = tokens.at[:, 6].set((tokens[:, 6] + 1) % CONFIG.vocab_size)
  a, b = model(tokens), model(other)
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
  assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-4


def test_bad_sizes_raise():
  with pytest.raises(ValueError, match="divisible"):
    model_lib.Transformer(CONFIG._replace(num_heads=3), rngs=nnx.Rngs(0))
  model = model_lib.Transformer(CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_len"):
    model(jnp.zeros((1, CONFIG.max_len + 1), jnp.int32))
