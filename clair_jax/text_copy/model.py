"""A small decoder-only Transformer in Flax NNX with LoRA adapters.

Follows the layout of flax's Gemma example (``Attention``, ``FeedForward``, ``Block``,
pre-RMSNorm residual blocks, gated-GELU MLP, tied embedding / unembedding), simplified
for a toy task: learned absolute positions instead of RoPE, ``nnx.LoRALinear`` instead
of ``Einsum`` so every projection carries a LoRA adapter.

Every projection ``q, k, v, o`` (attention) and ``gate, up, down`` (MLP) is an
``nnx.LoRALinear``: ``y = x W + x A B`` with kernel ``W (in, out)``, ``A = lora_a (in, r)``
(random init) and ``B = lora_b (r, out)`` (zero init) stored as ``nnx.LoRAParam``. With
``B = 0`` the model equals its base model exactly. Split the adapters off with
``nnx.split(model, nnx.LoRAParam, ...)`` (``LoRAParam`` first: it is a ``Param``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")


class ModelConfig(NamedTuple):
  """Transformer size.

  Attributes:
    vocab_size: number of tokens.
    max_len: longest sequence (learned positions).
    num_layers: number of ``Block``s.
    embed_dim: model width ``d``.
    num_heads: attention heads (``embed_dim`` must be divisible by it).
    hidden_dim: MLP width.
    lora_rank: LoRA rank ``r`` of every adapted projection.
  """

  vocab_size: int = 41
  max_len: int = 17
  num_layers: int = 2
  embed_dim: int = 64
  num_heads: int = 4
  hidden_dim: int = 128
  lora_rank: int = 4


def _lora_linear(in_features: int, out_features: int, rank: int, rngs: nnx.Rngs):
  return nnx.LoRALinear(in_features, out_features, lora_rank=rank, use_bias=False, rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head self-attention with LoRA on ``q, k, v, o``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if config.embed_dim % config.num_heads:
      raise ValueError(
          f"embed_dim={config.embed_dim} not divisible by num_heads={config.num_heads}")
    d, r = config.embed_dim, config.lora_rank
    self.num_heads = config.num_heads
    self.head_dim = d // config.num_heads
    self.q = _lora_linear(d, d, r, rngs)
    self.k = _lora_linear(d, d, r, rngs)
    self.v = _lora_linear(d, d, r, rngs)
    self.o = _lora_linear(d, d, r, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x (B, L, d) -> (B, L, d)``; position ``i`` attends to ``j <= i``."""
    b, length, _ = x.shape
    split = lambda t: t.reshape(b, length, self.num_heads, self.head_dim)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1)
    return self.o(out)


class FeedForward(nnx.Module):
  """Gated-GELU MLP ``down(gelu(gate(x)) * up(x))`` with LoRA on all three projections."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, h, r = config.embed_dim, config.hidden_dim, config.lora_rank
    self.gate = _lora_linear(d, h, r, rngs)
    self.up = _lora_linear(d, h, r, rngs)
    self.down = _lora_linear(h, d, r, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.pre_attention_norm = nnx.RMSNorm(config.embed_dim, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.pre_ffw_norm = nnx.RMSNorm(config.embed_dim, rngs=rngs)
    self.mlp = FeedForward(config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.pre_attention_norm(x))
    return x + self.mlp(self.pre_ffw_norm(x))


class Transformer(nnx.Module):
  """Decoder-only Transformer: tokens ``(B, L)`` int -> logits ``(B, L, vocab)``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = nnx.Embed(config.vocab_size, config.embed_dim, rngs=rngs)
    self.positions = nnx.Embed(config.max_len, config.embed_dim, rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = nnx.RMSNorm(config.embed_dim, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.config.max_len:
      raise ValueError(f"sequence length {length} > max_len {self.config.max_len}")
    x = self.embedder(tokens) + self.positions(jnp.arange(length))
    for layer in self.layers:
      x = layer(x)
    return self.embedder.attend(self.final_norm(x))


def adapted_modules(config: ModelConfig) -> tuple[tuple, ...]:
  """Paths (into ``nnx.to_pure_dict`` of the model state) of every LoRA-adapted projection.

  Returns:
    tuple of paths such as ``("layers", 0, "attn", "q")``, in a fixed order.
  """
  paths = []
  for i in range(config.num_layers):
    paths += [("layers", i, "attn", name) for name in ATTENTION_PROJECTIONS]
    paths += [("layers", i, "mlp", name) for name in MLP_PROJECTIONS]
  return tuple(paths)


def module_name(path: tuple) -> str:
  """``("layers", 0, "attn", "q") -> "layers.0.attn.q"``."""
  return ".".join(str(p) for p in path)
