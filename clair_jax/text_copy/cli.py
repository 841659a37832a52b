"""``clair-jax text-copy``: the federated LoRA text-copy study from the command line.

Example::

  clair-jax text-copy --preset smoke --task skills --out runs/text_copy_skills \\
      --seeds 0 1 2 3 4 --readme README.md

writes ``report.json`` (per method the mean over seeds in ``methods[name]`` with every
seed's token accuracy in ``methods[name]["token_acc_per_seed"]``; spreads in
``methods_std``; CLAIR's paired per-seed differences in ``paired``; detection in
``detection`` / ``detection_std`` / ``flag_rates``; every seed's full run in ``runs``),
``accuracy.png``, ``per_client.png``, ``detection.png``, ``scores.png``, ``curves.png``,
the base model and client adapters per seed (``seed_<N>/base_model.npz``,
``seed_<N>/client_adapters.npz``), prints a markdown table and, with ``--readme``, writes
it between ``<!-- text-copy-table:begin -->`` and ``<!-- text-copy-table:end -->`` in that
file (one section per preset and task, so all tables live side by side; see
``replace_table``).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from clair_jax._src import reporting

BEGIN = "<!-- text-copy-table:begin -->"
END = "<!-- text-copy-table:end -->"
PRESET_CHOICES = ("smoke", "cpu", "gpu", "tiny")
TASK_CHOICES = ("copy", "skills")
STRENGTH_CHOICES = ("evaluation_round", "auto")
# Rows that are references, not methods (labelled in the table).
REFERENCES = {
    "clair_true_benign": "reference: CLAIR's refinement given the true benign set",
    "local_large_data": "reference: each benign client trained locally on {n} sequences "
                        "of its own task",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Registers the ``text-copy`` options on ``parser``."""
  parser.add_argument("--preset", choices=PRESET_CHOICES, default="smoke",
                      help="problem size: smoke (<5 min on 2 CPU cores), cpu, gpu (full size); "
                      "tiny is for tests")
  parser.add_argument("--task", choices=TASK_CHOICES, default="copy",
                      help="copy: every benign client needs the same change; skills: "
                      "client-specific maps built from shared skills (heterogeneous)")
  parser.add_argument("--strength-mode", choices=STRENGTH_CHOICES, default=None,
                      help="how CLAIR's refinement strength is chosen (default: the "
                      "preset's, a federated evaluation round)")
  parser.add_argument("--round-metric", choices=("token_error", "loss"), default=None,
                      help="what clients report in the evaluation round (default: the "
                      "preset's, token_error)")
  parser.add_argument("--out", default="runs/text_copy", help="output directory")
  parser.add_argument("--seed", type=int, default=0, help="seed of a single run")
  parser.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="several seeds: report mean and spread (overrides --seed)")
  parser.add_argument("--readme", default=None,
                      help="replace the text-copy table between the markers in this file")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def get_config(preset: str, task: str = "copy"):
  """The ``ExperimentConfig`` of a preset name and a task name."""
  from clair_jax.text_copy import experiment
  if preset == "tiny":
    return experiment.tiny_config(task)
  if preset not in experiment.PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESET_CHOICES}")
  return experiment.with_task(experiment.PRESETS[preset], task)


def config_dict(config) -> dict:
  """Nested plain dict of an ``ExperimentConfig`` (for ``report.json``)."""
  out = {}
  for name, value in config._asdict().items():
    out[name] = config_dict(value) if hasattr(value, "_asdict") else value
  return out


def paired_differences(runs: list[dict], reference: str = "clair") -> dict:
  """Per-seed paired differences of ``reference``'s benign token accuracy to every method.

  Returns:
    ``{method: {"diff_per_seed": [...], "mean_diff": float, "wins": int, "n": int}}``
    with ``diff = token_acc[reference] - token_acc[method]`` per seed and ``wins`` the
    seeds where it is positive.
  """
  out = {}
  for method in runs[0]["methods"]:
    if method == reference:
      continue
    diff = [r["methods"][reference]["token_acc"] - r["methods"][method]["token_acc"]
            for r in runs]
    out[method] = {"diff_per_seed": diff, "mean_diff": float(np.mean(diff)),
                   "wins": int(np.sum(np.array(diff) > 0)), "n": len(diff)}
  return out


def combine_runs(runs: list[dict]) -> dict:
  """Mean and standard deviation over seeds of the method and detection metrics.

  Returns:
    dict with ``methods`` (means, plus ``token_acc_per_seed``), ``methods_std``,
    ``paired`` (``paired_differences``), ``detection``, ``detection_std``,
    ``flag_rates`` (``{kind: [flagged, total]}`` summed over seeds) and ``strengths``
    (the refinement strengths per seed).
  """
  methods = runs[0]["methods"]
  mean, std = {}, {}
  for m in methods:
    mean[m] = {k: float(np.mean([r["methods"][m][k] for r in runs])) for k in methods[m]}
    mean[m]["token_acc_per_seed"] = [r["methods"][m]["token_acc"] for r in runs]
    std[m] = {k: float(np.std([r["methods"][m][k] for r in runs])) for k in methods[m]}
  keys = ("precision", "recall", "f1")
  det = {k: float(np.mean([r["detection"][k] for r in runs])) for k in keys}
  det["exact_rate"] = float(np.mean([r["detection"]["exact"] for r in runs]))
  det["f1_per_seed"] = [r["detection"]["f1"] for r in runs]
  det_std = {k: float(np.std([r["detection"][k] for r in runs])) for k in keys}
  rates: dict = {}
  for r in runs:
    for kind, (flagged, total) in r.get("flag_rates", {}).items():
      rates.setdefault(kind, [0, 0])
      rates[kind][0] += flagged
      rates[kind][1] += total
  strengths = {}
  if all("refine" in r for r in runs):
    strengths = {
        "evaluation_round": [r["refine"]["strength_evaluation_round"] for r in runs],
        "true_benign": [r["refine"]["strength_true_benign"] for r in runs],
        "auto_median_over_modules": [
            float(np.median(list(r["refine"]["strength_auto"].values()))) for r in runs],
        "rank_median_over_modules": [
            float(np.median(list(r["refine"]["rank"].values()))) for r in runs],
    }
    if all("strength_client_noise" in r["refine"] for r in runs):
      strengths["client_noise_median_over_modules"] = [
          float(np.median(list(r["refine"]["strength_client_noise"].values()))) for r in runs]
  return {"methods": mean, "methods_std": std, "paired": paired_differences(runs),
          "detection": det, "detection_std": det_std, "flag_rates": rates,
          "strengths": strengths}


def _row_name(method: str, report: dict) -> str:
  if method == "clair":
    return "**clair**"
  if method in REFERENCES:
    return f"*{method}*"
  return method


def markdown_table(report: dict) -> str:
  """The README table: mean ± std over seeds of benign-client metrics, CLAIR's paired
  per-seed difference to every row, then references, strengths and detection."""
  seeds = [r["seed"] for r in report["runs"]]
  cfg = report["config"]
  fed = cfg["federation"]
  task = cfg["task"].get("name", "copy")
  num_bad = int(round(fed["contamination"] * fed["num_clients"]))
  what = ("every benign client copies (one shared change)" if task == "copy" else
          f"client-specific maps from {cfg['task']['num_skills']} shared skills, "
          f"Dirichlet({fed.get('skill_alpha')}) mixtures")
  mode = report["runs"][0].get("refine", {}).get("strength_mode", "evaluation_round")
  lines = [
      f"Text copy, preset `{report['preset']}`, task `{task}` ({what}): "
      f"{fed['num_clients']} clients ({num_bad} contaminated: {', '.join(fed['attacks'])}), "
      f"{fed['num_train']} training sequences per client; seeds {', '.join(map(str, seeds))}; "
      f"mean ± std over seeds of the mean over benign clients (held-out test split). "
      f"Last two columns: CLAIR (`clair`, strength from "
      f"{'a federated evaluation round' if mode == 'evaluation_round' else 'the server only'})"
      f" minus the row, paired per seed. Wall time {report['timing']['total_s']:.0f} s.",
      "",
      "| method | token acc | exact-seq acc | loss | clair − row (token acc, mean) "
      "| clair wins |",
      "|---|---|---|---|---|---|",
  ]
  paired = report.get("paired", {})
  for m, vals in report["methods"].items():
    sd = report["methods_std"][m]
    cells = [f"{vals[k]:.3f} ± {sd[k]:.3f}" for k in ("token_acc", "seq_acc", "loss")]
    if m in paired:
      p = paired[m]
      cells += [f"{p['mean_diff']:+.3f}", f"{p['wins']}/{p['n']}"]
    else:
      cells += ["", ""]
    lines.append(f"| {_row_name(m, report)} | " + " | ".join(cells) + " |")
  notes = [f"*{m}*: {REFERENCES[m].format(n=cfg.get('large_data'))}"
           for m in report["methods"] if m in REFERENCES]
  if notes:
    lines += ["", "; ".join(notes) + "."]
  st = report.get("strengths") or {}
  if st:
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    metric = report["runs"][0].get("refine", {}).get("round_metric", "loss")
    lines += ["", f"Refinement strength per seed: evaluation round ({metric} reported) "
              f"{fmt(st['evaluation_round'])}"
              f" (true benign set: {fmt(st['true_benign'])}); server-only `auto` (median over "
              f"modules, mean over directions) {fmt(st['auto_median_over_modules'])}"
              + (f"; `auto` told the clients' split-half noise "
                 f"{fmt(st['client_noise_median_over_modules'])}"
                 if "client_noise_median_over_modules" in st else "")
              + f"; refine rank (median over modules) {fmt(st['rank_median_over_modules'])}."]
  d, ds = report["detection"], report["detection_std"]
  lines += ["", f"CLAIR detection (one joint verdict per client): precision "
            f"{d['precision']:.3f} ± {ds['precision']:.3f}, recall {d['recall']:.3f} ± "
            f"{ds['recall']:.3f}, F1 {d['f1']:.3f} ± {ds['f1']:.3f}, exact set recovered in "
            f"{d['exact_rate']:.0%} of seeds."]
  rates = report.get("flag_rates") or {}
  if rates:
    lines[-1] += " Flagged, by client kind (all seeds): " + ", ".join(
        f"{kind} {f}/{t}" for kind, (f, t) in rates.items()) + "."
  return "\n".join(lines)


def _section_marker(preset: str, task: str) -> str:
  return f"<!-- text-copy-preset: {preset} task: {task} -->"


def _parse_marker(line: str) -> tuple[str, str] | None:
  """``(preset, task)`` of a section marker; the older ``<!-- text-copy-preset: NAME -->``
  (before tasks existed) reads as task ``copy``."""
  line = line.strip()
  for preset in PRESET_CHOICES:
    if line == f"<!-- text-copy-preset: {preset} -->":
      return preset, "copy"
    for task in TASK_CHOICES:
      if line == _section_marker(preset, task):
        return preset, task
  return None


def replace_table(path: str, table: str, preset: str, task: str = "copy") -> None:
  """Writes ``table`` between the begin/end markers of ``path``, one section per preset
  and task.

  The block holds one section per (preset, task), each introduced by
  ``<!-- text-copy-preset: NAME task: TASK -->``; the section of ``(preset, task)`` is
  replaced (or added), the others are kept, sections are ordered by preset (smoke, cpu,
  gpu, tiny), then task (copy, skills). Any other text in the block (e.g. a placeholder)
  is dropped.

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
    key = _parse_marker(line)
    if key is not None:
      current = key
      sections[current] = []
    elif current is not None:
      sections[current].append(line)
  sections[(preset, task)] = table.split("\n") + [""]
  block = []
  for name in PRESET_CHOICES:
    for kind in TASK_CHOICES:
      if (name, kind) in sections:
        block += [_section_marker(name, kind)] + sections[(name, kind)]
  while block and not block[-1].strip():
    block.pop()
  new = lines[:begin + 1] + block + lines[end:]
  with open(path, "w") as f:
    f.write("\n".join(new))


def run(args: argparse.Namespace) -> int:
  """Runs the study for every seed, writes the report, plots and (optionally) the README."""
  from clair_jax.text_copy import experiment
  from clair_jax.text_copy import plots

  task = getattr(args, "task", "copy")
  config = get_config(args.preset, task)
  if getattr(args, "strength_mode", None):
    config = config._replace(strength_mode=args.strength_mode)
  if getattr(args, "round_metric", None):
    config = config._replace(round_metric=args.round_metric)
  seeds = list(args.seeds) if args.seeds else [args.seed]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  runs = []
  for seed in seeds:
    print(f"[text-copy] preset={args.preset} task={task} seed={seed}", flush=True)
    runs.append(experiment.run_experiment(
        config, seed, out_dir=os.path.join(args.out, f"seed_{seed}"),
        progress=not args.no_progress))
  total = time.perf_counter() - t0
  report = {
      "preset": args.preset,
      "task": task,
      **combine_runs(runs),
      "config": config_dict(config),
      "timing": {"total_s": total, "per_seed_s": [r["timing"]["total_s"] for r in runs],
                 "runs": [r["timing"] for r in runs]},
      "runs": runs,
  }
  report["command"] = (
      f"clair-jax text-copy --preset {args.preset} --task {task} --out {args.out} "
      + (f"--strength-mode {args.strength_mode} " if getattr(args, "strength_mode", None)
         else "")
      + (f"--round-metric {args.round_metric} " if getattr(args, "round_metric", None)
         else "")
      + (f"--seeds {' '.join(map(str, seeds))}" if args.seeds else f"--seed {args.seed}"))
  reporting.write_json(os.path.join(args.out, "report.json"), report)
  plots.plot_report(report, args.out)
  table = markdown_table(report)
  print(table)
  if args.readme:
    replace_table(args.readme, table, args.preset, task)
    print(f"[text-copy] table written into {args.readme}")
  return 0
