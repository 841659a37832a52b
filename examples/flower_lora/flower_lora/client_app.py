"""The ClientApp: LoRA fine-tuning of the text-copy Transformer on the node's partition.

``train`` loads the adapter the server sent (the node's own refined adapter after the first
round), trains it locally and replies with its PEFT-keyed tensors; a Byzantine node (the
last ``num-byzantine`` partitions) replies with a scaled random update instead.
``evaluate`` reports the accuracy of the adapter it was sent on the node's held-out data
(and of the base model, for comparison). ``is-byzantine`` in the metrics is the ground truth,
for the server's final table only: the strategy never reads it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import Context
from flwr.app import Message
from flwr.app import MetricRecord
from flwr.app import RecordDict
from flwr.clientapp import ClientApp

from flower_lora import task

app = ClientApp()


def _node(context: Context):
  partition = int(context.node_config["partition-id"])
  num_partitions = int(context.node_config["num-partitions"])
  return task.setup(context.run_config, num_partitions), partition


def _received(msg: Message) -> dict:
  return {key: array.numpy() for key, array in msg.content["arrays"].items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
  """Local LoRA training from the adapter received; PEFT-keyed tensors back."""
  node, partition = _node(context)
  server_round = int(msg.content["config"]["server-round"])
  seed = int(context.run_config["seed"]) * 100_003 + server_round * 1_009 + partition
  sent = _received(msg)
  lora, loss = task.local_train(node, task.load_adapter(node, sent), partition, seed)
  tensors = task.adapter_tensors(lora)
  byzantine = node.federation.kinds[partition] != "benign"
  if byzantine:
    tensors = task.scaled_random(sent, tensors, node.config.federation.poison_scale,
                                 np.random.default_rng(seed))
  metrics = MetricRecord({"train-loss": loss, "num-examples": int(node.config.federation.num_train),
                          "partition-id": partition, "is-byzantine": int(byzantine)})
  arrays = ArrayRecord({key: Array(value) for key, value in tensors.items()})
  return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
  """Accuracy of the adapter received (and of the base model) on held-out sequences."""
  node, partition = _node(context)
  found = task.copy_metrics(node, task.load_adapter(node, _received(msg)), partition)
  base = task.copy_metrics(node, node.lora, partition)  # LoRA's init: B = 0, the base model
  metrics = MetricRecord({
      "token-acc": found["token_acc"], "seq-acc": found["seq_acc"], "loss": found["loss"],
      "base-token-acc": base["token_acc"],
      "num-examples": int(node.federation.test.shape[1]), "partition-id": partition,
      "is-byzantine": int(node.federation.kinds[partition] != "benign")})
  return Message(RecordDict({"metrics": metrics}), reply_to=msg)
