"""Text-copy tasks: sequences, vocabulary layout, client tasks, contamination.

A sequence is ``x_1 .. x_T SEP y_1 .. y_T`` (length ``2T + 1``); the model reads it
left to right and is scored on the last ``T`` positions (the target ``y``), predicted
from the prefix ending one position earlier. Pre-training teaches ``y = x`` on base tokens.

Vocabulary layout (``vocab_size = 1 + num_base + num_new``)::

  0                          SEP
  1 .. num_base              base tokens: the only tokens seen in central pre-training
  num_base+1 .. vocab_size-1 new tokens: the shared new part the clients fine-tune on

Every benign client draws its input tokens from its *own* distribution over the shared new
part, ``p_k ~ Dirichlet(alpha)`` over the new tokens, mixed with a small fraction
``base_mix`` of base tokens, and has only ``num_train`` training sequences, so its local
LoRA estimate is noisy. Validation and held-out (test) data come from the same client
distribution; the validation split (``num_val`` sequences) is what a client would keep
aside for a federated evaluation round, the test split is only used for the reported
tables. Two tasks (``TaskConfig.name``):

* ``copy`` (homogeneous): ``y = x``. Every benign client needs the *same* change (copy
  the new tokens, whose embeddings the base model never trained); only which new tokens
  it sees often differs. One global adapter serves everybody.
* ``skills`` (heterogeneous): ``y_i = f_k(x_i)`` with a client-specific map ``f_k`` of
  the new tokens built from ``num_skills`` shared *skills*. A skill ``sigma_j`` is a
  fixed random permutation of the new tokens (drawn once per seed, shared by all clients).
  Client ``k`` has a skill mixture ``pi_k ~ Dirichlet(skill_alpha)`` over the skills and,
  for each new token ``t``, applies skill ``z_k(t) ~ pi_k`` (drawn once per client and
  token, so the map is deterministic): ``f_k(t) = sigma_{z_k(t)}(t)``; base tokens are
  copied. Why this shape: (i) a single global adapter cannot serve everyone: on a token
  where clients use different skills, one map is wrong for all clients that use another
  one; (ii) local training on 4 sequences is noisy: a client sees each of its frequent
  tokens a few times and its rare ones not at all; (iii) pooling inside the shared
  structure helps: every client's change lives in the span of the ``num_new *
  num_skills`` token-to-skill-image maps, the clients' changes share their output side
  (the embeddings of the new tokens) and differ in their coefficients, and clients with
  similar mixtures agree on most tokens. The contaminated clients are built as in
  ``copy`` (below); note that a ``permutation`` attacker is, on the new tokens, just one
  more map and looks like one more heterogeneous client to any detector.

Contaminated clients (a fraction ``contamination``), kinds assigned round-robin:
``random_targets`` (the target is replaced by uniform random tokens), ``permutation``
(the target is ``pi(x)`` for a fixed permutation ``pi`` of all non-SEP tokens, shared by
every such client: a coordinated group), ``reversed`` (the target is ``x_T .. x_1``),
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
TASKS = ("copy", "skills")


class TaskConfig(NamedTuple):
  """Vocabulary and sequence layout.

  Attributes:
    num_base: number of base tokens (pre-training vocabulary).
    num_new: number of new tokens (the shared new part clients fine-tune on).
    seq_len: copied length ``T``; full sequences have length ``2T + 1``.
    name: ``"copy"`` (homogeneous) or ``"skills"`` (heterogeneous), see the module
      docstring.
    num_skills: number of shared skills (``skills`` only).
  """

  num_base: int = 24
  num_new: int = 16
  seq_len: int = 8
  name: str = "copy"
  num_skills: int = 3

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
    num_test: held-out sequences per client (the reported tables).
    num_val: validation sequences per client, generated like its training data (the
      federated evaluation round of CLAIR's refinement strength).
    alpha: Dirichlet concentration of each client's distribution over the new tokens
      (small = more heterogeneous clients).
    base_mix: probability that a position holds a (uniform) base token instead.
    contamination: fraction of contaminated clients, ``round(contamination * K)``.
    attacks: contamination kinds, assigned round-robin to the contaminated clients.
    poison_scale: norm of a ``scaled_random`` update relative to a typical benign one.
    skill_alpha: Dirichlet concentration of each client's skill mixture (``skills``
      task; small = each client mostly uses one skill).
  """

  num_clients: int = 20
  num_train: int = 8
  num_test: int = 64
  num_val: int = 8
  alpha: float = 0.5
  base_mix: float = 0.1
  contamination: float = 0.3
  attacks: tuple[str, ...] = ("scaled_random", "random_targets", "permutation", "reversed")
  poison_scale: float = 30.0
  skill_alpha: float = 0.5


class Federation(NamedTuple):
  """Generated client data.

  Attributes:
    train: ``(K, num_train, 2T+1)`` int32 training sequences (contaminated targets
      already corrupted for data attacks).
    test: ``(K, num_test, 2T+1)`` int32 held-out sequences (the client's clean task).
    val: ``(K, num_val, 2T+1)`` int32 validation sequences, generated like ``train``.
    benign: ``(K,)`` bool, ground truth.
    kinds: length-``K`` tuple of ``"benign"`` or an attack name.
    token_probs: ``(K, num_new)`` each client's distribution over the new tokens.
    token_maps: ``(K, vocab_size)`` int32, each client's clean target map ``y = f_k(x)``
      (identity for ``copy``).
    skill_mix: ``(K, num_skills)`` each client's skill mixture ``pi_k`` (uniform for
      ``copy``, where it is unused).
  """

  train: np.ndarray
  test: np.ndarray
  val: np.ndarray
  benign: np.ndarray
  kinds: tuple[str, ...]
  token_probs: np.ndarray
  token_maps: np.ndarray
  skill_mix: np.ndarray


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


def task_sequences(tokens: np.ndarray, token_map: np.ndarray) -> np.ndarray:
  """Builds ``x SEP f(x)`` from tokens and a target map.

  Args:
    tokens: ``(..., T)`` int tokens.
    token_map: ``(vocab_size,)`` int, ``f`` (``SEP`` and base tokens map to themselves).

  Returns:
    ``(..., 2T+1)`` int32 sequences.
  """
  sep = np.full(tokens.shape[:-1] + (1,), SEP, dtype=np.int32)
  tokens = tokens.astype(np.int32)
  return np.concatenate([tokens, sep, token_map[tokens].astype(np.int32)], axis=-1)


def make_skills(rng: np.random.Generator, task: TaskConfig) -> np.ndarray:
  """The shared skills: ``(num_skills, num_new)`` permutations of the new-token indices."""
  return np.stack([rng.permutation(task.num_new) for _ in range(task.num_skills)])


def skill_token_maps(
    rng: np.random.Generator, task: TaskConfig, skills: np.ndarray, mix: np.ndarray,
) -> np.ndarray:
  """Client maps ``f_k(t) = sigma_{z_k(t)}(t)`` with ``z_k(t) ~ mix_k`` per new token.

  Args:
    rng: numpy generator.
    task: vocabulary layout.
    skills: ``(S, num_new)`` permutations of the new-token indices (``make_skills``).
    mix: ``(K, S)`` skill mixtures.

  Returns:
    ``(K, vocab_size)`` int32 maps (identity on ``SEP`` and the base tokens).
  """
  num_clients = mix.shape[0]
  first = 1 + task.num_base
  maps = np.tile(np.arange(task.vocab_size, dtype=np.int32), (num_clients, 1))
  new = np.arange(task.num_new)
  for k in range(num_clients):
    choice = np.array([rng.choice(len(skills), p=mix[k]) for _ in new])
    maps[k, first:] = first + skills[choice, new]
  return maps


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


def check_task(task: TaskConfig) -> None:
  """Raises ``ValueError`` for an unknown task name or a skills task without skills."""
  if task.name not in TASKS:
    raise ValueError(f"unknown task {task.name!r}; expected one of {TASKS}")
  if task.name == "skills" and task.num_skills < 1:
    raise ValueError(f"the skills task needs num_skills >= 1, got {task.num_skills}")


def client_token_maps(
    seed: int, task: TaskConfig, config: FederationConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Every client's clean target map and skill mixture (own random stream of ``seed``).

  Returns:
    ``(token_maps (K, vocab_size), skill_mix (K, num_skills))``: identity maps and uniform
    mixtures for ``copy``; ``skill_token_maps`` of Dirichlet(``skill_alpha``) mixtures for
    ``skills``.
  """
  check_task(task)
  num_clients = config.num_clients
  identity = np.tile(np.arange(task.vocab_size, dtype=np.int32), (num_clients, 1))
  uniform = np.full((num_clients, max(task.num_skills, 1)), 1.0 / max(task.num_skills, 1))
  if task.name == "copy":
    return identity, uniform
  rng = np.random.default_rng([seed, 1])
  skills = make_skills(rng, task)
  mix = rng.dirichlet(np.full(task.num_skills, config.skill_alpha), size=num_clients)
  return skill_token_maps(rng, task, skills, mix), mix


def client_sequences(
    rng: np.random.Generator, task: TaskConfig, federation: Federation, k: int,
    base_mix: float, num: int,
) -> np.ndarray:
  """``num`` fresh clean sequences of client ``k``'s own task, ``(num, 2T+1)``.

  Used for the ``local_large_data`` reference (a client with much more data of its own).
  """
  tokens = sample_client_tokens(rng, task, federation.token_probs[k], base_mix, num)
  return task_sequences(tokens, federation.token_maps[k])


def make_federation(seed: int, task: TaskConfig, config: FederationConfig) -> Federation:
  """Generates every client's training, validation and held-out data.

  Client ``k``'s distribution over the new tokens is ``p_k ~ Dirichlet(alpha 1)``; its
  sequences mix in uniform base tokens with probability ``base_mix``; its targets are
  ``f_k(x)`` (``client_token_maps``: the copy for ``copy``). Data attackers draw clean
  sequences the same way and then corrupt the target (``corrupt_targets``) in their
  training and validation data; update attackers keep clean data (their update is
  replaced after training). Held-out data are the client's clean task.

  Random streams: the tokens, the attack permutation and the held-out data come from
  ``default_rng(seed)`` in the same order for both tasks (so ``copy`` and ``skills``
  share inputs); the skills from ``default_rng([seed, 1])``; the validation data from
  ``default_rng([seed, 2])``.

  Args:
    seed: integer seed.
    task: vocabulary layout and task name.
    config: federation layout.

  Returns:
    A ``Federation``.
  """
  check_task(task)
  rng = np.random.default_rng(seed)
  val_rng = np.random.default_rng([seed, 2])
  kinds = client_kinds(config)
  maps, mix = client_token_maps(seed, task, config)
  permutation = np.concatenate([[SEP], 1 + rng.permutation(task.vocab_size - 1)])
  probs = rng.dirichlet(np.full(task.num_new, config.alpha), size=config.num_clients)
  train, test, val = [], [], []
  for k, kind in enumerate(kinds):
    seqs = task_sequences(
        sample_client_tokens(rng, task, probs[k], config.base_mix, config.num_train), maps[k])
    held = task_sequences(
        sample_client_tokens(val_rng, task, probs[k], config.base_mix, config.num_val),
        maps[k])
    if kind in DATA_ATTACKS:
      seqs = corrupt_targets(rng, task, seqs, kind, permutation)
      held = corrupt_targets(val_rng, task, held, kind, permutation)
    train.append(seqs)
    val.append(held)
    test.append(task_sequences(
        sample_client_tokens(rng, task, probs[k], config.base_mix, config.num_test), maps[k]))
  benign = np.array([kind == "benign" for kind in kinds])
  return Federation(np.stack(train), np.stack(test), np.stack(val), benign, kinds, probs,
                    maps, mix)
