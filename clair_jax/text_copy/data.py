"""Text-copy task: sequences, vocabulary layout, client distributions, contamination.

A sequence is ``x_1 .. x_T SEP x_1 .. x_T`` (length ``2T + 1``); the model reads it
left to right and is scored on the last ``T`` positions (the copy), predicted from the
prefix ending one position earlier.

Vocabulary layout (``vocab_size = 1 + num_base + num_new``)::

  0                          SEP
  1 .. num_base              base tokens: the only tokens seen in central pre-training
  num_base+1 .. vocab_size-1 new tokens: the shared new part the clients fine-tune on

How clients differ, and why (see ``make_federation``):

* Every benign client draws its tokens from its *own* distribution over the shared new
  part, ``p_k ~ Dirichlet(alpha)`` over the new tokens, mixed with a small fraction
  ``base_mix`` of base tokens. Shared structure: everybody has to learn to copy the new
  tokens, which the base model cannot (their embeddings were never trained on). Detail:
  which new tokens a client sees often differs, so clients' LoRA updates differ *inside*
  a shared subspace. Each client has only ``num_train`` training sequences, so its local
  LoRA estimate is noisy; held-out data come from the same client distribution.
* Contaminated clients (a fraction ``contamination``), kinds assigned round-robin:
  ``random_targets`` (the copy is replaced by uniform random tokens), ``permutation``
  (the copy is ``pi(x)`` for a fixed permutation ``pi`` of all non-SEP tokens, shared by
  every such client: a coordinated group), ``reversed`` (the copy is ``x_T .. x_1``),
  all three *poisoned data*; ``scaled_random`` (a *poisoned update*: the client sends
  random LoRA factors scaled to ``poison_scale`` times a typical update norm) and
  optionally ``nan`` (the client sends NaN factors).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SEP = 0

DATA_ATTACKS = ("random_targets", "permutation", "reversed")
UPDATE_ATTACKS = ("scaled_random", "nan")
ALL_ATTACKS = DATA_ATTACKS + UPDATE_ATTACKS


class TaskConfig(NamedTuple):
  """Vocabulary and sequence layout.

  Attributes:
    num_base: number of base tokens (pre-training vocabulary).
    num_new: number of new tokens (the shared new part clients fine-tune on).
    seq_len: copied length ``T``; full sequences have length ``2T + 1``.
  """

  num_base: int = 24
  num_new: int = 16
  seq_len: int = 8

  @property
  def vocab_size(self) -> int:
    return 1 + self.num_base + self.num_new

  @property
  def total_len(self) -> int:
    return 2 * self.seq_len + 1


class FederationConfig(NamedTuple):
  """How many clients, how much data each, how they differ, who is contaminated.

  Attributes:
    num_clients: ``K``.
    num_train: training sequences per client (few, so local estimates are noisy).
    num_test: held-out sequences per client.
    alpha: Dirichlet concentration of each client's distribution over the new tokens
      (small = more heterogeneous clients).
    base_mix: probability that a position holds a (uniform) base token instead.
    contamination: fraction of contaminated clients, ``round(contamination * K)``.
    attacks: contamination kinds, assigned round-robin to the contaminated clients.
    poison_scale: norm of a ``scaled_random`` update relative to a typical benign one.
  """

  num_clients: int = 20
  num_train: int = 8
  num_test: int = 64
  alpha: float = 0.5
  base_mix: float = 0.1
  contamination: float = 0.3
  attacks: tuple[str, ...] = ("scaled_random", "random_targets", "permutation", "reversed")
  poison_scale: float = 30.0


class Federation(NamedTuple):
  """Generated client data.

  Attributes:
    train: ``(K, num_train, 2T+1)`` int32 training sequences (contaminated targets
      already corrupted for data attacks).
    test: ``(K, num_test, 2T+1)`` int32 held-out sequences (clean copies).
    benign: ``(K,)`` bool, ground truth.
    kinds: length-``K`` tuple of ``"benign"`` or an attack name.
    token_probs: ``(K, num_new)`` each client's distribution over the new tokens.
  """

  train: np.ndarray
  test: np.ndarray
  benign: np.ndarray
  kinds: tuple[str, ...]
  token_probs: np.ndarray


def copy_sequences(tokens: np.ndarray) -> np.ndarray:
  """Builds ``x SEP x`` from tokens.

  Args:
    tokens: ``(..., T)`` int tokens.

  Returns:
    ``(..., 2T+1)`` int32 sequences.
  """
  sep = np.full(tokens.shape[:-1] + (1,), SEP, dtype=np.int32)
  tokens = tokens.astype(np.int32)
  return np.concatenate([tokens, sep, tokens], axis=-1)


def sample_base_sequences(rng: np.random.Generator, task: TaskConfig, num: int) -> np.ndarray:
  """Pre-training data: copies of uniform base-token sequences, ``(num, 2T+1)``."""
  tokens = rng.integers(1, 1 + task.num_base, size=(num, task.seq_len))
  return copy_sequences(tokens)


def sample_client_tokens(
    rng: np.random.Generator, task: TaskConfig, probs: np.ndarray, base_mix: float, num: int
) -> np.ndarray:
  """Draws ``(num, T)`` tokens: new tokens from ``probs``, base tokens w.p. ``base_mix``.

  Args:
    rng: numpy generator.
    task: vocabulary layout.
    probs: ``(num_new,)`` distribution over the new tokens.
    base_mix: probability of a uniform base token at each position.
    num: number of sequences.

  Returns:
    ``(num, T)`` int tokens.
  """
  new = 1 + task.num_base + rng.choice(task.num_new, size=(num, task.seq_len), p=probs)
  base = rng.integers(1, 1 + task.num_base, size=(num, task.seq_len))
  use_base = rng.random((num, task.seq_len)) < base_mix
  return np.where(use_base, base, new)


def corrupt_targets(
    rng: np.random.Generator, task: TaskConfig, seqs: np.ndarray, kind: str,
    permutation: np.ndarray,
) -> np.ndarray:
  """Replaces the copied half of ``seqs`` according to a data attack.

  Args:
    rng: numpy generator.
    task: vocabulary layout.
    seqs: ``(num, 2T+1)`` clean sequences.
    kind: one of ``DATA_ATTACKS``.
    permutation: ``(vocab_size,)`` fixed permutation of the tokens (``SEP`` fixed).

  Returns:
    ``(num, 2T+1)`` sequences with corrupted targets.
  """
  seqs = seqs.copy()
  t = task.seq_len
  source = seqs[:, :t]
  if kind == "random_targets":
    target = rng.integers(1, task.vocab_size, size=source.shape)
  elif kind == "permutation":
    target = permutation[source]
  elif kind == "reversed":
    target = source[:, ::-1]
  else:
    raise ValueError(f"unknown data attack {kind!r}; expected one of {DATA_ATTACKS}")
  seqs[:, t + 1:] = target
  return seqs


def client_kinds(config: FederationConfig) -> tuple[str, ...]:
  """Ground-truth kind per client: the last ``round(contamination*K)`` are attackers.

  Attack kinds are assigned round-robin from ``config.attacks``.
  """
  for kind in config.attacks:
    if kind not in ALL_ATTACKS:
      raise ValueError(f"unknown attack {kind!r}; expected a subset of {ALL_ATTACKS}")
  if not 0.0 <= config.contamination < 0.5:
    raise ValueError(f"contamination must be in [0, 0.5), got {config.contamination}")
  num_bad = int(round(config.contamination * config.num_clients))
  num_good = config.num_clients - num_bad
  if num_good < 2:
    raise ValueError(f"need >= 2 benign clients, got {num_good} of {config.num_clients}")
  bad = tuple(config.attacks[i % len(config.attacks)] for i in range(num_bad))
  return ("benign",) * num_good + bad


def make_federation(seed: int, task: TaskConfig, config: FederationConfig) -> Federation:
  """Generates every client's training and held-out data.

  Client ``k``'s distribution over the new tokens is ``p_k ~ Dirichlet(alpha 1)``; its
  sequences mix in uniform base tokens with probability ``base_mix``. Data attackers draw
  clean sequences the same way and then corrupt the copy (``corrupt_targets``); update
  attackers keep clean data (their update is replaced after training). Held-out data are
  clean copies from the client's own distribution.

  Args:
    seed: integer seed.
    task: vocabulary layout.
    config: federation layout.

  Returns:
    A ``Federation``.
  """
  rng = np.random.default_rng(seed)
  kinds = client_kinds(config)
  permutation = np.concatenate([[SEP], 1 + rng.permutation(task.vocab_size - 1)])
  probs = rng.dirichlet(np.full(task.num_new, config.alpha), size=config.num_clients)
  train, test = [], []
  for k, kind in enumerate(kinds):
    seqs = copy_sequences(
        sample_client_tokens(rng, task, probs[k], config.base_mix, config.num_train))
    if kind in DATA_ATTACKS:
      seqs = corrupt_targets(rng, task, seqs, kind, permutation)
    train.append(seqs)
    test.append(copy_sequences(
        sample_client_tokens(rng, task, probs[k], config.base_mix, config.num_test)))
  benign = np.array([kind == "benign" for kind in kinds])
  return Federation(np.stack(train), np.stack(test), benign, kinds, probs)
