"""``clair-jax heterogeneity``: the refine across benign heterogeneity, against its references.

For every cell (benign set x shape x noise x contaminated fraction x heterogeneity ``h``)
and seed, :func:`clair_jax.synthetic.make_problem` draws client updates (random attack)
and the study records the benign-client error ``mean_{k benign} ||Dtilde_k - Delta_k||_F^2``
of

- ``auto``: :func:`clair_jax._src.refine.refine_updates` with ``strength="auto"`` on the
  benign set of the row (``true``: the true one; ``detected``: CLAIR's detection at the true
  rank; ``perturbed``: the true set with one attacker kept and one benign client dropped,
  a detection mistake each way),

and of the references, all given the truth they need to be at their best:

- ``projection``: ``U U^T D_k``, ``U`` the top-``r`` subspace of the true benign set,
- ``pooled``: ``U U^T mean_B D_k`` (the pooled in-subspace mean on the true benign set),
- the global rules of :mod:`clair_jax.baselines`: ``fedavg`` over the true benign set,
  ``median``, ``trimmed_mean`` (trimming the true fraction), ``multi_krum`` (the true
  number of attackers) and ``geometric_median`` over all clients,

plus ``local`` (each client's own update) for scale. Every method is scored on the same
clients: the true benign clients that the row's benign set keeps (a benign client the set
drops is returned as sent, by contract; that is detection's error, reported as the
detection F1 of the row, not the refine's). The table gives, per cell, the ratio of
``auto``'s error (mean over seeds) to the best reference's, and the worst cell; the plot
shows the error against ``h`` per method. Outputs in ``--out``: ``report.json``,
``table.md`` and ``heterogeneity_error.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import baselines
from clair_jax import metrics
from clair_jax import synthetic
from clair_jax._src import reporting
from clair_jax._src.refine import refine_updates

REFERENCES = ("projection", "pooled", "fedavg", "median", "trimmed_mean", "multi_krum",
              "geometric_median")
METHODS = ("auto",) + REFERENCES + ("local",)
BENIGN_SETS = ("true", "detected", "perturbed")
TARGET_RATIO = 1.1


class StudyConfig(NamedTuple):
  """Grid of one study run. ``shapes`` are ``(K, m, n, r)``."""

  shapes: tuple[tuple[int, int, int, int], ...] = ((30, 64, 16, 4), (40, 96, 24, 6))
  heterogeneities: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
  noises: tuple[float, ...] = (0.3, 1.0)
  fractions: tuple[float, ...] = (0.0, 0.25)
  benign_sets: tuple[str, ...] = ("true", "detected", "perturbed")
  seeds: int = 3
  seed: int = 0
  attack: str = "random"


QUICK = StudyConfig(
    shapes=((12, 16, 4, 2),),
    heterogeneities=(0.0, 0.5, 1.0),
    noises=(0.5,),
    fractions=(0.0, 0.25),
    benign_sets=("true", "perturbed"),
    seeds=1,
)


# --------------------------------------------------------------------------- evaluation


def _errors(updates, truth, true_benign, benign, num_bad, trim, *, rank):
  """Benign error of every method (jitted once per shape)."""
  oracle = baselines.oracle(updates, true_benign, rank)
  u = oracle.subspace
  weights = true_benign.astype(updates.dtype)
  safe = jnp.where(true_benign[:, None, None], updates, 0.0)
  benign_mean = jnp.einsum("k,kmn->mn", weights, safe) / jnp.sum(weights)

  def broadcast(x):
    return jnp.broadcast_to(x[None], updates.shape)

  refinement = refine_updates(updates, benign)
  estimates = {
      "auto": refinement.refined,
      "projection": oracle.estimates,
      "pooled": broadcast(u @ (u.T @ benign_mean)),
      "fedavg": broadcast(benign_mean),
      "median": baselines.coordinate_median(updates).estimates,
      "trimmed_mean": baselines.trimmed_mean(updates, trim).estimates,
      "multi_krum": baselines.multi_krum(updates, num_bad).estimates,
      "geometric_median": baselines.geometric_median(updates).estimates,
      "local": updates,
  }
  # Scored on the true benign clients the set kept: a benign client the set drops gets its
  # update back as sent (the refine's contract), which is detection's error, not the refine's.
  scored = true_benign & benign
  errors = {k: metrics.benign_error(v, truth, scored) for k, v in estimates.items()}
  used = refinement.rank
  strength = jnp.sum(refinement.strength) / jnp.maximum(used, 1)
  return errors, used, strength


_errors_jit = jax.jit(_errors, static_argnames=("rank",))


def benign_set(kind: str, problem: synthetic.SyntheticProblem, rank: int) -> jax.Array:
  """The benign set handed to the refine: ``true``, ``detected`` or ``perturbed``."""
  true_benign = ~problem.contaminated
  if kind == "true":
    return true_benign
  if kind == "detected":
    import clair_jax  # the estimator is only needed here

    return ~clair_jax.clair(problem.updates, rank).contaminated
  if kind == "perturbed":
    flags = np.asarray(true_benign).copy()
    bad = np.flatnonzero(~flags)
    good = np.flatnonzero(flags)
    if bad.size:
      flags[bad[0]] = True   # an attacker slips through
    flags[good[0]] = False   # a benign client is flagged
    return jnp.asarray(flags)
  raise ValueError(f"benign set must be one of {BENIGN_SETS}; got {kind!r}")


def run_grid(config: StudyConfig, progress=None) -> list[dict]:
  """Every cell of the grid, errors averaged over seeds (per-seed values kept)."""
  cells = []
  for kind in config.benign_sets:
    for shape in config.shapes:
      num_clients, m, n, rank = shape
      for noise in config.noises:
        for fraction in config.fractions:
          for h in config.heterogeneities:
            per_seed = {name: [] for name in METHODS}
            ranks, strengths, f1s = [], [], []
            for trial in range(config.seeds):
              key = jax.random.fold_in(jax.random.key(config.seed), trial)
              problem = synthetic.make_problem(
                  key, num_clients=num_clients, m=m, n=n, rank=rank, fraction=fraction,
                  attack=config.attack, noise=noise, heterogeneity=h)
              num_bad = int(jnp.sum(problem.contaminated))
              trim = min(num_bad / num_clients, 0.49)
              benign = benign_set(kind, problem, rank)
              f1s.append(float(metrics.detection_metrics(~benign, problem.contaminated).f1))
              errors, used, strength = _errors_jit(
                  problem.updates, problem.truth, ~problem.contaminated, benign, num_bad,
                  trim, rank=rank)
              for name in METHODS:
                per_seed[name].append(float(errors[name]))
              ranks.append(int(used))
              strengths.append(float(strength))
              if progress is not None:
                progress.update(1)
            mean = {name: float(np.mean(v)) for name, v in per_seed.items()}
            best = min(REFERENCES, key=lambda name: mean[name])
            seed_ratios = [
                per_seed["auto"][i] / min(per_seed[r][i] for r in REFERENCES)
                for i in range(config.seeds)
            ]
            cells.append({
                "benign_set": kind, "shape": list(shape), "noise": noise,
                "fraction": fraction, "heterogeneity": h, "errors": mean,
                "errors_per_seed": per_seed, "best_reference": best,
                "ratio": mean["auto"] / mean[best], "worst_seed_ratio": max(seed_ratios),
                "auto_rank": ranks, "auto_mean_strength": strengths,
                "detection_f1": f1s,
            })
  return cells


# --------------------------------------------------------------------------- reporting


def _shape_text(shape) -> str:
  k, m, n, r = shape
  return f"K={k} m={m} n={n} r={r}"


def markdown_table(cells: list[dict], config: StudyConfig, runtime: float,
                   env: dict | None = None) -> str:
  """Ratio auto / best reference per cell (columns: heterogeneity), and the worst cell.

  ``env`` is the run's :func:`clair_jax._src.reporting.environment` (read when ``None``)
  for the closing runtime note.
  """
  hs = config.heterogeneities
  head = ("| benign set | shape | sigma | fraction | "
          + " | ".join(f"h={h:g}" for h in hs) + " |")
  lines = [head, "|" + "---|" * (4 + len(hs))]
  rows: dict[tuple, dict] = {}
  for cell in cells:
    key = (cell["benign_set"], tuple(cell["shape"]), cell["noise"], cell["fraction"])
    rows.setdefault(key, {})[cell["heterogeneity"]] = cell
  for (kind, shape, noise, fraction), by_h in rows.items():
    entries = []
    for h in hs:
      cell = by_h[h]
      mark = "**" if cell["ratio"] > TARGET_RATIO else ""
      entries.append(f"{mark}{cell['ratio']:.3f}{mark}")
    lines.append(f"| {kind} | {_shape_text(shape)} | {noise:g} | {fraction:g} | "
                 + " | ".join(entries) + " |")
  worst = max(cells, key=lambda c: c["ratio"])
  worst_seed = max(cells, key=lambda c: c["worst_seed_ratio"])
  lines += [
      "",
      f"Entries: benign error of `refine_updates(strength=\"auto\")` (mean over {config.seeds} "
      f"seeds) divided by the best of {', '.join(REFERENCES)} (bold: above "
      f"{TARGET_RATIO}). Attack: {config.attack}.",
      f"Worst cell: {worst['ratio']:.3f} ({worst['benign_set']}, "
      f"{_shape_text(worst['shape'])}, sigma={worst['noise']:g}, "
      f"fraction={worst['fraction']:g}, h={worst['heterogeneity']:g}; best reference "
      f"{worst['best_reference']}). Worst single seed: {worst_seed['worst_seed_ratio']:.3f}.",
      f"Cells within {TARGET_RATIO}x: "
      f"{sum(c['ratio'] <= TARGET_RATIO for c in cells)}/{len(cells)}. "
      f"Runtime {reporting.runtime_text(runtime, env, host=True)}.",
  ]
  return "\n".join(lines)


def plot_errors(cells: list[dict], config: StudyConfig, path: str,
                kind: str | None = None) -> None:
  """Benign error vs heterogeneity per method, one panel per (shape, sigma, fraction)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kind = kind or config.benign_sets[0]
  panels = [(s, z, f) for s in config.shapes for z in config.noises for f in config.fractions]
  cols = len(config.fractions)
  rows = len(panels) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.3 * rows), squeeze=False)
  styles = {"auto": dict(color="k", lw=2.5, marker="o"),
            "projection": dict(color="tab:blue", marker="s"),
            "pooled": dict(color="tab:green", marker="^"),
            "local": dict(color="tab:gray", ls=":")}
  for ax, (shape, noise, fraction) in zip(axes.ravel(), panels):
    sel = sorted((c for c in cells if c["benign_set"] == kind and tuple(c["shape"]) == shape
                  and c["noise"] == noise and c["fraction"] == fraction),
                 key=lambda c: c["heterogeneity"])
    hs = [c["heterogeneity"] for c in sel]
    for name in METHODS:
      style = styles.get(name, dict(lw=1, ls="--", alpha=0.7))
      ax.plot(hs, [c["errors"][name] for c in sel], label=name, **style)
    ax.set_yscale("log")
    ax.set_title(f"{_shape_text(shape)}, sigma={noise:g}, frac={fraction:g}", fontsize=9)
    ax.set_xlabel("heterogeneity h")
    ax.set_ylabel("benign error")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"benign error vs heterogeneity (benign set: {kind})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------- CLI


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


def _shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
  out = []
  for item in text.split(";"):
    parts = tuple(int(x) for x in item.split(",") if x)
    if len(parts) != 4:
      raise argparse.ArgumentTypeError(f"shape must be K,m,n,r; got {item!r}")
    out.append(parts)
  return tuple(out)


TABLE_BEGIN = "<!-- heterogeneity-table:begin -->"
TABLE_END = "<!-- heterogeneity-table:end -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Options of ``clair-jax heterogeneity``."""
  default = StudyConfig()
  parser.add_argument("--out", required=True, help="output directory (created)")
  parser.add_argument("--shapes", type=_shapes, default=None,
                      help="';'-separated K,m,n,r (default "
                      f"{';'.join(','.join(map(str, s)) for s in default.shapes)})")
  parser.add_argument("--heterogeneity", type=_floats, default=None,
                      help="h values (default "
                      f"{','.join(map(str, default.heterogeneities))})")
  parser.add_argument("--noise", type=_floats, default=None,
                      help=f"noise levels (default {','.join(map(str, default.noises))})")
  parser.add_argument("--fractions", type=_floats, default=None,
                      help="contaminated fractions (default "
                      f"{','.join(map(str, default.fractions))})")
  parser.add_argument("--benign-sets", default=None,
                      help=f"comma-separated of {','.join(BENIGN_SETS)} (default all)")
  parser.add_argument("--attack", default=None, choices=synthetic.ATTACKS,
                      help="attack (default random)")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3)")
  parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
  parser.add_argument("--quick", action="store_true", help="tiny grid (tests, smoke runs)")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  parser.add_argument("--readme", default=None,
                      help=f"file whose text between {TABLE_BEGIN} and {TABLE_END} is "
                      "replaced by the table")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
  """Grid from the parsed options (``--quick`` first, explicit options override)."""
  config = QUICK if args.quick else StudyConfig()
  overrides = {
      "shapes": args.shapes, "heterogeneities": args.heterogeneity, "noises": args.noise,
      "fractions": args.fractions, "seeds": args.seeds, "attack": args.attack,
      "benign_sets": None if args.benign_sets is None else tuple(
          x for x in args.benign_sets.split(",") if x),
  }
  config = config._replace(**{k: v for k, v in overrides.items() if v is not None},
                           seed=args.seed)
  for kind in config.benign_sets:
    if kind not in BENIGN_SETS:
      raise ValueError(f"benign sets must be among {BENIGN_SETS}; got {kind!r}")
  if config.seeds < 1:
    raise ValueError(f"--seeds must be >= 1; got {config.seeds}")
  for h in config.heterogeneities:
    if not 0.0 <= h <= 1.0:
      raise ValueError(f"heterogeneity must be in [0, 1]; got {h}")
  return config


def run(args: argparse.Namespace) -> int:
  """Runs the study, prints the table, writes report, table and plot; returns 0 (2: bad args)."""
  try:
    config = config_from_args(args)
  except ValueError as e:
    print(f"clair-jax heterogeneity: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  from tqdm.auto import tqdm

  total = (len(config.benign_sets) * len(config.shapes) * len(config.noises)
           * len(config.fractions) * len(config.heterogeneities) * config.seeds)
  start = time.perf_counter()
  with tqdm(total=total, desc="heterogeneity", unit="problem", disable=args.no_progress,
            file=sys.stderr) as progress:
    cells = run_grid(config, progress)
  runtime = time.perf_counter() - start
  env = reporting.environment()
  table = markdown_table(cells, config, runtime, env)
  plot_errors(cells, config, os.path.join(args.out, "heterogeneity_error.png"))
  report = {
      "cells": cells,
      "worst_ratio": max(c["ratio"] for c in cells),
      "target_ratio": TARGET_RATIO,
      "config": {**config._asdict(), "quick": bool(args.quick)},
      "runtime_s": runtime,
      "environment": env,
  }
  reporting.write_json(os.path.join(args.out, "report.json"), report)
  with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  if args.readme:
    reporting.replace_between_markers(args.readme, table, TABLE_BEGIN, TABLE_END)
  print(table)
  return 0


def main(argv: list[str] | None = None) -> int:
  """``python -m clair_jax.studies.heterogeneity_study --out DIR [--quick]``."""
  parser = argparse.ArgumentParser(prog="clair-jax heterogeneity", description=__doc__)
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())
