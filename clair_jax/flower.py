r"""CLAIR in a Flower federation: a Message-API strategy (``pip install clair_jax[flower]``).

:class:`ClairStrategy` is flwr's ``FedAvg`` (``flwr.serverapp.strategy``, flwr >= 1.21) with
CLAIR in place of the average. Nodes train a LoRA adapter and reply with its PEFT-keyed
tensors (``...lora_A.weight`` ``(r, in)``, ``...lora_B.weight`` ``(out, r)``) in an
``ArrayRecord``, as FlowerTune's clients do. One round:

1. ``configure_train`` sends every sampled node the adapter it should continue from: its own
   refined adapter once it has one, the global adapter (the ``arrays`` of the round)
   otherwise; one fresh ``RecordDict`` per node (flwr's strategies share one).
2. ``aggregate_train`` screens the replies (:func:`screen_reply`): an error reply, a node that
   was sent nothing, a second reply, a missing or inconsistent record, a weight that is not a
   positive number, keys, shapes or dtypes that are not those sent, undecodable raw bytes are
   dropped from the round with the reason logged, and the round goes on.
3. The update of node ``k`` is its reply minus what *it* was sent,
   ``Delta_jk = s_j (B'_jk A'_jk - B_jk A_jk)`` per module ``j`` (``s_j`` the PEFT scaling).
   Nodes continue from different adapters after the first round, so there is no common base
   adapter; the delta is handed to :func:`clair_jax.aggregate_adapters` exactly, in factored
   form ``[s B', -s B] [A'; A]`` (:func:`factored_delta`), rank ``2 r``, no dense matrix.
4. CLAIR flags nodes and returns every node's refined update ``Dtilde_k`` and the consensus
   update ``U C_bar``. The next adapter of node ``k`` is ``sent_k + Dtilde_k``; the new global
   adapter is ``global + U C_bar`` (what FedAvg on deltas with server step 1 does, the mean
   replaced by CLAIR's robust centre). ``strategy.last_report`` holds the verdicts and the
   round's ``MetricRecord`` has ``clair-num-flagged`` and ``clair-max-score`` beside the
   FedAvg-weighted metrics of the benign replies.

**Rank.** ``sent_k + Dtilde_k`` has rank up to ``r + w`` (``w`` the refine rank, chosen from
data by default), and it would grow every round. Every adapter the strategy sends is cut back
to the federation's layout, the shapes of the initial arrays (rank ``r`` per module, so a
client never sees a shape it did not configure), by the best rank-``r`` approximation of the
merged update (Eckart–Young, :func:`truncate_lora`: QR of both factors, SVD of the small
core). The clients' own adapters are rank ``r``, so this is the closest update a client can
hold; the relative energy cut off is reported as ``clair-truncation`` (it stays small when
the clients' updates share a low-rank subspace, CLAIR's premise; it is measured on the
global and the benign nodes' adapters). The factors are split as
``A`` = orthonormal rows (the top right singular vectors, completed by orthonormal
directions) and ``B = U S / s``: every row of ``A`` keeps unit norm like LoRA's own random
``A`` init, so a direction the adapter does not use yet still gets a gradient (a zero row of
``A`` together with a zero column of ``B`` would never move).

**Which nodes get what.** Every node whose reply entered CLAIR gets ``sent_k + Dtilde_k``,
flagged or not (as :func:`clair_jax.aggregate_adapters` refines every finite client with the
benign statistics: an attacker gets its own update projected and pulled to the centre, which
harms nobody, and a benign node flagged by mistake keeps its personalisation); a node with a
non-finite reply gets the consensus update. A node whose reply was dropped keeps what it had.
A node never seen gets the global adapter. With ``exclude_after=n`` a node flagged in ``n``
consecutive rounds in which it replied is no longer sampled (for training nor evaluation).

**Fallback.** With fewer than 3 usable replies (CLAIR needs a majority to exist), or if the
aggregation refuses the round, the round keeps the current arrays and every node's adapter,
logs a warning and reports ``clair-fallback = 1``.

Example::

  from clair_jax.flower import ClairStrategy

  strategy = ClairStrategy(rank=4, exclude_after=3, fraction_evaluate=0.5)
  result = strategy.start(grid=grid, initial_arrays=ArrayRecord(peft_state_dict),
                          num_rounds=10)
  strategy.last_report   # {node_id: {"contaminated": bool, "score": float}}

Logs go to the logger ``flwr.clair_jax`` (a child of Flower's, so they show in Flower's
output and propagate to the root logger).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterable
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np
from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import ConfigRecord
from flwr.app import Message
from flwr.app import MessageType
from flwr.app import MetricRecord
from flwr.app import RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from clair_jax._src import validate
from clair_jax._src.adapter_io import Adapter
from clair_jax._src.adapter_io import lora_modules
from clair_jax.adapters import AdapterAggregation
from clair_jax.adapters import aggregate_adapters

LOGGER = logging.getLogger("flwr.clair_jax")
# CLAIR needs a majority to exist: fewer usable replies keep the current arrays.
MIN_REPLIES = validate.MIN_CLIENTS
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64),
           np.dtype(ml_dtypes.bfloat16))
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class ModuleLayout(NamedTuple):
  """One adapted module of the federation's adapter.

  Attributes:
    name: module path (the key without ``base_model.model.`` and suffix).
    a_key, b_key: PEFT keys of ``A (r, in)`` and ``B (out, r)``.
    rank: the LoRA rank ``r`` every adapter sent keeps.
    scaling: PEFT scaling ``alpha / r`` (``alpha / sqrt(r)`` with rslora; 1 without config).
  """

  name: str
  a_key: str
  b_key: str
  rank: int
  scaling: float


class Layout(NamedTuple):
  """The federation's adapter, read once from the initial arrays.

  Attributes:
    shapes: ``{key: shape}`` every reply must match.
    dtypes: ``{key: dtype}`` of the arrays sent.
    modules: the :class:`ModuleLayout` of every module.
  """

  shapes: dict
  dtypes: dict
  modules: tuple


class Reply(NamedTuple):
  """A usable reply: the node, its decoded tensors (float NumPy) and its content."""

  node_id: int
  tensors: dict
  content: RecordDict


class Screened(NamedTuple):
  """The replies of a round after :func:`screen_replies`.

  Attributes:
    replies: usable :class:`Reply` s, in arrival order.
    dropped: ``{node_id: reason}`` (``node_id`` ``None`` when unknown).
  """

  replies: list
  dropped: dict


class TruncatedLora(NamedTuple):
  """Best rank-``r`` LoRA factors of a factored update (:func:`truncate_lora`).

  Attributes:
    lora_b: ``(out, r)``, ``scaling * lora_b @ lora_a`` is the approximation.
    lora_a: ``(r, in)`` with orthonormal rows.
    dropped: ``||update - approximation||_F / ||update||_F`` (0 for a zero update).
  """

  lora_b: np.ndarray
  lora_a: np.ndarray
  dropped: float


# --------------------------------------------------------------------------- arrays


def layout_of(tensors: Mapping, lora_config: Mapping | None = None) -> Layout:
  """The federation's layout from the initial adapter (PEFT-keyed tensors).

  Raises:
    ValueError: the tensors are not a plain LoRA adapter (:func:`lora_modules`'s errors), or
      the config's rank is not the tensors'.
  """
  adapter = Adapter({k: np.asarray(v) for k, v in tensors.items()},
                    None if lora_config is None else dict(lora_config))
  modules = tuple(
      ModuleLayout(m.name, m.a_key, m.b_key, m.rank, float(m.scaling))
      for m in lora_modules(adapter, client="initial arrays").values())
  return Layout(shapes={k: tuple(v.shape) for k, v in adapter.tensors.items()},
                dtypes={k: v.dtype for k, v in adapter.tensors.items()},
                modules=modules)


def decode_array(array: Array) -> np.ndarray:
  """An ``Array`` as a float NumPy array.

  A bfloat16 array serialised from NumPy (``ml_dtypes``) arrives as raw 2-byte records
  (``|V2``) because ``.npy`` has no bfloat16 type; when the sender declared
  ``dtype="bfloat16"`` the bytes are reinterpreted as bfloat16 (exact), any other raw-byte
  array is refused.

  Raises:
    ValueError: a serialisation other than NumPy's, undecodable bytes, raw bytes not
      declared bfloat16, or a non-float dtype.
  """
  try:
    value = array.numpy()
  except Exception as e:  # flwr raises TypeError, NumPy ValueError / EOFError
    raise ValueError(f"cannot decode the array ({type(e).__name__}: {e})") from e
  if value.dtype.kind == "V":
    if array.dtype == "bfloat16" and value.dtype.itemsize == 2:
      return value.view(_BFLOAT16)
    raise ValueError(f"raw bytes (dtype {value.dtype.str!r}, declared {array.dtype!r}); send "
                     f"float32, float16, or bfloat16 through ml_dtypes")
  if value.dtype not in _FLOATS:
    raise ValueError(f"dtype {value.dtype} is not a float type")
  return value


def to_array_record(tensors: Mapping, layout: Layout) -> ArrayRecord:
  """A fresh ``ArrayRecord`` of ``tensors`` in the layout's key order and dtypes."""
  return ArrayRecord({key: Array(np.ascontiguousarray(np.asarray(tensors[key])
                                                      .astype(layout.dtypes[key])))
                      for key in layout.shapes})


# --------------------------------------------------------------------------- screening


def _weight_problem(metrics: MetricRecord, key: str) -> str | None:
  if key not in metrics:
    return f"its MetricRecord has no {key!r}"
  value = metrics[key]
  if isinstance(value, list) or not math.isfinite(float(value)) or float(value) <= 0:
    return f"{key!r} is {value!r}, not a positive finite number"
  return None


def screen_reply(msg: Message, sent: Mapping, layout: Layout, weighted_by_key: str):
  """``(Reply, None)`` for a usable reply, ``(None, reason)`` otherwise.

  Usable: no error, exactly one ``ArrayRecord`` and one ``MetricRecord`` (what FedAvg
  requires), a positive finite weight ``weighted_by_key``, the keys and shapes of the arrays
  sent to that node, float arrays (:func:`decode_array`). Non-finite values are *not* a
  reason: CLAIR flags such a node (score ``+inf``) and it counts toward exclusion.

  Args:
    msg: the reply.
    sent: ``{node_id: tensors}`` sent this round.
    layout: the federation's layout.
    weighted_by_key: the metric FedAvg weights by.
  """
  if msg.has_error():
    return None, f"error reply (code {msg.error.code}): {msg.error.reason}"
  node = msg.metadata.src_node_id
  if node not in sent:
    return None, "no arrays were sent to this node in this round"
  content = msg.content
  if len(content.array_records) != 1:
    return None, f"expected one ArrayRecord, got {len(content.array_records)}"
  if len(content.metric_records) != 1:
    return None, f"expected one MetricRecord, got {len(content.metric_records)}"
  problem = _weight_problem(next(iter(content.metric_records.values())), weighted_by_key)
  if problem:
    return None, problem
  record = next(iter(content.array_records.values()))
  missing = sorted(set(layout.shapes) - set(record))
  unexpected = sorted(set(record) - set(layout.shapes))
  if missing or unexpected:
    return None, (f"inconsistent keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                  f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
  tensors = {}
  for key, shape in layout.shapes.items():
    try:
      value = decode_array(record[key])
    except ValueError as e:
      return None, f"key {key!r}: {e}"
    if tuple(value.shape) != shape:
      return None, f"key {key!r} has shape {tuple(value.shape)}, the node was sent {shape}"
    tensors[key] = value
  return Reply(node, tensors, content), None


def screen_replies(replies: Iterable[Message], sent: Mapping, layout: Layout,
                   weighted_by_key: str) -> Screened:
  """Every reply screened (:func:`screen_reply`), then two more rules across replies: one
  reply per node (the first counts), and the same metric keys as most usable replies (the
  weighted metric average needs one key set)."""
  usable, dropped = [], {}
  for msg in replies:
    node = msg.metadata.src_node_id
    reply, reason = screen_reply(msg, sent, layout, weighted_by_key)
    if reply is not None and any(r.node_id == node for r in usable):
      reply, reason = None, "a second reply from this node in this round"
    if reply is None:
      dropped.setdefault(node, reason)
    else:
      usable.append(reply)
  keys = [frozenset(next(iter(r.content.metric_records.values())).keys()) for r in usable]
  if keys:
    common = Counter(keys).most_common(1)[0][0]
    for reply, found in zip(list(usable), keys):
      if found != common:
        dropped[reply.node_id] = (f"metric keys {sorted(found)} differ from the other "
                                  f"replies' {sorted(common)}")
        usable.remove(reply)
  return Screened(usable, dropped)


# --------------------------------------------------------------------------- factors


def factored_delta(reply: Mapping, sent: Mapping, layout: Layout) -> dict:
  """The node's update ``s (B' A' - B A)`` as a PEFT-keyed adapter with scaling 1.

  Per module ``lora_B = [s B', -s B]`` ``(out, 2r)`` and ``lora_A = [A'; A]`` ``(2r, in)``
  (float32): exact, whatever the node was sent, and never dense.
  """
  out = {}
  for m in layout.modules:
    left = np.concatenate([m.scaling * np.asarray(reply[m.b_key], np.float32),
                           -m.scaling * np.asarray(sent[m.b_key], np.float32)], axis=1)
    right = np.concatenate([np.asarray(reply[m.a_key], np.float32),
                            np.asarray(sent[m.a_key], np.float32)], axis=0)
    out[m.b_key], out[m.a_key] = left, right
  return out


def _orthonormal_completion(rows: np.ndarray, rank: int) -> np.ndarray:
  """``rows`` ``(k, n)`` orthonormal, extended to ``min(rank, n)`` orthonormal rows (then
  zero rows up to ``rank``)."""
  k, n = rows.shape
  extra = min(rank, n) - k
  if extra > 0:
    basis, _ = np.linalg.qr(np.concatenate([rows.T, np.eye(n)], axis=1))
    rows = np.concatenate([rows, basis[:, k:k + extra].T], axis=0)
  if rows.shape[0] < rank:
    rows = np.concatenate([rows, np.zeros((rank - rows.shape[0], n))], axis=0)
  return rows


def truncate_lora(left, right, rank: int, scaling: float = 1.0) -> TruncatedLora:
  r"""Best rank-``rank`` approximation of ``left @ right`` as LoRA factors.

  With ``left = Q_l R_l`` and ``right^T = Q_r R_r`` (reduced QR) and the SVD
  ``R_l R_r^T = U S V^T`` of the small core, ``left right = (Q_l U) S (Q_r V)^T`` and the
  top-``rank`` part is the best approximation in Frobenius and spectral norm (Eckart–Young).
  Returned as ``lora_a = (Q_r V_r)^T`` (orthonormal rows, completed by orthonormal
  directions when the update has lower rank) and ``lora_b = Q_l U_r S_r / scaling``, so that
  ``scaling * lora_b @ lora_a`` is the approximation. Cost ``O((out + in) q^2)``.

  Args:
    left: ``(out, q)``.
    right: ``(q, in)``.
    rank: the LoRA rank to return.
    scaling: the PEFT scaling of the adapter the factors go to.

  Returns:
    :class:`TruncatedLora` (float64).
  """
  left = np.asarray(left, np.float64)
  right = np.asarray(right, np.float64)
  q_left, r_left = np.linalg.qr(left)
  q_right, r_right = np.linalg.qr(right.T)
  u, s, vt = np.linalg.svd(r_left @ r_right.T, full_matrices=False)
  keep = min(rank, s.size)
  lora_b = np.zeros((left.shape[0], rank))
  lora_b[:, :keep] = (q_left @ u[:, :keep]) * (s[:keep] / scaling)
  lora_a = _orthonormal_completion(vt[:keep] @ q_right.T, rank)
  total = float(np.sum(s ** 2))
  dropped = math.sqrt(float(np.sum(s[keep:] ** 2)) / total) if total > 0 else 0.0
  return TruncatedLora(lora_b, lora_a, dropped)


def add_update(tensors: Mapping, update: Mapping, layout: Layout) -> tuple[dict, float]:
  """``adapter + update`` cut back to the layout (:func:`truncate_lora` per module).

  Args:
    tensors: a PEFT-keyed adapter in the layout (scaling ``s_j`` per module).
    update: a PEFT-keyed update with scaling 1 (any rank), e.g. a refined adapter of
      :func:`clair_jax.aggregate_adapters`.
    layout: the federation's layout.

  Returns:
    ``(tensors, dropped)``: the new adapter in the layout's dtypes and the largest relative
    energy cut off over modules.
  """
  out, worst = {}, 0.0
  for m in layout.modules:
    left = np.concatenate([m.scaling * np.asarray(tensors[m.b_key], np.float64),
                           np.asarray(update[m.b_key], np.float64)], axis=1)
    right = np.concatenate([np.asarray(tensors[m.a_key], np.float64),
                            np.asarray(update[m.a_key], np.float64)], axis=0)
    cut = truncate_lora(left, right, m.rank, m.scaling)
    out[m.b_key] = cut.lora_b.astype(layout.dtypes[m.b_key])
    out[m.a_key] = cut.lora_a.astype(layout.dtypes[m.a_key])
    worst = max(worst, cut.dropped)
  return out, worst


# --------------------------------------------------------------------------- the strategy


class ClairStrategy(FedAvg):
  """flwr's ``FedAvg`` with CLAIR as the aggregation rule (see the module docstring).

  Args:
    rank: CLAIR's detection rank ``r`` (per module) of the shared subspace.
    exclude_after: if set, a node flagged in this many consecutive rounds (rounds in which
      its reply entered CLAIR) is no longer sampled; ``None`` never excludes.
    lora_config: the clients' ``adapter_config.json`` (``r``, ``lora_alpha``,
      ``use_rslora``, ``rank_pattern``, ``alpha_pattern``) for PEFT's scaling; ``None``: the
      tensors are the update as they are (scaling 1, as Flax's ``nnx.LoRA``).
    personalized_evaluate: ``configure_evaluate`` sends each node the adapter it would train
      from (its refined one, else the global); ``False``: every node the global one.
    aggregate_options: keyword arguments of :func:`clair_jax.aggregate_adapters`
      (``refine_strength``, ``refine="projection"``, ``threshold_ratio``, ...).
    **fedavg_kwargs: ``FedAvg``'s (``fraction_train``, ``min_train_nodes``,
      ``weighted_by_key``, ``train_metrics_aggr_fn``, ...).

  Attributes:
    last_report: ``{node_id: {"contaminated": bool, "score": float}}`` of the last round
      that ran CLAIR (``{}`` after a fallback).
    last_dropped: ``{node_id: reason}`` of the replies dropped in the last round.
    last_aggregation: the last :class:`clair_jax.adapters.AdapterAggregation` (node ids as
      names), or ``None``.
    excluded: node ids no longer sampled.
  """

  def __init__(self, rank: int, *, exclude_after: int | None = None,
               lora_config: Mapping | None = None, personalized_evaluate: bool = True,
               aggregate_options: Mapping | None = None, **fedavg_kwargs) -> None:
    super().__init__(**fedavg_kwargs)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
      raise ValueError(f"rank must be a positive int; got {rank!r}.")
    if exclude_after is not None and (isinstance(exclude_after, bool)
                                      or not isinstance(exclude_after, (int, np.integer))
                                      or exclude_after < 1):
      raise ValueError(f"exclude_after must be a positive int or None; got {exclude_after!r}.")
    self.rank = int(rank)
    self.exclude_after = exclude_after
    self.lora_config = None if lora_config is None else dict(lora_config)
    self.personalized_evaluate = personalized_evaluate
    self.aggregate_options = dict(aggregate_options or {})
    self.last_report: dict = {}
    self.last_dropped: dict = {}
    self.last_aggregation: AdapterAggregation | None = None
    self.excluded: set = set()
    self._layout: Layout | None = None
    self._global: dict | None = None      # the arrays of the current round
    self._personal: dict = {}             # node -> the adapter it continues from
    self._sent: dict = {}                 # node -> what it was sent this round
    self._streak: dict = {}               # node -> consecutive flagged rounds

  def summary(self) -> None:
    """Logs FedAvg's summary and CLAIR's settings."""
    super().summary()
    LOGGER.info("\t└──> CLAIR: rank %d | exclude after %s | personalized evaluate %s | %s",
                self.rank, self.exclude_after, self.personalized_evaluate,
                self.aggregate_options or "default options")

  def adapter_for(self, node_id: int) -> dict:
    """The tensors node ``node_id`` would be sent now (its own, else the global)."""
    if self._global is None:
      raise ValueError("no round configured yet.")
    return self._personal.get(node_id, self._global)

  # ------------------------------------------------------------------ configure

  def _set_global(self, arrays: ArrayRecord) -> None:
    tensors = {key: decode_array(array) for key, array in arrays.items()}
    if self._layout is None:
      self._layout = layout_of(tensors, self.lora_config)
    elif {k: tuple(v.shape) for k, v in tensors.items()} != self._layout.shapes:
      raise ValueError("the arrays of this round do not have the keys and shapes of the "
                       "initial arrays.")
    self._global = tensors

  def _sample(self, grid: Grid, fraction: float, minimum: int) -> list:
    """FedAvg's sampling among the connected nodes that are not excluded."""
    _, connected = sample_nodes(grid, self.min_available_nodes, 0)
    eligible = [node for node in connected if node not in self.excluded]
    size = min(len(eligible), max(int(len(eligible) * fraction), minimum))
    return random.sample(eligible, size)

  def _messages(self, adapters: Mapping, config: ConfigRecord, message_type: str) -> list:
    """One message per node of ``adapters`` (``{node: tensors}``), each with its own
    ``RecordDict``: flwr's strategies share one, which cannot carry per-node arrays."""
    messages = []
    for node, tensors in adapters.items():
      record = RecordDict({
          self.arrayrecord_key: to_array_record(tensors, self._layout),
          self.configrecord_key: ConfigRecord(dict(config)),
      })
      messages += self._construct_messages(record, [node], message_type)
    return messages

  def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                      grid: Grid) -> Iterable[Message]:
    """Sends each sampled node its own adapter (new nodes: ``arrays``)."""
    self._sent = {}
    if self.fraction_train == 0.0:
      return []
    self._set_global(arrays)
    nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
    LOGGER.info("configure_train: sampled %d nodes (%d excluded, %d with their own adapter)",
                len(nodes), len(self.excluded), sum(n in self._personal for n in nodes))
    self._sent = {node: self.adapter_for(node) for node in nodes}
    config["server-round"] = server_round
    return self._messages(self._sent, config, MessageType.TRAIN)

  def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                         grid: Grid) -> Iterable[Message]:
    """Sends each sampled node the adapter it would train from (``personalized_evaluate``)."""
    if self.fraction_evaluate == 0.0:
      return []
    self._set_global(arrays)
    nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
    config["server-round"] = server_round
    adapter = self.adapter_for if self.personalized_evaluate else lambda _: self._global
    return self._messages({node: adapter(node) for node in nodes}, config,
                          MessageType.EVALUATE)

  # ------------------------------------------------------------------ aggregate

  def aggregate_train(self, server_round: int,
                      replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                           MetricRecord | None]:
    """CLAIR on the usable replies' updates; new global arrays and the round's metrics."""
    if not self._sent:  # no training this round (fraction_train = 0), as FedAvg
      return None, None
    screened = screen_replies(list(replies), self._sent, self._layout, self.weighted_by_key)
    self.last_dropped = dict(screened.dropped)
    for node, reason in screened.dropped.items():
      LOGGER.warning("round %d: dropped the reply of node %s: %s", server_round, node, reason)
    if len(screened.replies) < MIN_REPLIES:
      return self._fallback(server_round, screened,
                            f"only {len(screened.replies)} usable replies (CLAIR needs "
                            f"{MIN_REPLIES})")
    deltas = {r.node_id: factored_delta(r.tensors, self._sent[r.node_id], self._layout)
              for r in screened.replies}
    try:
      result = aggregate_adapters(deltas, self.rank, **self.aggregate_options)
    except ValueError as e:
      return self._fallback(server_round, screened, f"aggregate_adapters refused: {e}")
    truncation = self._apply(result)
    self._record(server_round, result)
    return to_array_record(self._global, self._layout), self._metrics(
        screened, result, truncation)

  def _apply(self, result: AdapterAggregation) -> float:
    """New global and per-node adapters; returns the largest truncation of the global and
    the benign nodes' adapters (a flagged node's own update need not be low-rank)."""
    self._global, worst = add_update(self._global, result.consensus, self._layout)
    for node, flagged in zip(result.names, result.contaminated):
      self._personal[node], cut = add_update(self._sent[node], result.refined[node],
                                             self._layout)
      worst = worst if flagged else max(worst, cut)
    return worst

  def _record(self, server_round: int, result: AdapterAggregation) -> None:
    """``last_report``, streaks, exclusions, and one log line."""
    self.last_aggregation = result
    self.last_report = {
        node: {"contaminated": bool(flag), "score": float(score)}
        for node, flag, score in zip(result.names, result.contaminated, result.scores)}
    for node, verdict in self.last_report.items():
      self._streak[node] = self._streak.get(node, 0) + 1 if verdict["contaminated"] else 0
      if (self.exclude_after is not None and self._streak[node] >= self.exclude_after
          and node not in self.excluded):
        self.excluded.add(node)
        LOGGER.warning("round %d: node %s flagged in %d consecutive rounds; no longer "
                       "sampled", server_round, node, self._streak[node])
    flagged = [n for n, v in self.last_report.items() if v["contaminated"]]
    LOGGER.info("round %d: CLAIR on %d replies flagged %d: %s (max score %.3g, cut %.3g)",
                server_round, len(result.names), len(flagged), flagged,
                float(np.max(result.scores)), result.cut)

  def _metrics(self, screened: Screened, result: AdapterAggregation | None,
               truncation: float) -> MetricRecord:
    """FedAvg-weighted metrics of the benign replies plus CLAIR's."""
    flagged = set() if result is None else {
        n for n, c in zip(result.names, result.contaminated) if c}
    benign = [r.content for r in screened.replies if r.node_id not in flagged]
    metrics = MetricRecord()
    if benign:
      try:
        metrics = self.train_metrics_aggr_fn(benign, self.weighted_by_key)
      except Exception as e:  # pylint: disable=broad-exception-caught  # replies' values
        LOGGER.warning("could not average the replies' metrics (%s: %s); reporting CLAIR's "
                       "only", type(e).__name__, e)
    metrics["clair-num-flagged"] = len(flagged)
    metrics["clair-max-score"] = (math.nan if result is None
                                  else float(np.max(result.scores)))
    metrics["clair-num-dropped"] = len(screened.dropped)
    metrics["clair-truncation"] = float(truncation)
    metrics["clair-fallback"] = int(result is None)
    return metrics

  def _fallback(self, server_round: int, screened: Screened, reason: str):
    """Keeps the current arrays and every node's adapter; warns."""
    LOGGER.warning("round %d: %s; keeping the current arrays.", server_round, reason)
    self.last_report = {}
    self.last_aggregation = None
    return to_array_record(self._global, self._layout), self._metrics(screened, None, 0.0)


__all__ = (
    "ClairStrategy",
    "Layout",
    "ModuleLayout",
    "Reply",
    "Screened",
    "TruncatedLora",
    "add_update",
    "decode_array",
    "factored_delta",
    "layout_of",
    "screen_replies",
    "screen_reply",
    "to_array_record",
    "truncate_lora",
)
