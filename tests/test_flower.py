"""``clair_jax.flower.ClairStrategy``: CLAIR as a Flower (Message API) strategy.

Fast tests drive the strategy by hand: ``configure_train`` against a fake grid, replies built
with ``Message(content, reply_to=sent)`` (no Ray). The slow test runs a real
``flwr.simulation.run_simulation`` (needs ``flwr[simulation]``, i.e. Ray).

Every adapter here has two modules ``(out, in) = (16, 12)`` of LoRA rank 2, and most rounds
have 8 replies, so CLAIR compiles for few shapes.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

import logging
import random
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import ConfigRecord
from flwr.app import Error
from flwr.app import Message
from flwr.app import Metadata
from flwr.app import MetricRecord
from flwr.app import RecordDict

from clair_jax import flower
from clair_jax.adapters import aggregate_adapters

OUT, IN, R = 16, 12, 2
MODULES = ("layers.0.attn.q", "layers.0.mlp.up")
NODES = tuple(range(101, 109))
BYZANTINE = frozenset({107, 108})
# Each module's shared subspace (benign updates live in it) and each node's coefficients.
_SHARED = np.random.default_rng(7)
SUBSPACE = {m: np.linalg.qr(_SHARED.normal(size=(OUT, R)))[0] for m in MODULES}


def key(module: str, side: str) -> str:
  return f"base_model.model.{module}.lora_{side}.weight"


def initial_adapter() -> dict:
  """LoRA's init: random ``A``, zero ``B``."""
  rng = np.random.default_rng(0)
  tensors = {}
  for m in MODULES:
    tensors[key(m, "A")] = (rng.normal(size=(R, IN)) / np.sqrt(IN)).astype(np.float32)
    tensors[key(m, "B")] = np.zeros((OUT, R), np.float32)
  return tensors


def record(tensors: dict) -> ArrayRecord:
  return ArrayRecord({k: Array(np.asarray(v)) for k, v in tensors.items()})


def tensors_of(msg: Message) -> dict:
  return {k: a.numpy() for k, a in msg.content["arrays"].items()}


def trained(sent: dict, node: int, server_round: int, *, byzantine: bool) -> dict:
  """A node's reply: benign ``B += U C_k + noise`` (``C_k`` its own coefficients), ``A`` barely
  moves; Byzantine: scaled random factors."""
  rng = np.random.default_rng([node, server_round])
  own = np.random.default_rng(node)
  out = {}
  for m in MODULES:
    a, b = sent[key(m, "A")], sent[key(m, "B")]
    if byzantine:
      out[key(m, "B")] = b + 3.0 * rng.normal(size=b.shape)
      out[key(m, "A")] = a + rng.normal(size=a.shape)
    else:
      coefficients = 0.5 * np.eye(R) + 0.2 * own.normal(size=(R, R)) + 0.05 * rng.normal(
          size=(R, R))
      out[key(m, "B")] = b + SUBSPACE[m] @ coefficients + 0.01 * rng.normal(size=b.shape)
      out[key(m, "A")] = a + 0.01 * rng.normal(size=a.shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def reply(msg: Message, tensors: dict | None = None, metrics: dict | None = None,
          arrays: ArrayRecord | None = None) -> Message:
  content = RecordDict({"arrays": arrays if arrays is not None else record(tensors)})
  if metrics is not False:
    content["metrics"] = MetricRecord(metrics or {"num-examples": 10, "train-loss": 1.0})
  return Message(content, reply_to=msg)


def honest_replies(messages, server_round: int) -> list:
  return [reply(m, trained(tensors_of(m), m.metadata.dst_node_id, server_round,
                           byzantine=m.metadata.dst_node_id in BYZANTINE))
          for m in messages]


class FakeGrid:
  """What the strategy's sampling reads of a ``Grid``."""

  def __init__(self, node_ids):
    self.node_ids = list(node_ids)

  def get_node_ids(self):
    return list(self.node_ids)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
  """A ``Message`` built on the server reads the task's identity, set by a ServerApp run."""
  from flwr.supercore.task_identity import TaskIdentity

  monkeypatch.setattr(TaskIdentity, "_run_id", 1)
  monkeypatch.setattr(TaskIdentity, "_node_id", 0)
  monkeypatch.setattr(TaskIdentity, "_task_id", 1)
  random.seed(0)


def flagged(strategy) -> set:
  return {n for n, v in strategy.last_report.items() if v["contaminated"]}


def first_round(strategy, nodes=NODES):
  messages = list(strategy.configure_train(1, record(initial_adapter()), ConfigRecord(),
                                           FakeGrid(nodes)))
  arrays, metrics = strategy.aggregate_train(1, honest_replies(messages, 1))
  return messages, arrays, metrics


# ------------------------------------------------------------------------- fast tests


def test_byzantine_flagged_and_each_node_gets_its_own_adapter():
  strategy = flower.ClairStrategy(R)
  messages, arrays, metrics = first_round(strategy)
  assert sorted(m.metadata.dst_node_id for m in messages) == list(NODES)
  assert len({id(m.content) for m in messages}) == len(NODES)  # a RecordDict per node
  for m in messages:
    for k, v in initial_adapter().items():
      np.testing.assert_array_equal(tensors_of(m)[k], v)

  assert flagged(strategy) == BYZANTINE
  assert set(strategy.last_report) == set(NODES)
  for verdict in strategy.last_report.values():
    assert isinstance(verdict["contaminated"], bool) and isinstance(verdict["score"], float)
  assert metrics["clair-num-flagged"] == 2
  assert metrics["clair-max-score"] == max(v["score"] for v in strategy.last_report.values())
  assert metrics["clair-max-score"] > 1.0
  assert metrics["clair-num-dropped"] == 0 and metrics["clair-fallback"] == 0
  assert metrics["clair-truncation"] < 0.05
  assert metrics["train-loss"] == pytest.approx(1.0)  # FedAvg-weighted, benign replies
  new_global = {k: a.numpy() for k, a in arrays.items()}
  assert {k: v.shape for k, v in new_global.items()} == {
      k: v.shape for k, v in initial_adapter().items()}

  # Round 2: every known node its own adapter, a new node (999) the global arrays.
  messages = list(strategy.configure_train(2, arrays, ConfigRecord(),
                                           FakeGrid(NODES + (999,))))
  sent = {m.metadata.dst_node_id: tensors_of(m) for m in messages}
  for k, v in new_global.items():
    np.testing.assert_array_equal(sent[999][k], v)
  benign = sorted(set(NODES) - BYZANTINE)
  for node in NODES:
    for k in new_global:
      np.testing.assert_array_equal(sent[node][k], strategy.adapter_for(node)[k])
      assert sent[node][k].shape == new_global[k].shape  # the rank stays the clients'
  products = {n: sent[n][key(MODULES[0], "B")] @ sent[n][key(MODULES[0], "A")]
              for n in benign + [999]}
  for i, n in enumerate(benign):
    assert not np.allclose(products[n], products[999], atol=1e-3)
    for other in benign[i + 1:]:
      assert not np.allclose(products[n], products[other], atol=1e-3)

  # Federated evaluation sends the same per-node adapters (or the global, if asked).
  evaluation = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), FakeGrid(NODES)))
  for m in evaluation:
    for k, v in tensors_of(m).items():
      np.testing.assert_array_equal(v, strategy.adapter_for(m.metadata.dst_node_id)[k])
  strategy.personalized_evaluate = False
  for m in strategy.configure_evaluate(2, arrays, ConfigRecord(), FakeGrid(NODES)):
    for k, v in tensors_of(m).items():
      np.testing.assert_array_equal(v, new_global[k])

  strategy.aggregate_train(2, honest_replies(
      [m for m in messages if m.metadata.dst_node_id in NODES], 2))
  assert flagged(strategy) == BYZANTINE


def _dense_factored(delta: np.ndarray, width: int) -> tuple:
  """The same update factored anew (SVD): ``(B, A)`` of rank ``width``."""
  u, s, vt = np.linalg.svd(delta)
  return ((u[:, :width] * s[:width]).astype(np.float32), vt[:width].astype(np.float32))


def test_update_is_reply_minus_what_the_node_was_sent():
  """Round 1: same verdict as ``aggregate_adapters(..., base_adapter=initial)``. Round 2 (every
  node sent its own adapter): same scores as CLAIR on the dense updates ``B'A' - BA`` of each
  node, factored anew."""
  strategy = flower.ClairStrategy(R)
  messages = list(strategy.configure_train(1, record(initial_adapter()), ConfigRecord(),
                                           FakeGrid(NODES)))
  replies = honest_replies(messages, 1)
  arrays, _ = strategy.aggregate_train(1, replies)
  reference = aggregate_adapters({r.metadata.src_node_id: tensors_of(r) for r in replies}, R,
                                 base_adapter=initial_adapter())
  ours = strategy.last_aggregation
  order = [ours.names.index(n) for n in reference.names]
  np.testing.assert_array_equal(ours.contaminated[order], reference.contaminated)
  np.testing.assert_allclose(ours.scores[order], reference.scores, rtol=1e-3)

  messages = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid(NODES)))
  replies = honest_replies(messages, 2)
  strategy.aggregate_train(2, replies)
  sent = {m.metadata.dst_node_id: tensors_of(m) for m in messages}
  deltas = {}
  for r in replies:
    node, got = r.metadata.src_node_id, tensors_of(r)
    deltas[node] = {}
    for m in MODULES:
      dense = (got[key(m, "B")].astype(np.float64) @ got[key(m, "A")]
               - sent[node][key(m, "B")].astype(np.float64) @ sent[node][key(m, "A")])
      deltas[node][key(m, "B")], deltas[node][key(m, "A")] = _dense_factored(dense, 2 * R)
  reference = aggregate_adapters(deltas, R)
  ours = strategy.last_aggregation
  order = [ours.names.index(n) for n in reference.names]
  np.testing.assert_array_equal(ours.contaminated[order], reference.contaminated)
  np.testing.assert_allclose(ours.scores[order], reference.scores, rtol=1e-3)


def _raw_bytes_array(shape) -> Array:
  """What a sender that viewed its bfloat16 tensor as raw 2-byte records sends."""
  raw = np.zeros(shape, ml_dtypes.bfloat16).view("V2")
  return Array(raw)


def test_bad_replies_are_dropped_logged_and_the_round_completes(caplog):
  # 8 good (as many replies as the other rounds here: the same CLAIR programs), 6 bad,
  # one duplicate, one stranger
  nodes = tuple(range(201, 215))
  strategy = flower.ClairStrategy(R)
  messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
      1, record(initial_adapter()), ConfigRecord(), FakeGrid(nodes))}
  good = nodes[:8]
  replies = [reply(messages[n], trained(tensors_of(messages[n]), n, 1, byzantine=False))
             for n in good]
  sent = tensors_of(messages[209])
  a_key, b_key = key(MODULES[0], "A"), key(MODULES[0], "B")
  renamed = {k.replace("lora_A", "lora_a"): v for k, v in sent.items()}
  wrong_shape = dict(sent, **{a_key: np.zeros((R, IN + 1), np.float32)})
  raw = record(sent)
  raw[b_key] = _raw_bytes_array((OUT, R))
  stranger = Message(
      content=RecordDict({"arrays": record(sent), "metrics": MetricRecord({"num-examples": 1})}),
      metadata=Metadata(run_id=1, message_id="", src_node_id=999, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=time.time(),
                        ttl=3600.0, message_type="train"))
  replies += [
      Message(Error(code=0, reason="ClientApp crashed: out of memory"),
              reply_to=messages[209]),
      reply(messages[210], renamed),
      reply(messages[211], wrong_shape),
      reply(messages[212], arrays=raw),
      reply(messages[213], sent, metrics=False),
      reply(messages[214], sent, metrics={"train-loss": 1.0}),
      reply(messages[201], sent),   # a second reply from 201
      stranger,
  ]
  random.shuffle(replies)
  with caplog.at_level(logging.WARNING, logger="flwr.clair_jax"):
    arrays, metrics = strategy.aggregate_train(1, replies)

  assert arrays is not None and metrics["clair-fallback"] == 0
  assert set(strategy.last_report) == set(good)
  reasons = strategy.last_dropped
  assert set(reasons) == {201, 209, 210, 211, 212, 213, 214, 999}
  expected = {201: "second reply", 209: "out of memory", 210: "inconsistent keys",
              211: "has shape (2, 13)", 212: "raw bytes", 213: "expected one MetricRecord",
              214: "num-examples", 999: "no arrays were sent"}
  for node, text in expected.items():
    assert text in reasons[node], (node, reasons[node])
    assert any(f"node {node}: " in r.getMessage() and text in r.getMessage()
               for r in caplog.records), node
  assert metrics["clair-num-dropped"] == len(expected)


def test_bfloat16_arrays_are_decoded():
  """flwr ships a bfloat16 NumPy array as raw bytes (``|V2``) with ``dtype="bfloat16"``;
  those bytes are bfloat16 and are read as such."""
  array = Array(np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16))
  assert array.numpy().dtype.kind == "V"
  decoded = flower.decode_array(array)
  assert decoded.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(decoded.astype(np.float32), np.arange(6.0).reshape(2, 3))
  with pytest.raises(ValueError, match="raw bytes"):
    flower.decode_array(_raw_bytes_array((2, 3)))

  strategy = flower.ClairStrategy(R)
  messages = list(strategy.configure_train(1, record(initial_adapter()), ConfigRecord(),
                                           FakeGrid(NODES)))
  replies = []
  for m in messages:
    node = m.metadata.dst_node_id
    tensors = trained(tensors_of(m), node, 1, byzantine=node in BYZANTINE)
    if node == NODES[0]:
      tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    replies.append(reply(m, tensors))
  strategy.aggregate_train(1, replies)
  assert strategy.last_dropped == {}
  assert flagged(strategy) == BYZANTINE


def test_fewer_than_three_usable_replies_keep_the_arrays(caplog):
  strategy = flower.ClairStrategy(R)
  nodes = (1, 2, 3, 4)
  messages = list(strategy.configure_train(1, record(initial_adapter()), ConfigRecord(),
                                           FakeGrid(nodes)))
  replies = [reply(m, trained(tensors_of(m), m.metadata.dst_node_id, 1, byzantine=False))
             for m in messages[:2]]
  replies += [Message(Error(code=0, reason="timeout"), reply_to=m) for m in messages[2:]]
  with caplog.at_level(logging.WARNING, logger="flwr.clair_jax"):
    arrays, metrics = strategy.aggregate_train(1, replies)
  for k, v in initial_adapter().items():
    np.testing.assert_array_equal(arrays[k].numpy(), v)
  assert metrics["clair-fallback"] == 1 and metrics["clair-num-flagged"] == 0
  assert metrics["clair-num-dropped"] == 2
  assert strategy.last_report == {}
  assert any("only 2 usable replies" in r.getMessage() and r.levelno == logging.WARNING
             for r in caplog.records)
  for node in nodes:  # nobody got a refined adapter
    for k, v in initial_adapter().items():
      np.testing.assert_array_equal(strategy.adapter_for(node)[k], v)


def test_metrics_that_cannot_be_averaged_do_not_end_the_round(caplog):
  """Replies whose metric values do not average (a list beside a number) lose the FedAvg
  metrics of the round, not the round."""
  strategy = flower.ClairStrategy(R)
  messages = list(strategy.configure_train(1, record(initial_adapter()), ConfigRecord(),
                                           FakeGrid((1, 2))))
  replies = [reply(m, initial_adapter(), metrics={"num-examples": 1, "train-loss": loss})
             for m, loss in zip(messages, (1.0, [1.0, 2.0]))]
  with caplog.at_level(logging.WARNING, logger="flwr.clair_jax"):
    _, metrics = strategy.aggregate_train(1, replies)
  assert "train-loss" not in metrics and metrics["clair-fallback"] == 1
  assert any("could not average the replies' metrics" in r.getMessage() for r in caplog.records)


def test_exclude_after_stops_sampling_repeat_offenders(caplog):
  strategy = flower.ClairStrategy(R, exclude_after=2)
  _, arrays, _ = first_round(strategy)
  assert strategy.excluded == set()
  messages = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid(NODES)))
  with caplog.at_level(logging.WARNING, logger="flwr.clair_jax"):
    arrays, _ = strategy.aggregate_train(2, honest_replies(messages, 2))
  assert strategy.excluded == set(BYZANTINE)
  assert any("no longer sampled" in r.getMessage() for r in caplog.records)
  for configure in (strategy.configure_train, strategy.configure_evaluate):
    sampled = {m.metadata.dst_node_id
               for m in configure(3, arrays, ConfigRecord(), FakeGrid(NODES))}
    assert sampled == set(NODES) - BYZANTINE


def test_truncate_lora_is_the_best_rank_r_approximation():
  rng = np.random.default_rng(3)
  left, right = rng.normal(size=(9, 5)), rng.normal(size=(5, 7))
  cut = flower.truncate_lora(left, right, 2, scaling=0.5)
  u, s, vt = np.linalg.svd(left @ right)
  best = (u[:, :2] * s[:2]) @ vt[:2]
  np.testing.assert_allclose(0.5 * cut.lora_b @ cut.lora_a, best, atol=1e-10)
  np.testing.assert_allclose(cut.lora_a @ cut.lora_a.T, np.eye(2), atol=1e-12)
  assert cut.dropped == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)))
  # A rank-1 update (or none) kept exactly; A still has orthonormal rows.
  for left, right in ((rng.normal(size=(9, 1)), rng.normal(size=(1, 7))),
                      (np.zeros((9, 2)), np.zeros((2, 7)))):
    cut = flower.truncate_lora(left, right, 3)
    np.testing.assert_allclose(cut.lora_b @ cut.lora_a, left @ right, atol=1e-10)
    np.testing.assert_allclose(cut.lora_a @ cut.lora_a.T, np.eye(3), atol=1e-12)
    assert cut.dropped == pytest.approx(0.0)


def test_scaling_is_read_from_the_lora_config():
  """With PEFT's ``lora_alpha / r``, the update is ``scaling * B A`` on both sides."""
  config = {"r": R, "lora_alpha": 4 * R}
  layout = flower.layout_of(initial_adapter(), config)
  assert {m.scaling for m in layout.modules} == {4.0}
  sent = trained(initial_adapter(), 1, 1, byzantine=False)
  got = trained(sent, 1, 2, byzantine=False)
  delta = flower.factored_delta(got, sent, layout)
  for m in MODULES:
    dense = 4.0 * (got[key(m, "B")] @ got[key(m, "A")] - sent[key(m, "B")] @ sent[key(m, "A")])
    np.testing.assert_allclose(delta[key(m, "B")] @ delta[key(m, "A")], dense, atol=1e-5)
  new, _ = flower.add_update(sent, delta, layout)
  for m in MODULES:
    np.testing.assert_allclose(4.0 * new[key(m, "B")] @ new[key(m, "A")],
                               4.0 * got[key(m, "B")] @ got[key(m, "A")], atol=1e-4)


def test_bad_arguments_and_lazy_import():
  with pytest.raises(ValueError, match="rank"):
    flower.ClairStrategy(0)
  with pytest.raises(ValueError, match="exclude_after"):
    flower.ClairStrategy(2, exclude_after=0)
  code = ("import sys, clair_jax; "
          "assert 'flwr' not in sys.modules and 'clair_jax.flower' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------- simulation

SIM_NODES = 6
SIM_BYZANTINE = frozenset({4, 5})   # partition ids
SIM_ROUNDS = 2


def _checksum(tensors: dict) -> float:
  """A fingerprint of an adapter (its tensors weighted by position)."""
  total = 0.0
  for i, k in enumerate(sorted(tensors)):
    x = np.asarray(tensors[k], np.float64).ravel()
    total += float(np.dot(x, np.arange(1, x.size + 1))) * (i + 1)
  return total


def _sim_train(msg: Message, context) -> Message:
  """A numpy client: benign nodes add ``U C_k`` plus noise to ``B``, Byzantine ones scaled
  random factors; it reports its partition and a fingerprint of what it received."""
  pid = int(context.node_config["partition-id"])
  server_round = int(msg.content["config"]["server-round"])
  sent = tensors_of(msg)
  tensors = trained(sent, 1000 + pid, server_round, byzantine=pid in SIM_BYZANTINE)
  metrics = MetricRecord({"num-examples": 10, "partition-id": pid,
                          "received": _checksum(sent)})
  return Message(RecordDict({"arrays": record(tensors), "metrics": metrics}), reply_to=msg)


def _simulate(strategy_class, num_rounds: int = SIM_ROUNDS, **strategy_kwargs) -> dict:
  """Runs ``run_simulation`` with ``SIM_NODES`` nodes and ``strategy_class(**kwargs)``;
  returns what the server recorded."""
  from flwr.clientapp import ClientApp
  from flwr.serverapp import ServerApp
  from flwr.simulation import run_simulation

  log = {"rounds": [], "sent": {}, "partition": {}, "received": {}, "times": [],
         "aggregate": []}

  class Recording(strategy_class):
    """Records per round: the verdicts, node -> partition, what was sent and received."""

    def configure_train(self, server_round, arrays, config, grid):
      log["times"].append(time.perf_counter())
      messages = list(super().configure_train(server_round, arrays, config, grid))
      log["sent"][server_round] = {m.metadata.dst_node_id: _checksum(tensors_of(m))
                                   for m in messages}
      log.setdefault("global", {})[server_round] = _checksum(
          {k: a.numpy() for k, a in arrays.items()})
      return messages

    def aggregate_train(self, server_round, replies):
      replies = list(replies)
      for r in replies:
        metrics = r.content["metrics"]
        log["partition"][r.metadata.src_node_id] = int(metrics["partition-id"])
        log["received"][(server_round, r.metadata.src_node_id)] = float(metrics["received"])
      start = time.perf_counter()
      out = super().aggregate_train(server_round, replies)
      log["aggregate"].append(time.perf_counter() - start)
      log["rounds"].append(dict(getattr(self, "last_report", {})))
      log["times"].append(time.perf_counter())
      return out

  server = ServerApp()

  @server.main()
  def _main(grid, context):  # pylint: disable=unused-argument
    strategy = Recording(fraction_evaluate=0.0, min_available_nodes=SIM_NODES,
                         min_train_nodes=SIM_NODES, **strategy_kwargs)
    strategy.start(grid=grid, initial_arrays=record(initial_adapter()),
                   num_rounds=num_rounds)

  client = ClientApp()
  client.train()(_sim_train)
  start = time.perf_counter()
  run_simulation(server_app=server, client_app=client, num_supernodes=SIM_NODES,
                 backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                 "init_args": {"logging_level": "ERROR",
                                               "log_to_driver": False}})
  log["total"] = time.perf_counter() - start
  return log


@pytest.mark.slow
def test_simulation_flags_byzantine_nodes_and_personalises():
  pytest.importorskip("ray")
  log = _simulate(flower.ClairStrategy, rank=R)
  assert len(log["rounds"]) == SIM_ROUNDS
  byzantine = {n for n, p in log["partition"].items() if p in SIM_BYZANTINE}
  assert len(log["partition"]) == SIM_NODES and len(byzantine) == len(SIM_BYZANTINE)
  for report in log["rounds"]:
    assert set(report) == set(log["partition"])
    assert {n for n, v in report.items() if v["contaminated"]} == byzantine
  benign = sorted(set(log["partition"]) - byzantine)
  sent = log["sent"][2]
  for node in benign:  # what the node received is what the strategy meant for it ...
    assert log["received"][(2, node)] == pytest.approx(sent[node], rel=1e-9)
    assert sent[node] != pytest.approx(log["global"][2], rel=1e-6)  # ... its own
  assert len({round(sent[n], 6) for n in benign}) == len(benign)
  rounds = np.diff(log["times"])[::2]
  print(f"\nsimulation: {log['total']:.1f} s in all, rounds {np.round(rounds, 2)} s, "
        f"of which aggregate_train {np.round(log['aggregate'], 2)} s")
