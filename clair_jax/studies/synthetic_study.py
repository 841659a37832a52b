"""``clair-jax synthetic``: CLAIR against robust baselines on data with known truth.

For every cell of the grid (contamination fraction x attack x noise level) and every
trial, :func:`clair_jax.synthetic.make_problem` draws client updates, every method turns
them into per-client estimates, and the study records the benign-client error
``mean_{k benign} ||Dtilde_k - Delta_k||_F^2``, detection precision/recall/F1/exact
(CLAIR, multi-Krum's rejected set; not the oracle, which is given the true benign set) and
the spectral ``||sin Theta||`` subspace error (CLAIR, oracle). A second grid (fraction x
separation of a partially overlapping coherent attack) gives the detection phase diagram.

The baselines are given what they need to be at their best: multi-Krum assumes the true
number of attackers ``f`` (and averages ``K - f`` clients), the trimmed mean trims the true
contaminated fraction at each end (capped below 1/2). CLAIR gets only the updates and the
rank.

Outputs in ``--out``: ``report.json`` (``methods`` summary keyed by method, ``grid`` with
every cell, ``phase_diagram``, ``checks``, ``config``, ``environment``), ``table.md`` (the
printed table), and the plots ``benign_error_vs_contamination.png``,
``detection_phase_diagram.png`` and ``client_scores.png``. ``--readme PATH`` replaces the
text between ``<!-- synthetic-table:begin -->`` and ``<!-- synthetic-table:end -->`` in
``PATH`` by the table, so README numbers are always regenerated, never typed.

``--grid attacks`` (or naming a literature attack in ``--attacks``) runs the other grid, the
attacks of the Byzantine-robust FL literature over shapes, heterogeneity, fractions and
seeds: see :mod:`clair_jax.studies.attacks_study`.

This module is the command line (options, config, the run); the computations are
:mod:`clair_jax.studies.synthetic_grid`'s and the table, plots and files
:mod:`clair_jax.studies.synthetic_report`'s. Their public names are re-exported here, where
the notebooks and tests have always found them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from clair_jax import synthetic
from clair_jax._src import reporting
from clair_jax.studies.synthetic_grid import BASELINES
from clair_jax.studies.synthetic_grid import COHERENT_ATTACKS
from clair_jax.studies.synthetic_grid import DETECTING_METHODS
from clair_jax.studies.synthetic_grid import METHODS
from clair_jax.studies.synthetic_grid import ORACLE_FACTOR
from clair_jax.studies.synthetic_grid import QUICK
from clair_jax.studies.synthetic_grid import SUBSPACE_METHODS
from clair_jax.studies.synthetic_grid import StudyConfig
from clair_jax.studies.synthetic_grid import evaluate_problem
from clair_jax.studies.synthetic_grid import run_checks
from clair_jax.studies.synthetic_grid import run_grid
from clair_jax.studies.synthetic_grid import run_phase_diagram
from clair_jax.studies.synthetic_grid import score_examples
from clair_jax.studies.synthetic_grid import summarise_methods
from clair_jax.studies.synthetic_report import TABLE_BEGIN
from clair_jax.studies.synthetic_report import TABLE_END
from clair_jax.studies.synthetic_report import build_report
from clair_jax.studies.synthetic_report import markdown_table
from clair_jax.studies.synthetic_report import plot_benign_error
from clair_jax.studies.synthetic_report import plot_client_scores
from clair_jax.studies.synthetic_report import plot_phase_diagram
from clair_jax.studies.synthetic_report import update_readme
from clair_jax.studies.synthetic_report import write_files
from clair_jax.studies.synthetic_report import write_plots

__all__ = [
    "BASELINES", "COHERENT_ATTACKS", "DETECTING_METHODS", "METHODS", "ORACLE_FACTOR", "QUICK",
    "SUBSPACE_METHODS", "TABLE_BEGIN", "TABLE_END", "StudyConfig", "add_arguments",
    "config_from_args", "evaluate_problem", "markdown_table", "plot_benign_error",
    "plot_client_scores", "plot_phase_diagram", "run", "run_checks", "run_grid",
    "run_phase_diagram", "score_examples", "summarise_methods", "update_readme",
    "uses_attacks_grid",
]


# --------------------------------------------------------------------------- CLI


def _floats(text: str) -> tuple[float, ...]:
  """``"0.1,0.2"`` -> ``(0.1, 0.2)`` (an argparse type: bad input is a usage error)."""
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _ints(text: str) -> tuple[int, ...]:
  """``"0,1"`` -> ``(0, 1)`` (an argparse type)."""
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _attacks(text: str) -> tuple[str, ...]:
  """Comma-separated attack names, each one of :data:`clair_jax.synthetic.ATTACKS`."""
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


def _run_grids(config: StudyConfig, no_progress: bool):
  """The grid, the phase diagram (at the median noise level) and the scores plot's problems."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  num_cells = len(config.attacks) * len(config.fractions) * len(config.noises)
  num_phase = len(config.fractions) * len(config.separations)
  total = (num_cells + num_phase) * config.trials
  phase_noise = sorted(config.noises)[len(config.noises) // 2]
  with tqdm(total=total, desc="synthetic", unit="problem", disable=no_progress,
            file=sys.stderr) as progress:
    cells = run_grid(config, progress)
    phase = run_phase_diagram(config, phase_noise, progress)
  return cells, phase, score_examples(config, phase_noise)


def run(args: argparse.Namespace) -> int:
  """Runs the study; returns the exit status (0 also when a check fails: it is reported)."""
  if uses_attacks_grid(args):
    from clair_jax.studies import attacks_study  # pylint: disable=import-outside-toplevel

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
  start = time.perf_counter()
  cells, phase, examples = _run_grids(config, args.no_progress)
  summary = summarise_methods(cells)
  checks = run_checks(cells)
  runtime = time.perf_counter() - start
  env = reporting.environment()
  table = markdown_table(cells, config, checks, runtime, env)
  write_plots(args.out, cells, config, phase, examples)
  report = build_report(summary=summary, cells=cells, phase=phase, checks=checks,
                        config=config, quick=args.quick, runtime_s=runtime, env=env)
  write_files(args.out, report, table)
  print(table)
  if args.readme is not None:
    try:
      update_readme(args.readme, table)
    except ValueError as e:
      print(f"clair-jax synthetic: {e}", file=sys.stderr)
      return 2
    print(f"\nupdated the table in {args.readme}")
  print(f"\nwrote {args.out}/report.json, table.md and 3 plots in {runtime:.0f} s")
  return 0
