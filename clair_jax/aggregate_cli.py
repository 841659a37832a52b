"""``clair-jax aggregate``: CLAIR over K clients' PEFT adapter directories, refined adapters out.

    clair-jax aggregate CLIENT_DIR [CLIENT_DIR ...] --rank R --out OUT [--base-adapter DIR]

Writes, all at once (into a temporary directory next to ``OUT``, renamed at the end, so a
failure never leaves a half-written ``OUT``):

* ``OUT/consensus/`` and ``OUT/clients/<name>/``: PEFT adapter directories
  (``adapter_model.safetensors`` with the input's keys and dtypes, ``adapter_config.json``
  with the input's fields, ``r`` / ``lora_alpha`` / ``rank_pattern`` / ``alpha_pattern``
  set for the refined ranks and ``use_rslora`` false: scaling 1). ``<name>`` is the client
  directory's base name.
* ``OUT/report.json`` (strict JSON: non-finite numbers are ``null``): ``clients`` (name,
  contaminated, joint score, finite), per-module scores, thresholds, noise levels, solver
  status and refined ranks, the options, package versions and the inputs' sha256.
* ``OUT/report.png``: joint score per client and the module x client heat map of
  ``log10(score / threshold)``.

Bad arguments and bad adapters (missing files, different keys, shapes or base models) are
reported as usage errors (exit status 2), naming the client and the key. ``clair-jax``
keeps JAX's persistent compilation cache (``clair_jax.cli.use_compilation_cache``), so a
second run with the same shapes does not compile again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def _directory(text: str) -> str:
  if not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
  return text


def _option(text: str) -> tuple[str, object]:
  """``KEY=VALUE``; the value read as JSON when it parses (numbers, true/false, null)."""
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  key, value = text.split("=", 1)
  try:
    return key.strip(), json.loads(value)
  except json.JSONDecodeError:
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("clients", nargs="+", type=_directory, metavar="CLIENT_DIR",
                      help="PEFT adapter directories, one per client (at least 3)")
  parser.add_argument("--rank", type=_positive_int, required=True,
                      help="detection rank r of the shared subspace (per module)")
  parser.add_argument("--out", required=True, help="output directory (must not exist, or "
                      "pass --overwrite)")
  parser.add_argument("--base-adapter", type=_directory, default=None, metavar="DIR",
                      help="adapter the clients continued from: updates are the deltas")
  parser.add_argument("--module-batch", type=_positive_int, default=None,
                      help="modules per compiled call; None: as many as fit a 1 GiB working set")
  parser.add_argument("--batching", choices=("vmap", "map"), default=None,
                      help="modules of a call: one vmapped program, or one after the other; "
                      "None: map on the CPU, vmap elsewhere")
  parser.add_argument("--option", type=_option, action="append", default=[],
                      metavar="KEY=VALUE", help="a clair_jax.ClairOptions field, e.g. "
                      "refine_strength=0.5 (repeatable)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="dtype of the written adapters (default: each tensor's input "
                      "dtype; float32 keeps the aggregate's precision for bf16 inputs)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  parser.add_argument("--no-plot", action="store_true", help="skip report.png")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.set_defaults(_aggregate_parser=parser)


def _client_names(directories) -> list[str]:
  return [os.path.basename(os.path.normpath(d)) for d in directories]


def _versions() -> dict:
  import importlib.metadata  # pylint: disable=g-import-not-at-top

  out = {"python": platform.python_version()}
  for package in ("clair_jax", "jax", "jaxlib", "numpy", "safetensors", "ml_dtypes", "flax"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = None
  return out


def _inputs(directory: str) -> dict:
  from clair_jax import adapters  # pylint: disable=g-import-not-at-top

  return {"path": os.path.abspath(directory),
          "sha256": {name: adapters.file_sha256(os.path.join(directory, name))
                     for name in (adapters.WEIGHTS_NAME, adapters.CONFIG_NAME)}}


def build_report(result, args, directories: dict, timings: dict) -> dict:
  """The ``report.json`` dict (strict JSON once written by
  :func:`clair_jax._src.reporting.write_json`)."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
      "clients": [{"name": name, "contaminated": bool(c), "score": float(s), "finite": bool(f)}
                  for name, c, s, f in zip(result.names, result.contaminated, result.scores,
                                           result.finite)],
      "joint_cut": result.cut,
      "rank": result.rank,
      "options": dict(args.option),
      "modules": [
          {"name": name, "scores": result.module_scores[j], "threshold":
           result.module_thresholds[j], "noise_level": result.noise_levels[j],
           "status": int(result.status[j]), "status_name": result.status_names[j],
           "refined_rank": max(int(result.refine_ranks[j]), 1),
           "refine_saturated": bool(result.refine_saturated[j])}
          for j, name in enumerate(result.modules)],
      "output_config": {"r": result.config["r"], "lora_alpha": result.config["lora_alpha"],
                        "rank_pattern": result.config["rank_pattern"], "scaling": 1.0},
      "score_rule": "per module: CLAIR score / threshold; joint: geometric mean over modules, "
                    "contaminated when above the joint cut (median + 3 * 1.4826 * MAD over the "
                    "finite clients, capped at 1); null = non-finite",
      "noise_level": "per module, std per reduced degree of freedom (clair_factored)",
      "inputs": {name: _inputs(d) for name, d in directories.items()},
      "versions": _versions(),
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
      "runtime_s": timings,
  }


def plot_report(result, path: str) -> None:
  """Bar chart of joint scores per client and a module x client heat map (Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  num_modules, num_clients = result.module_scores.shape
  ratio = result.module_scores / result.module_thresholds[:, None]
  finite = ratio[np.isfinite(ratio) & (ratio > 0)]
  top = float(np.max(finite)) if finite.size else 1.0
  logs = np.log10(np.clip(np.where(np.isfinite(ratio), ratio, top * 10), 1e-3, None))
  bound = max(float(np.max(np.abs(logs))), 0.5)
  joint_scores = np.where(np.isfinite(result.scores), result.scores, top * 10)
  width = max(6.0, 0.25 * num_clients + 2)
  height = 3.0 + min(0.12 * num_modules + 1.5, 14.0)
  fig, (ax_bar, ax_map) = plt.subplots(
      2, 1, figsize=(width, height), gridspec_kw={"height_ratios": [1.0, max(1.5, 0.05 *
                                                                              num_modules)]})
  colours = ["tab:red" if c else "tab:blue" for c in result.contaminated]
  ax_bar.bar(np.arange(num_clients), joint_scores, color=colours)
  ax_bar.axhline(result.cut, color="k", linestyle="--", linewidth=1,
                 label=f"joint cut {result.cut:.3g}")
  ax_bar.set_yscale("log")
  ax_bar.set_xticks(np.arange(num_clients))
  ax_bar.set_xticklabels(result.names, rotation=90, fontsize=7)
  ax_bar.set_ylabel("joint score")
  ax_bar.set_title("joint score per client (red: contaminated; non-finite clients drawn at "
                   "the top)", fontsize=9)
  ax_bar.legend(fontsize=8)
  image = ax_map.imshow(logs, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound,
                        interpolation="nearest")
  ax_map.set_xticks(np.arange(num_clients))
  ax_map.set_xticklabels(result.names, rotation=90, fontsize=7)
  step = max(1, num_modules // 40)
  ax_map.set_yticks(np.arange(0, num_modules, step))
  ax_map.set_yticklabels([result.modules[j] for j in range(0, num_modules, step)], fontsize=6)
  ax_map.set_title("log10(score / threshold) per module", fontsize=9)
  fig.colorbar(image, ax=ax_map, fraction=0.03)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_outputs(result, folder: str, report: dict, plot: bool) -> None:
  """Every output file under ``folder`` (the temporary directory)."""
  from clair_jax._src import reporting  # pylint: disable=import-outside-toplevel
  from clair_jax import adapters  # pylint: disable=g-import-not-at-top

  adapters.write_peft(os.path.join(folder, "consensus"),
                      adapters.Adapter(result.consensus, result.config))
  for name in result.names:
    adapters.write_peft(os.path.join(folder, "clients", name),
                        adapters.Adapter(result.refined[name], result.config))
  reporting.write_json(os.path.join(folder, "report.json"), report)
  if plot:
    plot_report(result, os.path.join(folder, "report.png"))


def _publish(folder: str, out: str) -> None:
  """Renames the finished ``folder`` to ``out`` (an existing ``out`` is moved aside first and
  removed after)."""
  old = None
  if os.path.lexists(out):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.rename(out, old)
  os.rename(folder, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  from clair_jax import adapters  # pylint: disable=g-import-not-at-top

  parser = args._aggregate_parser  # pylint: disable=protected-access
  names = _client_names(args.clients)
  if len(names) < 3:
    parser.error(f"CLAIR needs at least 3 client directories; got {len(names)}")
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    parser.error(f"client directories must have distinct base names (they name the "
                 f"outputs); repeated: {duplicates}")
  out = os.path.abspath(args.out)
  if os.path.lexists(out) and not args.overwrite:
    parser.error(f"--out {args.out!r} exists; pass --overwrite to replace it")
  if not os.path.isdir(os.path.dirname(out)):
    parser.error(f"the parent of --out {args.out!r} is not a directory")
  options = dict(args.option)

  timings = {}
  start = time.perf_counter()
  directories = dict(zip(names, args.clients))
  try:
    clients = {name: adapters.read_peft(d, client=name) for name, d in directories.items()}
    base = (None if args.base_adapter is None
            else adapters.read_peft(args.base_adapter, client="base adapter"))
  except ValueError as e:
    parser.error(str(e))
  timings["load"] = time.perf_counter() - start

  start = time.perf_counter()
  bars = []

  def progress(stage, done, total):
    if not bars:
      bars.append(tqdm(total=2 * total, desc=stage, unit="batch", disable=args.no_progress,
                       file=sys.stderr))
    bars[0].set_description(stage)
    bars[0].n = done + (total if stage == "refine" else 0)
    bars[0].refresh()

  try:
    result = adapters.aggregate_adapters(clients, args.rank, base_adapter=base,
                                         dtype=args.dtype, module_batch=args.module_batch,
                                         batching=args.batching, progress=progress,
                                         **options)
  except (ValueError, TypeError) as e:
    parser.error(str(e))
  finally:
    for bar in bars:
      bar.close()
  timings["aggregate"] = time.perf_counter() - start

  start = time.perf_counter()
  folder = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp's 0700 would become OUT's mode
    report = build_report(result, args, directories, timings)
    report["base_adapter"] = None if args.base_adapter is None else _inputs(args.base_adapter)
    write_outputs(result, folder, report, plot=not args.no_plot)
    _publish(folder, out)
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)
    raise
  timings["write"] = time.perf_counter() - start
  print(result.summary())
  print(f"wrote {out}/consensus, clients/ ({len(names)}), report.json"
        f"{'' if args.no_plot else ', report.png'} (load {timings['load']:.1f} s, aggregate "
        f"{timings['aggregate']:.1f} s, write {timings['write']:.1f} s)")
  return 0
