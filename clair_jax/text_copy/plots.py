"""PNG plots of a text-copy report (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

KIND_COLORS = {"benign": "tab:green", "random_targets": "tab:orange", "permutation": "tab:red",
               "reversed": "tab:purple", "scaled_random": "tab:brown", "nan": "black"}


def plot_accuracy(report: dict, path: str) -> str:
  """Bar chart of mean benign token / exact-sequence accuracy per method (+- std over seeds)."""
  methods = list(report["methods"])
  std = report.get("methods_std", {})
  x = np.arange(len(methods))
  fig, ax = plt.subplots(figsize=(11, 3.8))
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


def plot_detection(report: dict, path: str) -> str:
  """Every seed's joint score relative to its cut, by client kind (log scale; above 1 is
  flagged): how far each kind of client sits from the benign ones."""
  by_kind: dict = {}
  for run in report["runs"]:
    per = run["per_client"]
    scores = np.array([np.inf if s is None else s for s in per["joint_score"]], float)
    for kind, ratio in zip(per["kinds"], scores / per["joint_cut"]):
      by_kind.setdefault(kind, []).append(ratio)
  kinds = list(by_kind)
  finite = np.concatenate([np.asarray(v)[np.isfinite(v)] for v in by_kind.values()])
  top = finite.max() * 2 if finite.size else 10.0
  rng = np.random.default_rng(0)
  fig, ax = plt.subplots(figsize=(7, 3.6))
  for i, kind in enumerate(kinds):
    values = np.asarray(by_kind[kind])
    shown = np.where(np.isfinite(values), values, top)
    ax.scatter(i + rng.uniform(-0.2, 0.2, shown.shape), shown, s=12,
               color=KIND_COLORS.get(kind, "gray"))
    flagged = int(np.sum(values > 1))
    ax.annotate(f"{flagged}/{len(values)}", (i, top * 1.3), ha="center", fontsize=8)
  ax.axhline(1.0, color="k", ls="--", lw=1, label="cut")
  ax.set_yscale("log")
  ax.set_ylim(top=top * 2.5)
  ax.set_xticks(np.arange(len(kinds)), kinds, fontsize=8)
  ax.set_ylabel("joint score / cut")
  ax.set_title(f"Detection ({report.get('task', 'copy')}, {len(report['runs'])} seeds): "
               "flagged above 1 (counts on top)")
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


def _benign_values(report: dict, method: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-client token accuracy of ``method`` over every seed's benign clients, and the seed
  index of each value."""
  values, seeds = [], []
  for i, run in enumerate(report["runs"]):
    per = run["per_client"]
    acc = np.array([np.nan if v is None else v for v in per["token_acc"][method]], float)
    acc = acc[np.asarray(per["benign"], bool)]
    values.append(acc)
    seeds.append(np.full(acc.shape, i))
  return np.concatenate(values), np.concatenate(seeds)


def plot_per_client(report: dict, path: str) -> str:
  """Per-client benign token accuracy by method (every seed), and CLAIR against local and
  the best global rule client by client."""
  methods = [m for m in report["methods"] if m != "base"]
  rng = np.random.default_rng(0)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.3, 1]})
  ax = axes[0]
  for i, m in enumerate(methods):
    values, _ = _benign_values(report, m)
    values = values[np.isfinite(values)]
    color = "tab:blue" if m.startswith("clair") else "tab:gray"
    if m == "clair":
      color = "tab:red"
    ax.scatter(i + rng.uniform(-0.25, 0.25, values.shape), values, s=6, alpha=0.5, color=color)
    if values.size:
      ax.plot([i - 0.3, i + 0.3], [values.mean()] * 2, color="k", lw=1.5)
  ax.set_xticks(np.arange(len(methods)), methods, rotation=35, ha="right", fontsize=8)
  ax.set_ylim(0, 1.02)
  ax.set_ylabel("token acc, one point per benign client")
  ax.set_title(f"Text copy ({report.get('task', 'copy')}): per-client accuracy "
               f"({len(report['runs'])} seeds; bar = mean)")
  ax = axes[1]
  clair, _ = _benign_values(report, "clair")
  globals_ = [m for m in ("median", "trimmed_mean", "multi_krum", "geometric_median")
              if m in report["methods"]]
  best = max(globals_, key=lambda m: report["methods"][m]["token_acc"]) if globals_ else None
  for m, color in (("local", "tab:green"), (best, "tab:purple")):
    if m is None:
      continue
    other, _ = _benign_values(report, m)
    ax.scatter(other, clair, s=8, alpha=0.6, color=color, label=f"x = {m}")
  ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
  ax.set_xlim(0, 1.02)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("token acc of the other method")
  ax.set_ylabel("token acc of clair")
  ax.set_title("clair vs others, per client")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_report(report: dict, out_dir: str) -> list[str]:
  """Writes ``accuracy.png``, ``per_client.png``, ``detection.png`` (all seeds),
  ``scores.png`` and ``curves.png`` (first seed) to ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  run = report["runs"][0]
  return [plot_accuracy(report, os.path.join(out_dir, "accuracy.png")),
          plot_per_client(report, os.path.join(out_dir, "per_client.png")),
          plot_detection(report, os.path.join(out_dir, "detection.png")),
          plot_scores(run, os.path.join(out_dir, "scores.png")),
          plot_curves(run, os.path.join(out_dir, "curves.png"))]
