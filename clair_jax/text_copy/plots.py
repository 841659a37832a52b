"""PNG plots of a text-copy report (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KIND_COLORS = {"benign": "tab:green", "random_targets": "tab:orange", "permutation": "tab:red",
               "reversed": "tab:purple", "scaled_random": "tab:brown", "nan": "black"}


def plot_accuracy(report: dict, path: str) -> str:
  """Bar chart of mean benign token / exact-sequence accuracy per method (+- std over seeds)."""
  methods = list(report["methods"])
  std = report.get("methods_std", {})
  x = np.arange(len(methods))
  fig, ax = plt.subplots(figsize=(9, 3.6))
  for i, (metric, label) in enumerate([("token_acc", "token acc"), ("seq_acc", "exact-seq acc")]):
    means = [report["methods"][m][metric] for m in methods]
    errs = [std.get(m, {}).get(metric, 0.0) for m in methods]
    ax.bar(x + (i - 0.5) * 0.4, means, 0.4, yerr=errs, label=label, capsize=2)
  ax.set_xticks(x, methods, rotation=30, ha="right")
  ax.set_ylim(0, 1)
  ax.set_ylabel("benign clients, held-out")
  ax.legend(loc="upper left")
  ax.set_title("Text copy: accuracy per method")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_scores(run: dict, path: str) -> str:
  """Per-client joint scores (geometric mean of normalised module scores) with the cut."""
  per = run["per_client"]
  scores = np.array([np.inf if s is None else s for s in per["joint_score"]], dtype=float)
  finite_max = np.max(scores[np.isfinite(scores)]) if np.isfinite(scores).any() else 1.0
  shown = np.where(np.isfinite(scores), scores, finite_max * 1.5)
  colors = [KIND_COLORS.get(kind, "gray") for kind in per["kinds"]]
  fig, ax = plt.subplots(figsize=(9, 3.6))
  ax.bar(np.arange(len(scores)), shown, color=colors)
  ax.axhline(per["joint_cut"], color="k", ls="--", lw=1, label="cut")
  ax.set_yscale("log")
  ax.set_xlabel("client")
  ax.set_ylabel("joint score (geo-mean_j s_jk / t_j)")
  handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in KIND_COLORS.items()
             if k in per["kinds"]]
  labels = [k for k in KIND_COLORS if k in per["kinds"]]
  ax.legend(handles + [ax.lines[0]], labels + ["cut"], fontsize=7, ncol=3)
  ax.set_title(f"CLAIR joint contamination scores (seed {run['seed']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_curves(run: dict, path: str) -> str:
  """Pre-training loss and mean local LoRA loss (benign vs contaminated clients)."""
  curves = run["curves"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  axes[0].plot(curves["pretrain_loss"])
  axes[0].set_yscale("log")
  axes[0].set_title("central pre-training")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("copy loss")
  axes[1].plot(curves["local_loss_benign"], label="benign")
  if curves["local_loss_contaminated"]:
    axes[1].plot(curves["local_loss_contaminated"], label="contaminated")
  axes[1].set_yscale("log")
  axes[1].set_title("local LoRA (mean over clients)")
  axes[1].set_xlabel("step")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_report(report: dict, out_dir: str) -> list[str]:
  """Writes ``accuracy.png``, ``scores.png`` and ``curves.png`` (first seed) to ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  run = report["runs"][0]
  return [plot_accuracy(report, os.path.join(out_dir, "accuracy.png")),
          plot_scores(run, os.path.join(out_dir, "scores.png")),
          plot_curves(run, os.path.join(out_dir, "curves.png"))]
