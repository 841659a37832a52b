"""The ServerApp: CLAIR (``clair_jax.flower.ClairStrategy``) or FedAvg over LoRA adapters.

Run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, override with ``flwr run . -c``):
``strategy`` (``"clair"`` or ``"fedavg"``), ``clair-rank``, ``exclude-after`` (0: never),
``min-nodes`` (the round waits until that many nodes are connected), ``num-server-rounds``.
At the end it prints one line per node: its partition, whether it is Byzantine (ground truth
the clients report, never read by the strategy), the rounds CLAIR flagged it in, and the
held-out token accuracy of the adapter it holds.
"""

from __future__ import annotations

from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from clair_jax.flower import ClairStrategy
from flower_lora import task

INFO = 20

app = ServerApp()


def reporting(strategy_class):
  """``strategy_class`` that also records, per node, its partition, its CLAIR verdicts and its
  last evaluation."""

  class Reporting(strategy_class):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.partition, self.byzantine, self.flagged_in, self.evaluation = {}, {}, {}, {}

    def _note(self, replies) -> None:
      for reply in replies:
        if reply.has_content() and reply.content.metric_records:
          metrics = next(iter(reply.content.metric_records.values()))
          node = reply.metadata.src_node_id
          self.partition[node] = int(metrics.get("partition-id", -1))
          self.byzantine[node] = bool(metrics.get("is-byzantine", 0))

    def aggregate_train(self, server_round, replies):
      replies = list(replies)
      self._note(replies)
      out = super().aggregate_train(server_round, replies)
      for node, verdict in getattr(self, "last_report", {}).items():
        if verdict["contaminated"]:
          self.flagged_in.setdefault(node, []).append(server_round)
      return out

    def aggregate_evaluate(self, server_round, replies):
      replies = list(replies)
      self._note(replies)
      for reply in replies:
        if reply.has_content():
          self.evaluation[reply.metadata.src_node_id] = dict(reply.content["metrics"])
      return super().aggregate_evaluate(server_round, replies)

    def table(self) -> list[str]:
      lines = ["partition  byzantine  flagged in rounds  token-acc (base)"]
      for node in sorted(self.partition, key=self.partition.get):
        found = self.evaluation.get(node, {})
        lines.append(f"{self.partition[node]:9d}  {str(self.byzantine[node]):9s}  "
                     f"{str(self.flagged_in.get(node, [])):17s}  "
                     f"{found.get('token-acc', float('nan')):.3f} "
                     f"({found.get('base-token-acc', float('nan')):.3f})")
      benign = [self.evaluation[n]["token-acc"] for n in self.evaluation
                if not self.byzantine.get(n)]
      if benign:
        lines.append(f"mean token accuracy of the benign nodes: {sum(benign) / len(benign):.3f}")
      return lines

  return Reporting


@app.main()
def main(grid: Grid, context: Context) -> None:
  """Builds the strategy and the initial adapter, runs the rounds, prints the table."""
  run_config = context.run_config
  min_nodes = int(run_config["min-nodes"])
  config = task.experiment_config(run_config, num_partitions=min_nodes)  # for the model
  common = dict(fraction_train=1.0, fraction_evaluate=float(run_config["fraction-evaluate"]),
                min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
                min_available_nodes=min_nodes)
  if run_config["strategy"] == "clair":
    exclude_after = int(run_config["exclude-after"]) or None
    strategy = reporting(ClairStrategy)(int(run_config["clair-rank"]),
                                        exclude_after=exclude_after, **common)
  elif run_config["strategy"] == "fedavg":
    strategy = reporting(FedAvg)(**common)
  else:
    raise ValueError(f"strategy must be 'clair' or 'fedavg'; got {run_config['strategy']!r}")
  initial = task.initial_adapter(config, int(run_config["seed"]))
  strategy.start(grid=grid,
                 initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
                 num_rounds=int(run_config["num-server-rounds"]))
  log(INFO, "%s after %d rounds:", run_config["strategy"], int(run_config["num-server-rounds"]))
  for line in strategy.table():
    log(INFO, "  %s", line)
