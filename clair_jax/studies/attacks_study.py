"""``clair-jax synthetic --grid attacks``: CLAIR against the Byzantine-robust FL literature.

For every attack of :data:`clair_jax.synthetic.LITERATURE_ATTACKS` and
:data:`~clair_jax.synthetic.ADAPTIVE_ATTACKS` (computed by :mod:`clair_jax.attacks` from the
benign clients' noisy updates, papers' defaults), every shape ``(K, m, n, r)``, benign
heterogeneity, contamination fraction and seed, one problem is drawn
(:func:`clair_jax.synthetic.make_problem`; every attack sees the same benign clients for a
given shape, heterogeneity, fraction and seed) and every method turns it into per-client
estimates: CLAIR (defaults: updates and rank only), the oracle (subspace fitted on the true
benign set) and the peers. The study records the benign-client error
``mean_{k benign} ||Dtilde_k - Delta_k||_F^2``, CLAIR's detection precision/recall and its
noise estimate over the true noise level. Besides the oracle, ``clair_given_benign`` (CLAIR's
own refine stage run on the true benign set, when :mod:`clair_jax.baselines` has it) is
reported: CLAIR over it isolates what detection costs, whatever the refine stage does.

Peers are given what they need to be at their best: multi-Krum and NNM + trimmed mean the
true number of attackers ``f``, the trimmed mean trims the true fraction (capped below 1/2),
centered clipping and bucketing (bucket size 2 in front of the geometric median) their
defaults.

A *cell* is ``(attack, shape, heterogeneity, fraction)`` with errors averaged over seeds.
The check asked of CLAIR in every cell: ``error <= 1.5 x oracle`` and ``error <=`` the best
peer's. The adaptive attacks are white-box: for each strength of a small grid the attacked
problem is built and CLAIR run; the strength with the largest CLAIR benign error is kept.

Outputs in ``--out``: ``report.json`` (``trials``, ``cells``, ``attacks`` summary, ``checks``,
``config``), ``table.md`` (table, check, failing cells) and ``attacks_vs_contamination.png``.
``--readme PATH`` replaces the text between :data:`TABLE_BEGIN` and :data:`TABLE_END`.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax
from clair_jax import baselines
from clair_jax import metrics
from clair_jax import synthetic
from clair_jax._src import reporting

TABLE_BEGIN = "<!-- attacks-table:begin -->"
TABLE_END = "<!-- attacks-table:end -->"

ORACLE_FACTOR = 1.5
# Every aggregator CLAIR is compared with; the last three come from baselines.py and are
# used when present (hasattr), so the study runs while they are being written.
PEERS = ("local", "fedavg", "median", "trimmed_mean", "krum", "geometric_median",
         "nnm_trimmed_mean", "centered_clipping", "bucketing")
OPTIONAL_PEERS = ("nnm_trimmed_mean", "centered_clipping", "bucketing")
# References that know the true benign set: the oracle (projection onto the subspace fitted
# on it) and, when baselines.py has it, CLAIR's own refine stage given it (isolates detection).
REFERENCES = ("oracle", "clair_given_benign")
SHORT_NAMES = {"trimmed_mean": "trimmed", "geometric_median": "geomed",
               "nnm_trimmed_mean": "nnm+tm", "centered_clipping": "cclip",
               "bucketing": "bucket"}

Shape = tuple[int, int, int, int]


class AttacksConfig(NamedTuple):
  """Grid of the attacks study.

  ``shapes`` are ``(K, m, n, r)``; ``noise`` is the per-entry noise std (signal entries have
  unit variance; ``sigma = 1`` puts the local error at ~``m / r`` times the oracle's).
  ``attacker_noise`` is a fraction of ``noise`` (0: identical attackers).
  """

  shapes: tuple[Shape, ...] = ((40, 64, 16, 4), (30, 96, 24, 6))
  heterogeneities: tuple[float, ...] = (0.05, 0.5)
  fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
  seeds: tuple[int, ...] = (0, 1, 2)
  noise: float = 1.0
  attacks: tuple[str, ...] = synthetic.LITERATURE_ATTACKS + synthetic.ADAPTIVE_ATTACKS
  attacker_noise: float = 0.0


QUICK = AttacksConfig(
    shapes=((16, 24, 6, 2),),
    heterogeneities=(0.5,),
    fractions=(0.25,),
    seeds=(0,),
    attacks=("alie", "min_max_std", "opt_alie", "tilt", "adaptive_tilt"),
)


def available_peers() -> tuple[str, ...]:
  """:data:`PEERS` present in :mod:`clair_jax.baselines` (the optional ones when written)."""
  return tuple(p for p in PEERS if p not in OPTIONAL_PEERS or hasattr(baselines, p))


def shape_name(shape: Shape) -> str:
  return "K{}m{}n{}r{}".format(*shape)


# --------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("rank", "num_byzantine", "peers"))
def _peer_estimates(updates, contaminated, key, *, rank, num_byzantine, peers):
  """``{name: estimates}`` for every peer and the oracle (one compile per size and ``f``)."""
  num_clients = updates.shape[0]
  trim = min(num_byzantine / num_clients, 0.49)
  rules = {
      "local": lambda: baselines.local(updates),
      "fedavg": lambda: baselines.fedavg(updates),
      "median": lambda: baselines.coordinate_median(updates),
      "trimmed_mean": lambda: baselines.trimmed_mean(updates, trim),
      "krum": lambda: baselines.multi_krum(updates, num_byzantine),
      "geometric_median": lambda: baselines.geometric_median(updates),
      "nnm_trimmed_mean": lambda: baselines.nnm_trimmed_mean(updates, num_byzantine),
      "centered_clipping": lambda: baselines.centered_clipping(updates),
      "bucketing": lambda: baselines.bucketing(updates, key=key),
  }
  out = {name: rules[name]()[0] for name in peers}
  oracle = baselines.oracle(updates, ~contaminated, rank)
  out["oracle"] = oracle.estimates
  if hasattr(baselines, "clair_given_benign"):
    out["clair_given_benign"] = baselines.clair_given_benign(updates, ~contaminated, rank)[0]
  return out, oracle.subspace


def clair_benign_error(problem: synthetic.SyntheticProblem, rank: int) -> float:
  """CLAIR's benign error on ``problem`` (the adaptive attacks' objective)."""
  result = clair_jax.clair(problem.updates, rank)
  return float(metrics.benign_error(result.refined, problem.truth, ~problem.contaminated))


def evaluate_problem(problem: synthetic.SyntheticProblem, rank: int, key, peers=None) -> dict:
  """Every method on one problem: benign errors, CLAIR's detection and noise estimate."""
  peers = available_peers() if peers is None else tuple(peers)
  contaminated = problem.contaminated
  num_bad = int(jnp.sum(contaminated))
  estimates, oracle_subspace = _peer_estimates(
      problem.updates, contaminated, key, rank=rank, num_byzantine=num_bad, peers=peers
  )
  result = clair_jax.clair(problem.updates, rank)
  estimates["clair"] = result.refined
  benign = ~contaminated
  errors = {name: float(metrics.benign_error(est, problem.truth, benign))
            for name, est in estimates.items()}
  detection = metrics.detection_metrics(result.contaminated, contaminated)
  return {
      "errors": errors,
      "clair": {
          **{k: float(v) for k, v in detection._asdict().items()},
          "noise_ratio": float(result.noise_level) / problem.noise if problem.noise else None,
          "subspace_error": float(metrics.subspace_error(result.subspace, problem.subspace)),
          "flagged": int(jnp.sum(result.contaminated)),
      },
      "oracle_subspace_error": float(metrics.subspace_error(oracle_subspace, problem.subspace)),
  }


def problem_key(config: AttacksConfig, seed: int, shape_index: int, het_index: int,
                fraction_index: int):
  """Same key for every attack of a (seed, shape, heterogeneity, fraction): paired draws."""
  key = jax.random.key(seed)
  for index in (shape_index, het_index, fraction_index):
    key = jax.random.fold_in(key, index)
  return key


def run_trials(config: AttacksConfig, progress=None) -> list[dict]:
  """One record per (attack, shape, heterogeneity, fraction, seed)."""
  peers = available_peers()
  trials = []
  for attack in config.attacks:
    for s, shape in enumerate(config.shapes):
      num_clients, m, n, rank = shape
      for h, heterogeneity in enumerate(config.heterogeneities):
        for f, fraction in enumerate(config.fractions):
          for seed in config.seeds:
            key = problem_key(config, seed, s, h, f)
            made = synthetic.make_attacked_problem(
                key, num_clients=num_clients, m=m, n=n, rank=rank, fraction=fraction,
                attack=attack, noise=config.noise, heterogeneity=heterogeneity,
                attacker_noise=config.attacker_noise,
                objective=functools.partial(clair_benign_error, rank=rank)
                if attack in synthetic.ADAPTIVE_ATTACKS else None,
            )
            record = evaluate_problem(made.problem, rank, jax.random.fold_in(key, 7), peers)
            record.update({
                "attack": attack, "shape": list(shape), "heterogeneity": heterogeneity,
                "fraction": fraction, "seed": seed, "strength": made.strength,
                "num_contaminated": int(round(fraction * num_clients)),
            })
            trials.append(record)
            if progress is not None:
              progress.update(1)
  return trials


# --------------------------------------------------------------------------- summaries


def _ratio(a: float, b: float) -> float:
  if not (math.isfinite(a) and math.isfinite(b)):
    return float("inf")
  return a / b if b > 0 else float("inf")


def summarise_cells(trials: list[dict]) -> list[dict]:
  """Groups trials by (attack, shape, heterogeneity, fraction); errors averaged over seeds."""
  groups: dict[tuple, list[dict]] = {}
  for t in trials:
    groups.setdefault((t["attack"], tuple(t["shape"]), t["heterogeneity"], t["fraction"]),
                      []).append(t)
  cells = []
  for (attack, shape, heterogeneity, fraction), group in groups.items():
    methods = group[0]["errors"].keys()
    errors = {name: float(np.mean([t["errors"][name] for t in group])) for name in methods}
    peers = [p for p in methods if p != "clair" and p not in REFERENCES]
    best_peer = min(peers, key=lambda p: errors[p])
    clair, oracle = errors["clair"], errors["oracle"]
    ratio = _ratio(clair, oracle)
    cells.append({
        "attack": attack, "shape": list(shape), "heterogeneity": heterogeneity,
        "fraction": fraction, "errors": errors,
        "clair_over_oracle": ratio,
        "clair_over_given_benign": _ratio(clair, errors["clair_given_benign"])
        if "clair_given_benign" in errors else None,
        "clair_over_oracle_worst_seed": max(
            _ratio(t["errors"]["clair"], t["errors"]["oracle"]) for t in group),
        "local_over_oracle": _ratio(errors["local"], oracle),
        "best_peer": best_peer, "best_peer_error": errors[best_peer],
        "precision": float(np.mean([t["clair"]["precision"] for t in group])),
        "recall": float(np.mean([t["clair"]["recall"] for t in group])),
        "noise_ratio": float(np.mean([t["clair"]["noise_ratio"] for t in group])),
        "strengths": [t["strength"] for t in group],
        "within_oracle": ratio <= ORACLE_FACTOR,
        "at_most_best_peer": clair <= errors[best_peer],
        "passed": ratio <= ORACLE_FACTOR and clair <= errors[best_peer],
        "seeds": [t["seed"] for t in group],
    })
  return cells


def cell_name(cell: dict) -> str:
  return (f"{shape_name(cell['shape'])}/h{cell['heterogeneity']:g}/"
          f"{100 * cell['fraction']:.0f}%")


def summarise_attacks(cells: list[dict], attacks) -> dict:
  """Per attack: CLAIR/oracle mean and worst cell, detection, peers/oracle, failing cells."""
  summary = {}
  for attack in list(attacks) + ["all"]:
    group = [c for c in cells if attack == "all" or c["attack"] == attack]
    if not group:
      continue
    ratios = [c["clair_over_oracle"] for c in group]
    worst = max(group, key=lambda c: c["clair_over_oracle"])
    peers = [p for p in group[0]["errors"] if p != "clair" and p not in REFERENCES]
    given = [c["clair_over_given_benign"] for c in group]
    summary[attack] = {
        "clair_over_given_benign_mean": float(np.mean(given)) if None not in given else None,
        "clair_over_given_benign_worst": float(max(given)) if None not in given else None,
        "clair_over_oracle_mean": float(np.mean(ratios)),
        "clair_over_oracle_worst": worst["clair_over_oracle"],
        "worst_cell": cell_name(worst) if attack != "all" else
        f"{worst['attack']} {cell_name(worst)}",
        "precision": float(np.mean([c["precision"] for c in group])),
        "recall": float(np.mean([c["recall"] for c in group])),
        "noise_ratio_min": float(min(c["noise_ratio"] for c in group)),
        "peers_over_oracle": {
            p: reporting.geometric_mean(_ratio(c["errors"][p], c["errors"]["oracle"]) for c in group)
            for p in peers
        },
        "num_cells": len(group),
        "failing_cells": [cell_name(c) if attack != "all" else f"{c['attack']} {cell_name(c)}"
                          for c in group if not c["passed"]],
    }
  return summary


def run_checks(cells: list[dict]) -> dict:
  failing = [c for c in cells if not c["passed"]]
  return {
      "clair_within_oracle_and_best_peer": {
          "oracle_factor": ORACLE_FACTOR,
          "cells": len(cells),
          "passed": not failing,
          "failures": [
              {"attack": c["attack"], "cell": cell_name(c),
               "clair_over_oracle": c["clair_over_oracle"],
               "best_peer": c["best_peer"],
               "clair_over_best_peer": _ratio(c["errors"]["clair"], c["best_peer_error"])}
              for c in failing
          ],
      },
      "noise_regime": {
          "min_local_over_oracle": float(min(c["local_over_oracle"] for c in cells)),
          "passed": bool(min(c["local_over_oracle"] for c in cells) >= 10.0),
      },
  }


def markdown_table(summary: dict, config: AttacksConfig, checks: dict, runtime_s: float,
                   peers, *, list_failures: bool = True, env: dict | None = None) -> str:
  """Rows = attacks; CLAIR/oracle (mean, worst), detection, peers/oracle, failing cells.

  ``env`` is the run's :func:`clair_jax._src.reporting.environment` (read when ``None``)
  for the closing runtime note.
  """
  given = next(iter(summary.values()))["clair_over_given_benign_mean"] is not None
  header = (["attack", "CLAIR/oracle", "worst"] + (["CLAIR/given", "worst"] if given else [])
            + ["precision", "recall"] + [SHORT_NAMES.get(p, p) for p in peers] + ["failing"])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for attack, entry in summary.items():
    best = min(entry["peers_over_oracle"][p] for p in peers)
    row = [f"**{attack}**" if attack == "all" else attack,
           reporting.format_number(entry["clair_over_oracle_mean"]),
           reporting.format_number(entry["clair_over_oracle_worst"])]
    if given:
      row += [reporting.format_number(entry["clair_over_given_benign_mean"]),
              reporting.format_number(entry["clair_over_given_benign_worst"])]
    row += [reporting.format_number(entry["precision"]), reporting.format_number(entry["recall"])]
    for p in peers:
      text = reporting.format_number(entry["peers_over_oracle"][p])
      row.append(f"**{text}**" if entry["peers_over_oracle"][p] == best else text)
    row.append(f"{len(entry['failing_cells'])}/{entry['num_cells']}")
    lines.append("| " + " | ".join(row) + " |")
  check = checks["clair_within_oracle_and_best_peer"]
  noise = checks["noise_regime"]
  shapes = ", ".join(shape_name(s) for s in config.shapes)
  lines += [
      "",
      f"Benign-client error over the oracle's. CLAIR/oracle: mean over cells and worst cell "
      f"(a cell = attack x shape x heterogeneity x fraction, errors averaged over "
      f"{len(config.seeds)} seed(s)); "
      + ("CLAIR/given: over CLAIR's own refine stage given the true benign set "
         "(isolates detection); " if given else "")
      + f"precision/recall: CLAIR's detection; peer columns: "
      f"geometric mean over cells of peer/oracle (bold: best peer). Shapes {shapes}; "
      f"heterogeneity {list(config.heterogeneities)}; fractions {list(config.fractions)}; "
      f"noise sigma {config.noise:g} (local/oracle >= {noise['min_local_over_oracle']:.1f} in "
      f"every cell); attacker noise {config.attacker_noise:g} sigma. `krum` (multi-Krum) and "
      f"`nnm+tm` know the true number of attackers, `trimmed` trims the true fraction.",
      "",
      f"Check (CLAIR <= {ORACLE_FACTOR}x oracle and <= best peer, every cell): "
      f"{check['cells'] - len(check['failures'])}/{check['cells']} cells pass. "
      f"Worst cell: {summary['all']['worst_cell']} "
      f"(CLAIR/oracle {reporting.format_number(summary['all']['clair_over_oracle_worst'])}). Generated by "
      f"`clair-jax synthetic --grid attacks` in {reporting.runtime_text(runtime_s, env)}.",
  ]
  if list_failures and check["failures"]:
    lines += ["", "Failing cells (shape/heterogeneity/fraction):", ""]
    for attack, entry in summary.items():
      if attack != "all" and entry["failing_cells"]:
        lines.append(f"- {attack}: " + ", ".join(entry["failing_cells"]))
  return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot_ratios(cells: list[dict], config: AttacksConfig, peers, path: str) -> None:
  """One panel per attack: error / oracle vs contamination (geometric mean over the rest)."""
  plt = reporting.pyplot()
  attacks = list(config.attacks)
  cols = min(5, len(attacks))
  rows = math.ceil(len(attacks) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
  for ax, attack in zip(axes.flat, attacks):
    for name in ("clair",) + tuple(peers):
      ys = []
      for fraction in config.fractions:
        group = [c for c in cells if c["attack"] == attack and c["fraction"] == fraction]
        ys.append(reporting.geometric_mean(_ratio(c["errors"][name], c["errors"]["oracle"])
                                  for c in group))
      ys = np.asarray(ys, np.float64)
      style = dict(lw=2.5, color="k") if name == "clair" else dict(lw=1)
      ax.plot(config.fractions, np.where(np.isfinite(ys), ys, np.nan), marker="o", ms=3,
              label=name, **style)
    ax.axhline(ORACLE_FACTOR, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_title(attack, fontsize=9)
    ax.set_xlabel("contaminated fraction", fontsize=8)
    ax.set_ylabel("error / oracle", fontsize=8)
  for ax in list(axes.flat)[len(attacks):]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 10), fontsize=8)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _shapes(text: str) -> tuple[Shape, ...]:
  shapes = []
  for item in text.split(","):
    item = item.strip()
    if not item:
      continue
    parts = item.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
      raise ValueError(f"--shapes expects KxMxNxR items, e.g. 40x64x16x4, got {item!r}")
    shape = tuple(int(p) for p in parts)
    if min(shape) < 1 or 2 * shape[3] > shape[1]:
      raise ValueError(f"--shapes: need positive sizes and 2*r <= m, got {item!r}")
    shapes.append(shape)
  return tuple(shapes)


def config_from_args(args) -> AttacksConfig:
  """The attacks grid from the parsed ``clair-jax synthetic`` options."""
  config = QUICK if args.quick else AttacksConfig()
  overrides = {
      "shapes": _shapes(args.shapes) if args.shapes else None,
      "heterogeneities": args.heterogeneities,
      "fractions": args.fractions,
      "seeds": tuple(int(s) for s in args.seeds) if args.seeds is not None else None,
      "noise": args.noise[0] if args.noise else None,
      "attacks": args.attacks,
      "attacker_noise": args.attacker_noise,
  }
  if config.seeds and args.seeds is None and args.trials is not None:
    overrides["seeds"] = tuple(range(args.seed, args.seed + args.trials))
  if args.heterogeneities is None and args.heterogeneity is not None:
    overrides["heterogeneities"] = (args.heterogeneity,)
  sizes = {"--num-clients": args.num_clients, "--m": args.m, "--n": args.n, "--rank": args.rank}
  if any(v is not None for v in sizes.values()):
    raise ValueError("--grid attacks takes its sizes from --shapes KxMxNxR, not "
                     + ", ".join(k for k, v in sizes.items() if v is not None))
  if args.setting != "updates":
    raise ValueError("--grid attacks runs the updates setting only")
  if args.noise and len(args.noise) > 1:
    raise ValueError("--grid attacks takes one --noise level")
  config = config._replace(**{k: v for k, v in overrides.items() if v is not None})
  if not (config.shapes and config.heterogeneities and config.fractions and config.seeds
          and config.attacks):
    raise ValueError("shapes, heterogeneities, fractions, seeds and attacks must be non-empty")
  if any(not 0 < f < 0.5 for f in config.fractions):
    raise ValueError(f"--grid attacks needs fractions in (0, 0.5), got {config.fractions}")
  if config.noise <= 0 or config.attacker_noise < 0:
    raise ValueError("--noise must be > 0 and --attacker-noise >= 0")
  return config


def run(args) -> int:
  """Runs the attacks grid; returns the exit status (0 also when the check fails)."""
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

  peers = available_peers()
  missing = [p for p in PEERS if p not in peers]
  if missing:
    print(f"clair-jax synthetic: peers not in clair_jax.baselines yet, skipped: {missing}",
          file=sys.stderr)
  start = time.perf_counter()
  total = (len(config.attacks) * len(config.shapes) * len(config.heterogeneities)
           * len(config.fractions) * len(config.seeds))
  with tqdm(total=total, desc="attacks", unit="problem", disable=args.no_progress,
            file=sys.stderr) as progress:
    trials = run_trials(config, progress)
  cells = summarise_cells(trials)
  summary = summarise_attacks(cells, config.attacks)
  checks = run_checks(cells)
  runtime = time.perf_counter() - start
  env = reporting.environment()
  table = markdown_table(summary, config, checks, runtime, peers, env=env)
  plot_ratios(cells, config, peers, os.path.join(args.out, "attacks_vs_contamination.png"))
  report = {
      "attacks": summary,
      "cells": cells,
      "trials": trials,
      "checks": checks,
      "config": {
          **config._asdict(),
          "quick": bool(args.quick),
          "peers": list(peers),
          "peer_knowledge": "multi-Krum and NNM+trimmed mean get the true number of attackers; "
          "trimmed mean trims the true fraction; oracle gets the true benign set",
          "benign_error": "mean over benign clients of ||Dtilde_k - Delta_k||_F^2",
          "attacker_noise": "fraction of the benign noise level sigma",
      },
      "runtime_s": runtime,
      "environment": env,
  }
  reporting.write_json(os.path.join(args.out, "report.json"), report)
  with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  if args.readme is not None:
    try:
      reporting.replace_between_markers(
          args.readme, markdown_table(summary, config, checks, runtime, peers,
                                      list_failures=False, env=env),
          TABLE_BEGIN, TABLE_END,
      )
    except ValueError as e:
      print(f"clair-jax synthetic: {e}", file=sys.stderr)
      return 2
    print(f"\nupdated the attacks table in {args.readme}")
  print(f"\nwrote {args.out}/report.json, table.md and attacks_vs_contamination.png in "
        f"{runtime:.0f} s")
  return 0
