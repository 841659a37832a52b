"""``clair-jax text-copy``: the federated LoRA text-copy study from the command line.

Example::

  clair-jax text-copy --preset smoke --out runs/text_copy_smoke --seeds 0 1 2 \\
      --readme README.md

writes ``report.json`` (means over seeds in ``methods`` / ``detection``, spreads in
``methods_std`` / ``detection_std``, every seed's full run in ``runs``), ``accuracy.png``,
``scores.png``, ``curves.png``, the base model and client adapters per seed
(``seed_<N>/base_model.npz``, ``seed_<N>/client_adapters.npz``), prints a markdown table
and, with ``--readme``, writes it between ``<!-- text-copy-table:begin -->`` and
``<!-- text-copy-table:end -->`` in that file (one section per preset, so the smoke and
cpu tables live side by side; see ``replace_table``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

BEGIN = "<!-- text-copy-table:begin -->"
END = "<!-- text-copy-table:end -->"
PRESET_CHOICES = ("smoke", "cpu", "gpu", "tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Registers the ``text-copy`` options on ``parser``."""
  parser.add_argument("--preset", choices=PRESET_CHOICES, default="smoke",
                      help="problem size: smoke (<5 min on 2 CPU cores), cpu, gpu (full size); "
                      "tiny is for tests")
  parser.add_argument("--out", default="runs/text_copy", help="output directory")
  parser.add_argument("--seed", type=int, default=0, help="seed of a single run")
  parser.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="several seeds: report mean and spread (overrides --seed)")
  parser.add_argument("--readme", default=None,
                      help="replace the text-copy table between the markers in this file")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def get_config(preset: str):
  """The ``ExperimentConfig`` of a preset name."""
  from clair_jax.text_copy import experiment
  if preset == "tiny":
    return experiment.tiny_config()
  if preset not in experiment.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESET_CHOICES}")
  return experiment.PRESETS[preset]


def config_dict(config) -> dict:
  """Nested plain dict of an ``ExperimentConfig`` (for ``report.json``)."""
  out = {}
  for name, value in config._asdict().items():
    out[name] = config_dict(value) if hasattr(value, "_asdict") else value
  return out


def combine_runs(runs: list[dict]) -> dict:
  """Mean and standard deviation over seeds of the method metrics and detection metrics.

  Returns:
    dict with ``methods``, ``methods_std``, ``detection``, ``detection_std``.
  """
  methods = runs[0]["methods"]
  mean = {m: {k: float(np.mean([r["methods"][m][k] for r in runs])) for k in methods[m]}
          for m in methods}
  std = {m: {k: float(np.std([r["methods"][m][k] for r in runs])) for k in methods[m]}
         for m in methods}
  keys = ("precision", "recall", "f1")
  det = {k: float(np.mean([r["detection"][k] for r in runs])) for k in keys}
  det["exact_rate"] = float(np.mean([r["detection"]["exact"] for r in runs]))
  det_std = {k: float(np.std([r["detection"][k] for r in runs])) for k in keys}
  return {"methods": mean, "methods_std": std, "detection": det, "detection_std": det_std}


def markdown_table(report: dict) -> str:
  """The README table: mean +- std over seeds of benign-client metrics, then detection."""
  seeds = [r["seed"] for r in report["runs"]]
  cfg = report["config"]
  fed = cfg["federation"]
  num_bad = int(round(fed["contamination"] * fed["num_clients"]))
  lines = [
      f"Text copy, preset `{report['preset']}`: {fed['num_clients']} clients ({num_bad} "
      f"contaminated: {', '.join(fed['attacks'])}), {fed['num_train']} training sequences "
      f"per client; seeds {', '.join(map(str, seeds))}; mean ± std over seeds of the mean "
      f"over benign clients (held-out data). Wall time {report['timing']['total_s']:.0f} s.",
      "",
      "| method | token acc | exact-seq acc | loss |",
      "|---|---|---|---|",
  ]
  for m, vals in report["methods"].items():
    sd = report["methods_std"][m]
    cells = [f"{vals[k]:.3f} ± {sd[k]:.3f}" for k in ("token_acc", "seq_acc", "loss")]
    name = f"**{m}**" if m == "clair" else m
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  d, ds = report["detection"], report["detection_std"]
  lines += ["", f"CLAIR detection (one joint verdict per client): precision "
            f"{d['precision']:.3f} ± {ds['precision']:.3f}, recall {d['recall']:.3f} ± "
            f"{ds['recall']:.3f}, F1 {d['f1']:.3f} ± {ds['f1']:.3f}, exact set recovered in "
            f"{d['exact_rate']:.0%} of seeds."]
  return "\n".join(lines)


def _preset_marker(preset: str) -> str:
  return f"<!-- text-copy-preset: {preset} -->"


def replace_table(path: str, table: str, preset: str) -> None:
  """Writes ``table`` between the begin/end markers of ``path``, one section per preset.

  The block holds one section per preset, each introduced by
  ``<!-- text-copy-preset: NAME -->``; the section of ``preset`` is replaced (or added),
  the other presets' sections are kept, sections are ordered smoke, cpu, gpu, tiny. Any
  other text in the block (e.g. a placeholder) is dropped.

  Raises:
    ValueError: when the markers are missing or out of order.
  """
  with open(path) as f:
    lines = f.read().split("\n")
  try:
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END and i > begin)
  except StopIteration:
    raise ValueError(f"{path} lacks the markers {BEGIN!r} ... {END!r}") from None
  sections, current = {}, None
  for line in lines[begin + 1:end]:
    name = next((p for p in PRESET_CHOICES if line.strip() == _preset_marker(p)), None)
    if name is not None:
      current = name
      sections[current] = []
    elif current is not None:
      sections[current].append(line)
  sections[preset] = table.split("\n") + [""]
  block = []
  for name in PRESET_CHOICES:
    if name in sections:
      block += [_preset_marker(name)] + sections[name]
  while block and not block[-1].strip():
    block.pop()
  new = lines[:begin + 1] + block + lines[end:]
  with open(path, "w") as f:
    f.write("\n".join(new))


def run(args: argparse.Namespace) -> int:
  """Runs the study for every seed, writes the report, plots and (optionally) the README."""
  from clair_jax.text_copy import experiment
  from clair_jax.text_copy import plots

  config = get_config(args.preset)
  seeds = list(args.seeds) if args.seeds else [args.seed]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  runs = []
  for seed in seeds:
    print(f"[text-copy] preset={args.preset} seed={seed}", flush=True)
    runs.append(experiment.run_experiment(
        config, seed, out_dir=os.path.join(args.out, f"seed_{seed}"),
        progress=not args.no_progress))
  total = time.perf_counter() - t0
  report = {
      "preset": args.preset,
      **combine_runs(runs),
      "config": config_dict(config),
      "timing": {"total_s": total, "per_seed_s": [r["timing"]["total_s"] for r in runs],
                 "runs": [r["timing"] for r in runs]},
      "runs": runs,
  }
  report["command"] = (f"clair-jax text-copy --preset {args.preset} --out {args.out} "
                       + (f"--seeds {' '.join(map(str, seeds))}" if args.seeds
                          else f"--seed {args.seed}"))
  with open(os.path.join(args.out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  plots.plot_report(report, args.out)
  table = markdown_table(report)
  print(table)
  if args.readme:
    replace_table(args.readme, table, args.preset)
    print(f"[text-copy] table written into {args.readme}")
  return 0
