"""``clair-jax synthetic``: CLAIR against robust baselines on data with known truth.

For every cell of the grid (contamination fraction x attack x noise level) and every
trial, :func:`clair_jax.synthetic.make_problem` draws client updates, every method turns
them into per-client estimates, and the study records the benign-client error
``mean_{k benign} ||Dtilde_k - Delta_k||_F^2``, detection precision/recall/F1/exact
(CLAIR, multi-Krum's rejected set, the oracle) and the spectral ``||sin Theta||`` subspace
error (CLAIR, oracle). A second grid (fraction x separation of a partially overlapping
coherent attack) gives the detection phase diagram.

The baselines are given what they need to be at their best: multi-Krum assumes the true
number of attackers ``f`` (and averages ``K - f`` clients), the trimmed mean trims the true
contaminated fraction at each end (capped below 1/2). CLAIR gets only the updates and the
rank.

Outputs in ``--out``: ``report.json`` (``methods`` summary keyed by method, ``grid`` with
every cell, ``phase_diagram``, ``checks``, ``config``), ``table.md`` (the printed table),
and the plots ``benign_error_vs_contamination.png``, ``detection_phase_diagram.png`` and
``client_scores.png``. ``--readme PATH`` replaces the text between
``<!-- synthetic-table:begin -->`` and ``<!-- synthetic-table:end -->`` in ``PATH`` by the
table, so README numbers are always regenerated, never typed.

``--grid attacks`` (or naming a literature attack in ``--attacks``) runs the other grid, the
attacks of the Byzantine-robust FL literature over shapes, heterogeneity, fractions and
seeds: see :mod:`clair_jax.studies.attacks_study`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax
from clair_jax import baselines
from clair_jax import metrics
from clair_jax import synthetic
from clair_jax._src import reporting

METHODS = (
    "local",
    "fedavg",
    "median",
    "trimmed_mean",
    "krum",
    "geometric_median",
    "oracle",
    "clair",
)
# Methods CLAIR must beat under coherent attacks (every one but the oracle).
BASELINES = ("local", "fedavg", "median", "trimmed_mean", "krum", "geometric_median")
COHERENT_ATTACKS = ("coherent", "overlap", "boosted")
DETECTING_METHODS = ("krum", "oracle", "clair")
SUBSPACE_METHODS = ("oracle", "clair")
ORACLE_FACTOR = 1.1

TABLE_BEGIN = "<!-- synthetic-table:begin -->"
TABLE_END = "<!-- synthetic-table:end -->"


class StudyConfig(NamedTuple):
  """Sizes and grids of one study run."""

  num_clients: int = 30
  m: int = 64
  n: int = 16
  rank: int = 4
  heterogeneity: float = 0.5
  fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
  attacks: tuple[str, ...] = synthetic.MODEL_ATTACKS
  noises: tuple[float, ...] = (0.1, 0.3, 0.6)
  separations: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
  trials: int = 2
  seed: int = 0
  setting: str = "updates"
  num_samples: int | None = None


QUICK = StudyConfig(
    num_clients=12,
    m=16,
    n=4,
    rank=2,
    fractions=(0.25,),
    attacks=("random", "coherent", "nonfinite"),
    noises=(0.2,),
    separations=(0.2, 1.0),
    trials=1,
)


# --------------------------------------------------------------------------- evaluation


def _all_baselines(updates, contaminated, num_byzantine, trim, rank: int):
  """``{name: (estimates, selected)}`` for every method but CLAIR."""
  return {
      "local": tuple(baselines.local(updates)),
      "fedavg": tuple(baselines.fedavg(updates)),
      "median": tuple(baselines.coordinate_median(updates)),
      "trimmed_mean": tuple(baselines.trimmed_mean(updates, trim)),
      "krum": tuple(baselines.multi_krum(updates, num_byzantine)),
      "geometric_median": tuple(baselines.geometric_median(updates)),
      "oracle": tuple(baselines.oracle(updates, ~contaminated, rank)),
  }


_all_baselines_jit = jax.jit(_all_baselines, static_argnames=("rank",))


def evaluate_problem(problem: synthetic.SyntheticProblem, rank: int):
  """Runs every method on one problem.

  Args:
    problem: a :class:`clair_jax.synthetic.SyntheticProblem`.
    rank: the rank given to CLAIR and the oracle.

  Returns:
    ``(metrics_by_method, clair_result)``: ``{method: {"benign_error": float, ...}}`` with
    ``precision/recall/f1/exact`` for :data:`DETECTING_METHODS` and ``subspace_error`` for
    :data:`SUBSPACE_METHODS`; and the :class:`clair_jax.ClairResult`.
  """
  num_clients = problem.updates.shape[0]
  contaminated = problem.contaminated
  num_bad = int(jnp.sum(contaminated))
  trim = min(num_bad / num_clients, 0.49)
  outputs = _all_baselines_jit(problem.updates, contaminated, num_bad, trim, rank)
  result = clair_jax.clair(problem.updates, rank)
  outputs["clair"] = (result.refined, ~result.contaminated)
  subspaces = {"oracle": outputs["oracle"][2], "clair": result.subspace}
  benign = ~contaminated
  out = {}
  for name in METHODS:
    estimates, selected = outputs[name][0], outputs[name][1]
    entry = {"benign_error": float(metrics.benign_error(estimates, problem.truth, benign))}
    if name in DETECTING_METHODS:
      detection = metrics.detection_metrics(~selected, contaminated)
      entry.update({k: float(v) for k, v in detection._asdict().items()})
    if name in SUBSPACE_METHODS:
      entry["subspace_error"] = float(metrics.subspace_error(subspaces[name], problem.subspace))
    out[name] = entry
  return out, result


def _problem(config: StudyConfig, key, *, fraction, attack, noise, separation=None):
  """One problem of the grid: direct noisy updates, or OLS estimates (``regression``)."""
  common = dict(
      num_clients=config.num_clients,
      m=config.m,
      n=config.n,
      rank=config.rank,
      fraction=fraction,
      attack=attack,
      noise=noise,
      heterogeneity=config.heterogeneity,
      separation=separation,
  )
  if config.setting == "regression":
    num_samples = config.num_samples or 2 * config.m
    return synthetic.make_regression_problem(key, num_samples=num_samples, **common)
  return synthetic.make_problem(key, **common)


def _mean(values):
  values = list(values)
  return float(np.mean(values)) if values else float("nan")


def _cell_summary(trials: list[dict]) -> dict:
  """Averages per-trial method metrics; keeps the per-trial benign errors."""
  methods = {}
  for name in METHODS:
    entry = {}
    for key in trials[0][name]:
      entry[key] = _mean([t[name][key] for t in trials])
    entry["benign_error_trials"] = [t[name]["benign_error"] for t in trials]
    methods[name] = entry
  exact = [t["clair"]["exact"] == 1.0 for t in trials]
  ratios = [t["clair"]["benign_error"] / t["oracle"]["benign_error"] for t in trials]
  return {
      "methods": methods,
      "clair_exact_trials": exact,
      "clair_oracle_ratio_trials": ratios,
  }


def run_grid(config: StudyConfig, progress=None) -> list[dict]:
  """Evaluates every (fraction, attack, noise) cell over ``config.trials`` trials."""
  base = jax.random.key(config.seed)
  cells = []
  index = 0
  for attack in config.attacks:
    for fraction in config.fractions:
      for noise in config.noises:
        trials = []
        for trial in range(config.trials):
          key = jax.random.fold_in(jax.random.fold_in(base, index), trial)
          problem = _problem(config, key, fraction=fraction, attack=attack, noise=noise)
          trials.append(evaluate_problem(problem, config.rank)[0])
          if progress is not None:
            progress.update(1)
        cell = {
            "attack": attack,
            "fraction": fraction,
            "noise": noise,
            "num_contaminated": int(round(fraction * config.num_clients)),
        }
        cell.update(_cell_summary(trials))
        cells.append(cell)
        index += 1
  return cells


def run_phase_diagram(config: StudyConfig, noise: float, progress=None) -> dict:
  """CLAIR detection over fraction x separation for the ``overlap`` attack."""
  base = jax.random.fold_in(jax.random.key(config.seed), 1_000_003)
  shape = (len(config.fractions), len(config.separations))
  exact, f1, ratio = np.zeros(shape), np.zeros(shape), np.zeros(shape)
  for i, fraction in enumerate(config.fractions):
    for j, separation in enumerate(config.separations):
      trials = []
      for trial in range(config.trials):
        key = jax.random.fold_in(jax.random.fold_in(base, i * len(config.separations) + j), trial)
        problem = _problem(
            config, key, fraction=fraction, attack="overlap", noise=noise, separation=separation
        )
        trials.append(evaluate_problem(problem, config.rank)[0])
        if progress is not None:
          progress.update(1)
      exact[i, j] = _mean([t["clair"]["exact"] for t in trials])
      f1[i, j] = _mean([t["clair"]["f1"] for t in trials])
      ratio[i, j] = _mean(
          [t["clair"]["benign_error"] / t["oracle"]["benign_error"] for t in trials]
      )
  return {
      "attack": "overlap",
      "noise": noise,
      "fractions": list(config.fractions),
      "separations": list(config.separations),
      "clair_exact": exact.tolist(),
      "clair_f1": f1.tolist(),
      "clair_oracle_ratio": ratio.tolist(),
  }


# --------------------------------------------------------------------------- summaries


def summarise_methods(cells: list[dict]) -> dict:
  """Per-method metrics aggregated over every grid cell."""
  summary = {}
  for name in METHODS:
    errors = [c["methods"][name]["benign_error"] for c in cells]
    oracle = [c["methods"]["oracle"]["benign_error"] for c in cells]
    finite = [e for e in errors if math.isfinite(e)]
    best = 0
    for c in cells:
      others = [c["methods"][b]["benign_error"] for b in METHODS if b != "oracle"]
      if name != "oracle" and c["methods"][name]["benign_error"] <= min(others):
        best += 1
    entry = {
        "benign_error_geomean": reporting.geometric_mean(errors),
        "benign_error_median": float(np.median(errors)) if errors else float("nan"),
        "benign_error_mean": float(np.mean(errors)) if errors else float("nan"),
        "ratio_to_oracle_geomean": reporting.geometric_mean(e / o for e, o in zip(errors, oracle)),
        "nonfinite_cells": len(errors) - len(finite),
        "best_cells": best,
        "num_cells": len(cells),
    }
    if name in DETECTING_METHODS:
      for key in ("precision", "recall", "f1", "exact"):
        entry[key] = _mean(c["methods"][name][key] for c in cells)
    if name in SUBSPACE_METHODS:
      entry["subspace_error_mean"] = _mean(c["methods"][name]["subspace_error"] for c in cells)
    summary[name] = entry
  return summary


def run_checks(cells: list[dict]) -> dict:
  """The issue's acceptance checks, with the failing cells named."""
  exact_trials, exact_failures = 0, []
  coherent_cells, coherent_failures = 0, []
  for c in cells:
    where = {k: c[k] for k in ("attack", "fraction", "noise")}
    for trial, (ratio, exact) in enumerate(
        zip(c["clair_oracle_ratio_trials"], c["clair_exact_trials"])
    ):
      if exact:
        exact_trials += 1
        if not ratio <= ORACLE_FACTOR:
          exact_failures.append({**where, "trial": trial, "clair_over_oracle": ratio})
    if c["attack"] in COHERENT_ATTACKS:
      coherent_cells += 1
      clair_error = c["methods"]["clair"]["benign_error"]
      beaten_by = [
          b for b in BASELINES if not clair_error < c["methods"][b]["benign_error"]
      ]
      if beaten_by:
        coherent_failures.append({**where, "not_below": beaten_by})
  return {
      "clair_within_oracle_factor_when_exact": {
          "factor": ORACLE_FACTOR,
          "exact_trials": exact_trials,
          "passed": not exact_failures,
          "failures": exact_failures,
      },
      "clair_below_baselines_under_coherent_attacks": {
          "attacks": list(COHERENT_ATTACKS),
          "cells": coherent_cells,
          "passed": not coherent_failures,
          "failures": coherent_failures,
      },
  }


def markdown_table(cells: list[dict], config: StudyConfig, checks: dict, runtime_s: float) -> str:
  """Rows = attack; benign error (geometric mean over fractions x noise) per method."""
  header = ["attack"] + list(METHODS) + ["CLAIR/oracle", "CLAIR F1", "CLAIR exact"]
  lines = [
      "| " + " | ".join(header) + " |",
      "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
  ]
  groups = list(config.attacks) + ["all"]
  for attack in groups:
    group = [c for c in cells if attack == "all" or c["attack"] == attack]
    if not group:
      continue
    row = [f"**{attack}**" if attack == "all" else attack]
    errors = {name: reporting.geometric_mean(c["methods"][name]["benign_error"] for c in group) for name in METHODS}
    best = min(errors[b] for b in METHODS if b != "oracle")
    for name in METHODS:
      text = reporting.format_number(errors[name])
      row.append(f"**{text}**" if name != "oracle" and errors[name] == best else text)
    row.append(
        reporting.format_number(reporting.geometric_mean(c["methods"]["clair"]["benign_error"] / c["methods"]["oracle"]["benign_error"]
                      for c in group))
    )
    row.append(reporting.format_number(_mean(c["methods"]["clair"]["f1"] for c in group)))
    row.append(reporting.format_number(_mean(c["methods"]["clair"]["exact"] for c in group)))
    lines.append("| " + " | ".join(row) + " |")
  exact = checks["clair_within_oracle_factor_when_exact"]
  coherent = checks["clair_below_baselines_under_coherent_attacks"]
  lines += [
      "",
      f"Benign-client error `mean_k ||D~_k - Delta_k||_F^2` (geometric mean over contamination "
      f"fractions {list(config.fractions)} x noise levels {list(config.noises)}, "
      f"{config.trials} trial(s) each; bold: best non-oracle method). K={config.num_clients}, "
      f"m={config.m}, n={config.n}, r={config.rank}, heterogeneity {config.heterogeneity}, "
      f"seed {config.seed}, setting `{config.setting}`. `krum` is multi-Krum told the true "
      f"number of attackers; "
      f"`trimmed_mean` trims the true fraction; `oracle` fits the subspace on the true benign "
      f"set. `inf`: NaN/Inf reached benign clients. CLAIR F1/exact: detection, averaged over "
      f"cells.",
      "",
      f"Checks: CLAIR within {ORACLE_FACTOR}x of the oracle in "
      f"{exact['exact_trials'] - len(exact['failures'])}/{exact['exact_trials']} trials with exact "
      f"detection; CLAIR below every baseline in "
      f"{coherent['cells'] - len(coherent['failures'])}/{coherent['cells']} coherent-attack cells "
      f"({', '.join(COHERENT_ATTACKS)}).{_failures_text(checks)} Generated by "
      f"`clair-jax synthetic` in {runtime_s:.0f} s ({jax.default_backend()}).",
  ]
  return "\n".join(lines)


def _failures_text(checks: dict) -> str:
  """Names the cells where a check fails (empty when both pass)."""
  parts = []
  exact = checks["clair_within_oracle_factor_when_exact"]["failures"]
  if exact:
    cells = sorted({(f["attack"], f["fraction"], f["noise"]) for f in exact})
    parts.append(
        f" Above {ORACLE_FACTOR}x the oracle despite exact detection: "
        + "; ".join(f"{a} fraction {fr:g} noise {no:g}" for a, fr, no in cells) + "."
    )
  coherent = checks["clair_below_baselines_under_coherent_attacks"]["failures"]
  if coherent:
    parts.append(
        " Not below every baseline: "
        + "; ".join(
            f"{f['attack']} fraction {f['fraction']:g} noise {f['noise']:g} "
            f"(beaten by or tied with {', '.join(f['not_below'])})"
            for f in coherent
        )
        + "."
    )
  return "".join(parts)


# --------------------------------------------------------------------------- plots


def plot_benign_error(cells: list[dict], config: StudyConfig, path: str) -> None:
  """One panel per attack: benign error (geometric mean over noise) vs contamination."""
  plt = reporting.pyplot()
  attacks = list(config.attacks)
  cols = min(4, len(attacks))
  rows = math.ceil(len(attacks) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
  for ax, attack in zip(axes.flat, attacks):
    infinite = []
    for name in METHODS:
      ys = []
      for fraction in config.fractions:
        group = [c for c in cells if c["attack"] == attack and c["fraction"] == fraction]
        ys.append(reporting.geometric_mean(c["methods"][name]["benign_error"] for c in group))
      ys = np.asarray(ys)
      if not np.all(np.isfinite(ys)):
        infinite.append(name)
      style = {"clair": dict(lw=2.5, color="k"), "oracle": dict(ls="--", color="gray")}
      ax.plot(config.fractions, np.where(np.isfinite(ys), ys, np.nan), marker="o", ms=3,
              label=name, **style.get(name, {}))
    ax.set_yscale("log")
    ax.set_title(attack + (f"\n(inf: {', '.join(infinite)})" if infinite else ""), fontsize=9)
    ax.set_xlabel("contaminated fraction")
    ax.set_ylabel("benign error")
  for ax in list(axes.flat)[len(attacks) :]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), fontsize=8)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_phase_diagram(phase: dict, path: str) -> None:
  """Heatmaps over fraction x separation: exact detection rate and CLAIR/oracle error."""
  plt = reporting.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  panels = [
      ("clair_exact", "CLAIR exact-recovery rate", "viridis", (0, 1)),
      ("clair_oracle_ratio", "CLAIR / oracle benign error", "magma_r", (1, None)),
  ]
  for ax, (key, title, cmap, (vmin, vmax)) in zip(axes, panels):
    values = np.asarray(phase[key], np.float64)
    image = ax.imshow(values, origin="lower", aspect="auto", cmap=cmap, vmin=vmin,
                      vmax=vmax if vmax is not None else max(np.nanmax(values), 1.2))
    ax.set_xticks(range(len(phase["separations"])), [f"{s:g}" for s in phase["separations"]])
    ax.set_yticks(range(len(phase["fractions"])), [f"{f:g}" for f in phase["fractions"]])
    ax.set_xlabel("separation  ||sin Theta(attack, U)||")
    ax.set_ylabel("contaminated fraction")
    ax.set_title(f"{title}\n(overlap attack, noise {phase['noise']:g})", fontsize=9)
    for (i, j), v in np.ndenumerate(values):
      ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w" if key ==
              "clair_exact" and v < 0.5 else "k")
    fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_client_scores(examples: list[tuple[str, Any, Any]], path: str) -> None:
  """Per-client CLAIR scores with the threshold, colored by the true contaminated set."""
  plt = reporting.pyplot()
  fig, axes = plt.subplots(1, len(examples), figsize=(4.2 * len(examples), 3.2), squeeze=False)
  for ax, (title, problem, result) in zip(axes.flat, examples):
    scores = np.asarray(result.scores, np.float64)
    truth = np.asarray(problem.contaminated)
    finite = np.isfinite(scores)
    top = np.max(scores[finite]) * 1.2 if finite.any() else 1.0
    shown = np.where(finite, scores, top)
    colors = np.where(truth, "tab:red", "tab:blue")
    ax.bar(np.arange(scores.size), shown, color=colors)
    ax.axhline(float(result.threshold), color="k", ls="--", lw=1, label="threshold")
    flagged = np.asarray(result.contaminated)
    ax.scatter(np.flatnonzero(flagged), shown[flagged] * 1.05, marker="v", color="k", s=12,
               label="flagged")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("client (red: truly contaminated)")
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def score_examples(config: StudyConfig, noise: float):
  """A few representative problems for the scores plot (attack, problem, CLAIR result)."""
  preferred = ["boosted", "sign_flip", "random", "coherent", "overlap", "sparse"]
  attacks = [a for a in preferred if a in config.attacks][:3] or ["random"]
  fraction = max([f for f in config.fractions if f <= 0.3] or [min(config.fractions)])
  base = jax.random.fold_in(jax.random.key(config.seed), 2_000_003)
  examples = []
  for i, attack in enumerate(attacks):
    problem = _problem(config, jax.random.fold_in(base, i), fraction=fraction, attack=attack,
                       noise=noise)
    result = clair_jax.clair(problem.updates, config.rank)
    examples.append((f"{attack}, fraction {fraction:g}, noise {noise:g}", problem, result))
  return examples


# --------------------------------------------------------------------------- README


def replace_between_markers(path: str, text: str, begin: str = TABLE_BEGIN,
                            end_marker: str = TABLE_END) -> None:
  """:func:`clair_jax._src.reporting.replace_between_markers`, this study's markers by
  default."""
  reporting.replace_between_markers(path, text, begin, end_marker)


# --------------------------------------------------------------------------- CLI


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _attacks(text: str) -> tuple[str, ...]:
  names = tuple(x.strip() for x in text.split(",") if x.strip())
  unknown = [a for a in names if a not in synthetic.ATTACKS]
  if unknown:
    raise argparse.ArgumentTypeError(
        f"unknown attack(s) {unknown}; choose from {synthetic.ATTACKS}"
    )
  return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Options of ``clair-jax synthetic``."""
  default = StudyConfig()
  parser.add_argument("--out", required=True, help="output directory (created)")
  parser.add_argument("--fractions", type=_floats, default=None,
                      help="contaminated fractions (default "
                      f"{','.join(map(str, default.fractions))})")
  parser.add_argument("--attacks", type=_attacks, nargs="+", default=None,
                      help="attacks, comma- or space-separated (default grid: "
                      f"{','.join(synthetic.MODEL_ATTACKS)}; --grid attacks: "
                      f"{','.join(synthetic.LITERATURE_ATTACKS + synthetic.ADAPTIVE_ATTACKS)}). "
                      "Naming a literature attack selects --grid attacks")
  parser.add_argument("--grid", choices=("synthetic", "attacks"), default="synthetic",
                      help="synthetic: fraction x attack x noise on one shape, plus the "
                      "detection phase diagram (default); attacks: the Byzantine-robust FL "
                      "literature's attacks over shapes x heterogeneity x fraction x seeds "
                      "(see clair_jax.studies.attacks_study)")
  parser.add_argument("--shapes", default=None,
                      help="--grid attacks: KxMxNxR items, comma-separated (default "
                      "40x64x16x4,30x96x24x6)")
  parser.add_argument("--heterogeneities", type=_floats, default=None,
                      help="--grid attacks: benign heterogeneities (default 0.05,0.5)")
  parser.add_argument("--seeds", type=_ints, default=None,
                      help="--grid attacks: seeds (default 0,1,2)")
  parser.add_argument("--attacker-noise", type=float, default=None,
                      help="--grid attacks: independent per-attacker noise, a fraction of "
                      "sigma (default 0: identical attackers)")
  parser.add_argument("--noise", type=_floats, default=None,
                      help=f"noise levels sigma (default {','.join(map(str, default.noises))})")
  parser.add_argument("--separations", type=_floats, default=None,
                      help="separations for the phase diagram (default "
                      f"{','.join(map(str, default.separations))})")
  parser.add_argument("--num-clients", type=int, default=None,
                      help=f"K (default {default.num_clients})")
  parser.add_argument("--m", type=int, default=None, help=f"rows m (default {default.m})")
  parser.add_argument("--n", type=int, default=None, help=f"columns n (default {default.n})")
  parser.add_argument("--rank", type=int, default=None, help=f"rank r (default {default.rank})")
  parser.add_argument("--heterogeneity", type=float, default=None,
                      help=f"heterogeneity inside the subspace (default {default.heterogeneity})")
  parser.add_argument("--trials", type=int, default=None,
                      help=f"trials per cell (default {default.trials})")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
  parser.add_argument("--setting", choices=("updates", "regression"), default="updates",
                      help="updates: Dhat_k = Delta_k + noise; regression: Dhat_k is the OLS "
                      "estimate from (X_k, Y_k) and --noise is the response noise std")
  parser.add_argument("--num-samples", type=int, default=None,
                      help="samples per client in the regression setting (default 2*m)")
  parser.add_argument("--quick", action="store_true", help="tiny grid (tests, smoke runs)")
  parser.add_argument("--readme", default=None,
                      help=f"file whose text between {TABLE_BEGIN} and {TABLE_END} (--grid "
                      "attacks: <!-- attacks-table:begin --> and <!-- attacks-table:end -->) "
                      "is replaced by the table")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _flatten_attacks(args: argparse.Namespace) -> None:
  """``--attacks a,b c`` -> ``("a", "b", "c")`` (in place; ``None`` stays ``None``)."""
  if args.attacks is not None and args.attacks and isinstance(args.attacks[0], tuple):
    args.attacks = tuple(a for group in args.attacks for a in group)


def uses_attacks_grid(args: argparse.Namespace) -> bool:
  """``--grid attacks``, or an attack outside the model attacks was named."""
  _flatten_attacks(args)
  if getattr(args, "grid", "synthetic") == "attacks":
    return True
  return bool(args.attacks) and any(a not in synthetic.MODEL_ATTACKS for a in args.attacks)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
  """Grid and sizes from the parsed options (``--quick`` first, explicit options override)."""
  _flatten_attacks(args)
  config = QUICK if args.quick else StudyConfig()
  overrides = {
      "fractions": args.fractions,
      "attacks": args.attacks,
      "noises": args.noise,
      "separations": args.separations,
      "num_clients": args.num_clients,
      "m": args.m,
      "n": args.n,
      "rank": args.rank,
      "heterogeneity": args.heterogeneity,
      "trials": args.trials,
      "seed": args.seed,
      "setting": args.setting,
      "num_samples": args.num_samples,
  }
  config = config._replace(**{k: v for k, v in overrides.items() if v is not None})
  if not config.fractions or not config.attacks or not config.noises or not config.separations:
    raise ValueError("fractions, attacks, noise levels and separations must be non-empty")
  if config.setting == "regression" and (config.num_samples or 2 * config.m) < config.m:
    raise ValueError(f"--num-samples must be >= m={config.m} for OLS")
  if config.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {config.trials}")
  return config


def run(args: argparse.Namespace) -> int:
  """Runs the study; returns the exit status (0 also when a check fails: it is reported)."""
  if uses_attacks_grid(args):
    from clair_jax.studies import attacks_study

    return attacks_study.run(args)
  try:
    config = config_from_args(args)
  except ValueError as e:
    print(f"clair-jax synthetic: {e}", file=sys.stderr)
    return 2
  if args.readme is not None and not os.path.exists(args.readme):
    print(f"clair-jax synthetic: --readme file {args.readme} does not exist", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  from tqdm.auto import tqdm

  start = time.perf_counter()
  num_cells = len(config.attacks) * len(config.fractions) * len(config.noises)
  num_phase = len(config.fractions) * len(config.separations)
  total = (num_cells + num_phase) * config.trials
  phase_noise = sorted(config.noises)[len(config.noises) // 2]
  with tqdm(total=total, desc="synthetic", unit="problem", disable=args.no_progress,
            file=sys.stderr) as progress:
    cells = run_grid(config, progress)
    phase = run_phase_diagram(config, phase_noise, progress)
  examples = score_examples(config, phase_noise)
  summary = summarise_methods(cells)
  checks = run_checks(cells)
  runtime = time.perf_counter() - start
  table = markdown_table(cells, config, checks, runtime)

  plot_benign_error(cells, config, os.path.join(args.out, "benign_error_vs_contamination.png"))
  plot_phase_diagram(phase, os.path.join(args.out, "detection_phase_diagram.png"))
  plot_client_scores(examples, os.path.join(args.out, "client_scores.png"))
  report = {
      "methods": summary,
      "grid": cells,
      "phase_diagram": phase,
      "checks": checks,
      "config": {
          **config._asdict(),
          "quick": bool(args.quick),
          "baseline_knowledge": "multi-Krum gets the true number of attackers; trimmed mean "
          "trims the true fraction; oracle gets the true benign set",
          "benign_error": "mean over benign clients of ||Dtilde_k - Delta_k||_F^2; cells "
          "average trials; null = non-finite",
          "subspace_error": "spectral ||sin Theta||",
      },
      "runtime_s": runtime,
      "environment": {
          "jax": jax.__version__,
          "backend": jax.default_backend(),
          "python": platform.python_version(),
          "clair_jax": clair_jax.__version__,
      },
  }
  reporting.write_json(os.path.join(args.out, "report.json"), report)
  with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  if args.readme is not None:
    try:
      replace_between_markers(args.readme, table)
    except ValueError as e:
      print(f"clair-jax synthetic: {e}", file=sys.stderr)
      return 2
    print(f"\nupdated the table in {args.readme}")
  print(f"\nwrote {args.out}/report.json, table.md and 3 plots in {runtime:.0f} s")
  return 0
