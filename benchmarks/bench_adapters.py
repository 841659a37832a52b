"""Whole-model CLAIR on PEFT adapter files at LLM shape: time, compile, memory, contention.

    python benchmarks/bench_adapters.py            # Llama-7B shape: 32 layers x {q,k,v,o},
                                                   # 4096 x 4096, LoRA rank 16, K = 32 and 64
    python benchmarks/bench_adapters.py --quick    # 1 layer, 128 x 128: a smoke run

For each K, a generator process writes K synthetic PEFT adapter directories (bf16, 20%
contaminated: benign ``B_k`` share a rank-4 column space per module, contaminated ones are
random; ``A_k`` random), then one worker process measures, from the files:

* ``load``: reading every ``adapter_model.safetensors`` (warm OS cache);
* ``detect``: per-module detection of every module and the joint verdict (files to
  verdicts is ``load + detect``); ``refine``: every module refined with the jointly benign
  set (factored outputs; materialising the PEFT dicts is not included);
* the first run minus the median steady run as ``compile`` (no persistent cache);
* the steady time per module against one Gram GEMM of the factors, ``L^T L`` for the
  stacked ``(out, K r)`` left factors of one module (the issue's yardstick);
* the steady time again while one busy process (a Python spin loop) competes for the CPU
  (quiet and busy runs interleaved);
* peak RSS of the worker (``resource.getrusage``).

Prints a markdown table and writes it into ``benchmarks/RESULTS.md`` between the
``adapters`` markers (``--results``; ``--results ''`` to skip; ``--quick`` never writes
there), with the numbers in ``benchmarks/adapters.json`` (``--json``). Options: ``--clients``,
``--layers``, ``--dim``, ``--lora-rank``, ``--runs``, ``--module-batch``, ``--xla-threads``
(sets ``XLA_FLAGS`` intra-op parallelism in the worker, to compare thread settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED_RANK = 4
CONTAMINATED_FRACTION = 0.2


def module_names(layers: int) -> list[str]:
  return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in PROJECTIONS]


def generate(folder: str, num_clients: int, layers: int, dim: int, lora_rank: int,
             seed: int = 0) -> list[str]:
  """Writes ``num_clients`` PEFT directories under ``folder``; returns their paths."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  from clair_jax import adapters  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  names = module_names(layers)
  bases = {m: np.linalg.qr(rng.normal(size=(dim, SHARED_RANK)))[0].astype(np.float32)
           for m in names}
  num_bad = int(round(CONTAMINATED_FRACTION * num_clients))
  bad = set(rng.choice(num_clients, size=num_bad, replace=False).tolist())
  config = {"peft_type": "LORA", "r": lora_rank, "lora_alpha": 2 * lora_rank,
            "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
            "target_modules": list(PROJECTIONS), "fan_in_fan_out": False, "bias": "none",
            "base_model_name_or_path": "synthetic-llama", "task_type": "CAUSAL_LM"}
  paths = []
  for k in range(num_clients):
    tensors = {}
    for m in names:
      if k in bad:
        b = rng.standard_normal((dim, lora_rank), np.float32) * np.float32(
            np.sqrt(SHARED_RANK / dim))
      else:
        b = bases[m] @ rng.standard_normal((SHARED_RANK, lora_rank), np.float32)
        b += np.float32(0.05) * rng.standard_normal((dim, lora_rank), np.float32)
      a = rng.standard_normal((lora_rank, dim), np.float32) * np.float32(1 / np.sqrt(dim))
      tensors[f"base_model.model.{m}.lora_A.weight"] = a.astype(ml_dtypes.bfloat16)
      tensors[f"base_model.model.{m}.lora_B.weight"] = b.astype(ml_dtypes.bfloat16)
    path = os.path.join(folder, f"client{k:03d}")
    adapters.write_peft(path, adapters.Adapter(tensors, config))
    paths.append(path)
  with open(os.path.join(folder, "truth.json"), "w", encoding="utf-8") as f:
    json.dump(sorted(bad), f)
  return paths


def _spin() -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _gram_seconds(dim: int, width: int, repeats: int = 5) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  gram = jax.jit(lambda x: x.T @ x)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((dim, width), np.float32))
  gram(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    gram(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def worker(args) -> dict:
  """Measures one K in this process (see the module docstring); returns the numbers."""
  import jax  # pylint: disable=g-import-not-at-top

  from clair_jax import adapters  # pylint: disable=g-import-not-at-top

  folder = args.folder
  paths = sorted(os.path.join(folder, d) for d in os.listdir(folder)
                 if os.path.isdir(os.path.join(folder, d)))
  with open(os.path.join(folder, "truth.json"), encoding="utf-8") as f:
    truth = set(json.load(f))

  def run_once() -> dict:
    marks = {}
    start = time.perf_counter()
    clients = {os.path.basename(p): adapters.read_peft(p) for p in paths}
    marks["load"] = time.perf_counter() - start

    def progress(stage, done, total):
      if done == total:
        marks[stage] = time.perf_counter()

    begin = time.perf_counter()
    result = adapters.aggregate_adapters(clients, SHARED_RANK, module_batch=args.module_batch,
                                         batching=args.batching, progress=progress)
    end = time.perf_counter()
    marks["detect"] = marks["detect"] - begin
    marks["refine"] = end - begin - marks["detect"]
    marks["total"] = marks["load"] + end - begin
    flagged = {int(n[len("client"):]) for n, c in zip(result.names, result.contaminated) if c}
    marks["exact"] = flagged == truth
    marks["modules"] = len(result.modules)
    return marks

  first = run_once()
  quiet, busy = [], []
  for _ in range(args.runs):  # interleaved, so that a drifting background load hits both
    quiet.append(run_once())
    spinner = _spin()
    try:
      time.sleep(0.3)
      busy.append(run_once())
    finally:
      spinner.kill()
      spinner.wait()
  median = lambda runs, key: statistics.median(r[key] for r in runs)
  steady = {k: median(quiet, k) for k in ("load", "detect", "refine", "total")}
  return {
      "clients": len(paths),
      "modules": first["modules"],
      "dim": args.dim,
      "lora_rank": args.lora_rank,
      "first_total_s": first["total"],
      "compile_s": first["total"] - steady["total"],
      "steady_s": steady,
      "busy_s": {k: median(busy, k) for k in ("load", "detect", "refine", "total")},
      "exact_detection": all(r["exact"] for r in [first, *quiet, *busy]),
      "gram_gemm_s": _gram_seconds(args.dim, len(paths) * args.lora_rank),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "device": str(jax.devices()[0].device_kind),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def markdown(rows: list[dict], machine: str) -> str:
  lines = [
      f"Machine: {machine}.",
      "",
      "| K | modules | shape, LoRA r | load s | detect s | refine s | files to verdicts s "
      "| compile s | per module s | Gram GEMM s | per module / GEMM | busy total s "
      "| busy / quiet | peak RSS GB | exact |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    s, b = r["steady_s"], r["busy_s"]
    per_module = (s["detect"] + s["refine"]) / r["modules"]
    lines.append(
        f"| {r['clients']} | {r['modules']} | {r['dim']}x{r['dim']}, {r['lora_rank']} "
        f"| {s['load']:.2f} | {s['detect']:.2f} | {s['refine']:.2f} "
        f"| {s['load'] + s['detect']:.2f} | {r['compile_s']:.1f} | {per_module:.3f} "
        f"| {r['gram_gemm_s']:.4f} | {per_module / r['gram_gemm_s']:.1f} | {b['total']:.2f} "
        f"| {b['total'] / s['total']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} "
        f"| {'yes' if r['exact_detection'] else 'no'} |")
  return "\n".join(lines)


BEGIN, END = "<!-- adapters:begin -->", "<!-- adapters:end -->"


def write_results(path: str, table: str, rows: list[dict], args) -> None:
  """Replaces the adapters block of RESULTS.md (appending it when missing)."""
  import jax  # pylint: disable=g-import-not-at-top

  from clair_jax._src import reporting  # pylint: disable=g-import-not-at-top

  command = "python benchmarks/bench_adapters.py " + " ".join(
      a for a in sys.argv[1:] if not a.startswith("--results"))
  per_module = [(r["steady_s"]["detect"] + r["steady_s"]["refine"]) / r["modules"]
                for r in rows]
  text = "\n".join([
      "## Whole-model LoRA aggregation from PEFT files (Llama-7B shape)",
      "",
      f"Regenerate: `{command.strip()}` (this block only). "
      f"{len(rows[0:1]) and rows[0]['modules']} modules of {args.dim} x {args.dim}, LoRA "
      f"rank {args.lora_rank}, bf16 files, 20% contaminated; steady = median of "
      f"{args.runs} run(s) after a first (compiling) one; busy = with one spinning "
      f"process beside it; jax {jax.__version__}. Per module (detect + refine): "
      + ", ".join(f"K={r['clients']}: {t:.3f} s" for r, t in zip(rows, per_module)) + ".",
      "",
      table,
  ])
  if not os.path.exists(path):
    with open(path, "w", encoding="utf-8") as f:
      f.write("")
  with open(path, encoding="utf-8") as f:
    content = f.read()
  if BEGIN not in content or END not in content:
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"\n{BEGIN}\n{END}\n")
  reporting.replace_between_markers(path, text, BEGIN, END)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="1 layer of 128 x 128, 2 runs")
  parser.add_argument("--clients", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--dim", type=int, default=None)
  parser.add_argument("--lora-rank", type=int, default=16)
  parser.add_argument("--runs", type=int, default=None,
                      help="steady runs per setting, median (default 3; 2 with --quick)")
  parser.add_argument("--module-batch", type=int, default=None)
  parser.add_argument("--batching", choices=("vmap", "map"), default=None,
                      help="modules of a call: vmapped or one after the other (default: "
                      "map on the CPU, vmap elsewhere)")
  parser.add_argument("--xla-threads", type=int, default=None,
                      help="XLA CPU intra-op threads in the worker (default: XLA's own)")
  parser.add_argument("--json", default=None,
                      help="also write the numbers here (default benchmarks/adapters.json "
                      "when --results is written)")
  parser.add_argument("--results", default=os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "RESULTS.md"),
                      help="RESULTS.md whose adapters block this run rewrites ('' to skip)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.layers = args.layers or (1 if args.quick else 32)
  args.dim = args.dim or (128 if args.quick else 4096)
  args.runs = args.runs or (2 if args.quick else 3)
  if args.generate:
    generate(args.folder, args.clients[0], args.layers, args.dim, args.lora_rank)
    return 0
  if args.worker:
    print(json.dumps(worker(args)))
    return 0

  script = os.path.abspath(__file__)
  common = ["--layers", str(args.layers), "--dim", str(args.dim), "--lora-rank",
            str(args.lora_rank), "--runs", str(args.runs)]
  if args.module_batch:
    common += ["--module-batch", str(args.module_batch)]
  if args.batching:
    common += ["--batching", args.batching]
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if args.xla_threads:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        f"intra_op_parallelism_threads={args.xla_threads}").strip()
  rows = []
  for num_clients in args.clients:
    folder = tempfile.mkdtemp(prefix=f"bench_adapters_K{num_clients}_")
    try:
      subprocess.run([sys.executable, script, "--generate", "--folder", folder, "--clients",
                      str(num_clients), *common], check=True, env=env)
      done = subprocess.run([sys.executable, script, "--worker", "--folder", folder,
                             "--clients", str(num_clients), *common], check=True, env=env,
                            stdout=subprocess.PIPE, text=True)
      rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
      shutil.rmtree(folder, ignore_errors=True)
    print(f"K={num_clients}: done", file=sys.stderr)
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"{rows[0]['device']}, XLA_FLAGS={env.get('XLA_FLAGS', '') or 'default'}")
  table = markdown(rows, machine)
  print(table)
  if args.results and not args.quick:
    args.json = args.json or os.path.join(os.path.dirname(args.results), "adapters.json")
    write_results(args.results, table, rows, args)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"machine": machine, "rows": rows, "quick": args.quick}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
