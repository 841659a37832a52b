"""Regenerates benchmarks/RESULTS.md and benchmarks/scaling.png: ``python benchmarks/run_all.py``.

Times, in one process, ``clair_jax.clair`` against the NumPy/SciPy port of the same
algorithm (``numpy_reference.py``), the dense per-iteration cost against one Gram GEMM,
dense vs Gram vs factored solves, the robust baselines, scaling in ``K`` and ``m``, and
(in subprocesses, for peak memory) the factored ``4096 x 4096`` LoRA problems.
Compile time is reported apart; steady state is the median of >= 5 runs (``--quick``:
fewer runs, smaller sizes, no factored 4096 runs; a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax
from clair_jax._src import solver
from clair_jax._src import threads
from clair_jax._src import subspace

HERE = pathlib.Path(__file__).resolve().parent
# benchmarks/bench_adapters.py owns this block of RESULTS.md; a rewrite here carries it over.
ADAPTERS_BEGIN, ADAPTERS_END = "<!-- adapters:begin -->", "<!-- adapters:end -->"


def adapters_block(path: pathlib.Path) -> str:
  """The whole-model adapters section of the current RESULTS.md, markers included."""
  text = path.read_text() if path.exists() else ""
  start, end = text.find(ADAPTERS_BEGIN), text.find(ADAPTERS_END)
  if start < 0 or end < start:
    return (f"{ADAPTERS_BEGIN}\n(not measured yet: `python benchmarks/bench_adapters.py`)\n"
            f"{ADAPTERS_END}")
  return text[start:end + len(ADAPTERS_END)]
sys.path.insert(0, str(HERE))
import numpy_reference  # noqa: E402  pylint: disable=wrong-import-position


def machine() -> dict:
  model = "unknown"
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": model, "nproc": os.cpu_count(), "load_avg": os.getloadavg(),
          "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "OMP/OPENBLAS threads": os.environ.get("OPENBLAS_NUM_THREADS", "default (nproc)")}


def make_dense(num_clients, m, n, rank=4, fraction=0.2, noise=0.05, seed=0):
  """Benign ``U W_k + noise``; 20% contaminated split half random, half coherent."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.standard_normal((m, rank)))[0]
  updates = np.einsum("mr,krn->kmn", basis, rng.standard_normal((num_clients, rank, n)))
  updates += noise * rng.standard_normal(updates.shape)
  bad = np.zeros(num_clients, bool)
  bad[rng.permutation(num_clients)[: int(round(fraction * num_clients))]] = True
  idx = np.flatnonzero(bad)
  typical = np.median(np.linalg.norm(updates, axis=(1, 2)))
  half = len(idx) // 2
  updates[idx[:half]] = rng.standard_normal((half, m, n)) * typical / np.sqrt(m * n)
  other = np.linalg.qr(rng.standard_normal((m, rank)))[0]
  updates[idx[half:]] = np.einsum("mr,krn->kmn", other,
                                  rng.standard_normal((len(idx) - half, rank, n)))
  updates[idx[half:]] += noise * rng.standard_normal((len(idx) - half, m, n))
  return updates.astype(np.float32), basis, bad


def timed(fn, repeats):
  """(first call seconds, median of ``repeats`` further calls, last output)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), out


def sin_theta(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b @ (b.T @ a), 2))


# Pause before each timed call of the interleaved pairs: OpenBLAS's worker threads keep
# spinning for a while after a NumPy call, and a JAX call started straight after competes
# with them for the 2 cores (measured on the target problem: 125 ms straight after the
# NumPy port, 87 ms after a 0.2 s pause, 84-109 ms alone).
PAUSE_S = 0.1


def jax_vs_numpy(num_clients, m, n, rank, repeats, numpy_repeats):
  updates, basis, bad = make_dense(num_clients, m, n, rank)
  x = jnp.asarray(updates)
  # The NumPy port implements the paper's refine (projection), so both sides run that.
  start = time.perf_counter()
  result = jax.block_until_ready(clair_jax.clair(x, rank, refine="projection"))
  first = time.perf_counter() - start
  # Interleaved (one JAX call, one NumPy call, ...): the shared cores' load moves both.
  # The NumPy port's LAPACK is SciPy's OpenBLAS, which importing clair_jax sets to one
  # thread (clair_jax/_src/threads.py); it is also timed at OpenBLAS's default (a thread
  # per core, what the port got before that limit) to show what the limit changes.
  jax_times, ref_times, ref_default_times, ref = [], [], [], None
  for _ in range(max(repeats, numpy_repeats)):
    time.sleep(PAUSE_S)
    start = time.perf_counter()
    result = jax.block_until_ready(clair_jax.clair(x, rank, refine="projection"))
    jax_times.append(time.perf_counter() - start)
    time.sleep(PAUSE_S)
    start = time.perf_counter()
    ref = numpy_reference.clair_numpy(updates, rank)
    ref_times.append(time.perf_counter() - start)
    threads.limit_lapack_threads(os.cpu_count() or 1)
    try:
      time.sleep(PAUSE_S)
      start = time.perf_counter()
      numpy_reference.clair_numpy(updates, rank)
      ref_default_times.append(time.perf_counter() - start)
    finally:
      threads.limit_lapack_threads(1)
  steady, numpy_s = statistics.median(jax_times), statistics.median(ref_times)
  numpy_default_s = statistics.median(ref_default_times)
  ratios = sorted(r / j for r, j in zip(ref_times, jax_times))
  return {
      "K": num_clients, "m": m, "n": n, "rank": rank,
      "jax_first_call_s": first, "jax_compile_s": first - steady, "jax_steady_s": steady,
      "numpy_s": numpy_s, "speedup": numpy_s / steady,
      "numpy_openblas_default_threads_s": numpy_default_s,
      "speedup_vs_default_threads": numpy_default_s / steady,
      "speedup_per_pair_min_max": [ratios[0], ratios[-1]], "pairs": len(ratios),
      "same_detection": bool(np.array_equal(np.asarray(result.contaminated), ref.contaminated)),
      "exact_detection": bool(np.array_equal(np.asarray(result.contaminated), bad)),
      "subspace_sin_theta_jax_vs_numpy": sin_theta(result.subspace, ref.subspace),
      "subspace_sin_theta_vs_truth": sin_theta(result.subspace, basis),
      "solver_steps_jax": int(result.solver_steps), "solver_steps_numpy": ref.solver_steps,
  }


def step_vs_gemm(num_clients, m, n, repeats):
  """Per-iteration cost of the dense solver against one Gram GEMM of the same shape.

  ``step_s``: one ``decomposition_step`` (default ``svt_method="auto"``) at the solver's
  steady state, i.e. from the iterate ``clair`` converges to with its own weights.
  ``mean_step_s``: a whole ``solve_decomposition`` divided by its steps (includes the
  transient steps whose SVT falls back to the full ``eigh``). The GEMM is the faster of
  ``einsum('kmn,kpn->mp')`` on client blocks and ``X X^T`` on the column layout.
  """
  updates, _, _ = make_dense(num_clients, m, n)
  scale = float(np.median(np.linalg.norm(updates, axis=(1, 2))))
  x = jnp.asarray(updates) / scale
  result = clair_jax.clair(jnp.asarray(updates), 4)
  lam_l = jnp.asarray(float(result.lam_low_rank) / scale, jnp.float32)
  lam_s = jnp.full((num_clients,), float(result.lam_sparse) / scale, jnp.float32)
  columns = solver.to_columns(x)
  step = jax.jit(lambda s, c: solver.decomposition_step(s, c, lam_l, lam_s))
  state = solver.init_decomposition(columns, lam_l, lam_s, solver.basis_width(x.shape))
  for _ in range(int(result.solver_steps)):
    state = step(state, columns)
  state = jax.block_until_ready(state)
  gemm_blocks = jax.jit(lambda a: jnp.einsum("kmn,kpn->mp", a, a))
  gemm_columns = jax.jit(subspace.gram_of)
  solve = jax.jit(lambda a, lam_l, lam_s: solver.solve_decomposition(a, lam_l, lam_s))
  steps = int(solve(x, lam_l, lam_s).num_steps)
  rows = []
  for _ in range(3):   # interleaved, side by side
    rows.append((timed(lambda: step(state, columns), repeats)[1],
                 min(timed(lambda: gemm_blocks(x), repeats)[1],
                     timed(lambda: gemm_columns(columns), repeats)[1]),
                 timed(lambda: solve(x, lam_l, lam_s), max(3, repeats // 4))[1]))
  step_s, gemm_s, solve_s = (statistics.median(r[i] for r in rows) for i in range(3))
  return {"K": num_clients, "m": m, "n": n, "svt_width": solver.basis_width(x.shape),
          "step_s": step_s, "gram_gemm_s": gemm_s, "ratio": step_s / gemm_s,
          "solve_steps": steps, "mean_step_s": solve_s / steps,
          "mean_ratio": solve_s / steps / gemm_s}


def dense_gram_factored(num_clients, m, n, q, rank, repeats):
  """The same LoRA problem solved dense (auto / svd / gram SVT) and factored."""
  sys.path.insert(0, str(HERE))
  from factored_run import make_lora_problem
  left, right, bad = make_lora_problem(m, n, num_clients, q, rank, 0.2)
  factored = clair_jax.FactoredUpdates(jnp.asarray(left), jnp.asarray(right))
  dense = jax.block_until_ready(factored.dense())
  rows = []
  runs = [("dense, svt auto", lambda: clair_jax.clair(dense, rank)),
          ("dense, svt svd", lambda: clair_jax.clair(dense, rank, svt_method="svd")),
          ("dense, svt gram", lambda: clair_jax.clair(dense, rank, svt_method="gram")),
          ("factored (reduced weights)", lambda: clair_jax.clair(factored, rank)),
          ("factored, dense_weights=True",
           lambda: clair_jax.clair_factored(factored, rank, dense_weights=True))]
  for name, fn in runs:
    first, steady, result = timed(fn, repeats)
    rows.append({"method": name, "first_call_s": first, "steady_s": steady,
                 "exact_detection": bool(np.array_equal(np.asarray(result.contaminated), bad)),
                 "solver_steps": int(result.solver_steps)})
  return {"K": num_clients, "m": m, "n": n, "q": q, "rank": rank, "rows": rows}


def baselines_at(num_clients, m, n, rank, repeats):
  try:
    from clair_jax import baselines
  except ImportError:
    return []
  updates, _, bad = make_dense(num_clients, m, n, rank)
  x = jnp.asarray(updates)
  num_bad = int(bad.sum())
  runs = [("clair", lambda: clair_jax.clair(x, rank).refined)]
  for name, fn in [("fedavg", lambda: baselines.fedavg(x)),
                   ("coordinate_median", lambda: baselines.coordinate_median(x)),
                   ("trimmed_mean", lambda: baselines.trimmed_mean(x)),
                   ("multi_krum", lambda: baselines.multi_krum(x, num_bad)),
                   ("geometric_median", lambda: baselines.geometric_median(x))]:
    runs.append((name, fn))
  rows = []
  for name, fn in runs:
    try:
      first, steady, _ = timed(fn, repeats)
      rows.append({"method": name, "first_call_s": first, "steady_s": steady})
    except Exception as error:  # pylint: disable=broad-except
      rows.append({"method": name, "error": repr(error)[:120]})
  return rows


# A first call this much above the steady state compiled; less means the shape was
# compiled earlier in the run (the target problem), which the tables say.
COMPILED_ABOVE_S = 0.5


def shown_compile(row):
  """``compile_s`` of a scaling row, or ``None`` where the shape was compiled earlier."""
  return row["compile_s"] if row["compile_s"] > COMPILED_ABOVE_S else None


def scaling(sizes, fixed, repeats):
  rows = []
  for num_clients, m, n in sizes:
    updates, _, bad = make_dense(num_clients, m, n)
    x = jnp.asarray(updates)
    first, steady, result = timed(lambda x=x: clair_jax.clair(x, 4), repeats)
    rows.append({"K": num_clients, "m": m, "n": n, "compile_s": first - steady,
                 "steady_s": steady, "exact": bool(np.array_equal(
                     np.asarray(result.contaminated), bad)), "vary": fixed})
  return rows


def factored_subprocess(m, n, num_clients, q, timeout_s):
  try:
    run = subprocess.run([sys.executable, str(HERE / "factored_run.py"), str(m), str(n),
                          str(num_clients), str(q)], capture_output=True, text=True,
                         check=False, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"m": m, "n": n, "K": num_clients, "q": q,
            "error": f"did not finish within {timeout_s} s"}
  lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
  if not lines:
    return {"m": m, "n": n, "K": num_clients, "q": q, "error": run.stderr[-300:]}
  saved_path(num_clients).write_text(lines[-1])
  return json.loads(lines[-1])


def saved_path(num_clients):
  return HERE / f"factored_K{num_clients}.json"


def saved_factored(skip):
  """Earlier factored runs (``benchmarks/factored_K*.json``) not rerun this time."""
  rows = []
  for path in sorted(HERE.glob("factored_K*.json")):
    row = json.loads(path.read_text())
    if row["K"] not in skip:
      rows.append(dict(row, source=f"saved {path.name}"))
  return rows


def table(rows, keys):
  def fmt(v):
    if isinstance(v, list):
      return " - ".join(fmt(x) for x in v)
    return f"{v:.3g}" if isinstance(v, float) else str(v)
  out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  out += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
  return "\n".join(out)


def plot(k_rows, m_rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for ax, rows, key in ((axes[0], k_rows, "K"), (axes[1], m_rows, "m")):
    ax.loglog([r[key] for r in rows], [r["steady_s"] for r in rows], "o-", label="steady")
    compiled = [r for r in rows if shown_compile(r) is not None]
    ax.loglog([r[key] for r in compiled], [r["compile_s"] for r in compiled], "s--",
              label="compile")
    # The sizes themselves as ticks (log-scale minor labels overlap).
    ax.set_xticks([r[key] for r in rows], [str(r[key]) for r in rows])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(key)
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  axes[0].set_title("clair_jax, m=256, n=32")
  axes[1].set_title("clair_jax, K=64, n=32")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="smoke run, small sizes")
  parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
  parser.add_argument("--factored-clients", default="64,512",
                      help="K values of the factored 4096 x 4096 runs")
  parser.add_argument("--factored-timeout", type=float, default=1800.0)
  parser.add_argument("--render-only", action="store_true",
                      help="rewrite RESULTS.md from the RESULTS.json of the last run")
  args = parser.parse_args(argv)
  if args.render_only:
    out = pathlib.Path(args.out)
    report = json.loads(out.with_suffix(".json").read_text())
    plot(report["scaling_K"], report["scaling_m"], out.with_name("scaling.png"))
    out.write_text(render(report, "scaling.png", quick=False) + "\n" + adapters_block(out) + "\n")
    print(out.read_text())
    return
  quick = args.quick
  repeats = 2 if quick else 5
  info = machine()
  report = {"machine": info}
  target = (16, 32, 8) if quick else (64, 256, 32)
  report["target"] = jax_vs_numpy(*target, rank=4, repeats=repeats,
                                  numpy_repeats=1 if quick else 9)
  # The same comparison one size down and one up (fewer pairs: NumPy takes ~3 s a call
  # at the large size).
  other_sizes = [(8, 16, 8)] if quick else [(16, 64, 16), (128, 512, 32)]
  report["jax_vs_numpy_sizes"] = sorted(
      [jax_vs_numpy(*size, rank=4, repeats=repeats, numpy_repeats=1 if quick else 5)
       for size in other_sizes] + [report["target"]], key=lambda row: row["m"])
  report["step_vs_gemm"] = [step_vs_gemm(*s, repeats=3 if quick else 20)
                            for s in ([(16, 32, 8)] if quick else [(64, 256, 32), (64, 512, 64)])]
  report["dense_gram_factored"] = dense_gram_factored(
      *((8, 32, 24, 4) if quick else (32, 256, 256, 8)), rank=2, repeats=repeats)
  report["baselines"] = baselines_at(*target, rank=4, repeats=repeats)
  k_sizes = [(8, 32, 8), (16, 32, 8)] if quick else [(k, 256, 32) for k in (16, 32, 64, 128, 256)]
  m_sizes = [(8, 16, 8), (8, 32, 8)] if quick else [(64, m, 32) for m in (64, 128, 256, 512)]
  report["scaling_K"] = scaling(k_sizes, "K", repeats)
  report["scaling_m"] = scaling(m_sizes, "m", repeats)
  report["factored"] = [] if quick else [
      factored_subprocess(4096, 4096, int(k), 16, args.factored_timeout)
      for k in args.factored_clients.split(",") if k]
  if not quick:
    report["factored"] += saved_factored({r["K"] for r in report["factored"]})
  report["machine"]["load_avg_end"] = os.getloadavg()
  out = pathlib.Path(args.out)
  png = out.with_name("scaling_quick.png" if quick else "scaling.png")
  plot(report["scaling_K"], report["scaling_m"], png)
  out.with_suffix(".json").write_text(json.dumps(report, indent=1))
  out.write_text(render(report, png.name, quick) + "\n" + adapters_block(out) + "\n")
  print(out.read_text())


def render(report, png_name, quick):
  info, target = report["machine"], report["target"]
  lines = [
      "# clair_jax benchmarks",
      "",
      "Regenerate: `python benchmarks/run_all.py` (writes this file, `RESULTS.json` and "
      "`scaling.png`; `--quick` is a smoke run).",
      "",
      "**No GPU was lent to this session**: every number is CPU "
      f"({info['cpu']}, nproc={info['nproc']}, backend {info['backend']}), jax "
      f"{info['jax']}, numpy {info['numpy']}, Python {info['python']}; BLAS/XLA threads: "
      f"default (= nproc). The 2 cores are shared with other jobs: load average at start "
      f"{[round(v, 2) for v in info['load_avg']]}, at end "
      f"{[round(v, 2) for v in info['load_avg_end']]}, so absolute times are noisy; "
      "medians of repeated runs, JAX and NumPy interleaved in the same process.",
      "" if not quick else "\n*Quick smoke run: sizes are NOT the targets.*",
      "## Target: clair_jax vs NumPy/SciPy, same algorithm",
      "",
      f"K={target['K']}, m={target['m']}, n={target['n']}, rank {target['rank']}, 20% "
      "contaminated (half random, half a coherent group). NumPy = `numpy_reference.py` "
      "(same normalisation, starts, trimming, FISTA on L with S minimised out + continuation "
      "+ restart, thresholds; "
      "einsums through BLAS; exact SVT and fits by full LAPACK eigh, where clair_jax uses a "
      "warm-started subspace iteration with an exact fallback).",
      "",
      "Timed in interleaved pairs (one JAX call, one NumPy call, each after a "
      f"{PAUSE_S:g} s pause so neither starts while the other's BLAS threads still spin); "
      "`speedup` is the ratio of the medians, `speedup_per_pair_min_max` the range of the "
      "per-pair ratios. Both sides run LAPACK on one OpenBLAS thread (importing clair_jax "
      "sets SciPy's OpenBLAS, which the NumPy port's `scipy.linalg` and jaxlib's kernels "
      "share, to one thread: `clair_jax/_src/threads.py`). `numpy_openblas_default_threads_s`"
      " times the port a third time in each round with that OpenBLAS at its default (a "
      "thread per core), the configuration earlier versions of this file measured; on "
      "these 2 shared cores its small `eigh`/`svd` calls are many times slower there, so "
      "`speedup_vs_default_threads` is the old, inflated ratio.",
      "",
      table([target], ["jax_compile_s", "jax_steady_s", "numpy_s", "speedup",
                       "numpy_openblas_default_threads_s", "speedup_vs_default_threads",
                       "speedup_per_pair_min_max", "pairs", "same_detection",
                       "exact_detection", "subspace_sin_theta_jax_vs_numpy",
                       "subspace_sin_theta_vs_truth", "solver_steps_jax",
                       "solver_steps_numpy"]),
      "",
      "The same comparison at a smaller and a larger size (same generator, 20% "
      "contaminated; the target row is the one above). At the large size both sides spend "
      "most of their time in GEMMs (the NumPy port's m x m Gram and apply, clair_jax's "
      "thin products), so the ratio there is mostly one of flop counts.",
      "",
      table(report.get("jax_vs_numpy_sizes", []),
            ["K", "m", "n", "jax_compile_s", "jax_steady_s", "numpy_s", "speedup",
             "numpy_openblas_default_threads_s", "speedup_vs_default_threads",
             "speedup_per_pair_min_max", "pairs", "same_detection", "exact_detection",
             "subspace_sin_theta_jax_vs_numpy"]),
      "",
      "## Dense per-iteration time vs one Gram GEMM (side by side)",
      "",
      "`step_s`: one `decomposition_step` at the solver's steady state (clair's own weights; "
      "SVT from the warm-started subspace iteration: three thin GEMMs, a thin QR and an "
      "s x s SVD for float32-accurate Ritz values, no m x m eigh) against one Gram GEMM "
      "`X X^T` of the same shape (`ratio`). "
      "`mean_step_s`: a whole solve divided by its steps (`mean_ratio`), including the "
      "steps whose SVT falls back to the full Gram eigh (where the continuation ends and new "
      "directions enter L, the power steps cannot converge in time) and the first steps "
      "from the cold start.",
      "",
      table(report["step_vs_gemm"], ["K", "m", "n", "svt_width", "step_s", "gram_gemm_s",
                                     "ratio", "solve_steps", "mean_step_s", "mean_ratio"]),
      "",
      "## Dense vs Gram vs factored (same LoRA problem)",
      "",
      "K={K}, m={m}, n={n}, LoRA rank q={q}, shared rank {rank}.".format(
          **report["dense_gram_factored"]),
      "",
      table(report["dense_gram_factored"]["rows"],
            ["method", "first_call_s", "steady_s", "exact_detection", "solver_steps"]),
      "",
      "## Factored m = n = 4096, LoRA rank 16 (fresh subprocess; peak = ru_maxrss)",
      "",
      "K values come from `--factored-clients` (default `64,512`). At K=512 the reduced "
      "problem is 4096 x 8192 (p = min(m, K q) = m) and L holds ~9% of m directions (the "
      "shrunk residuals of the contaminated clients; 88 of 1024 measured at K=128); "
      "the solver's SVT runs the "
      "warm-started subspace iteration on a 512-column basis (min(m/8, 512)), the trimming "
      "fits on a narrow one (a full 4096 x 4096 eigh takes ~18 s on these cores). A K "
      "missing below did not finish in the regenerating run.",
      "",
      table(report["factored"], ["K", "q", "total_s_with_compile", "second_call_s",
                                 "peak_rss_gb", "exact_detection", "solver_steps", "status",
                                 "dense_gb_would_be", "source", "error"]),
      "",
      "## Robust baselines (same target problem)",
      "",
      table(report["baselines"], ["method", "first_call_s", "steady_s", "error"]),
      "",
      "## Scaling",
      "",
      f"![scaling]({png_name})",
      "",
      "`compile_s`: first call minus steady state; \"cached\" where the shape (the target "
      "problem's) was compiled earlier in the run.",
      "",
      table([dict(r, compile_s=shown_compile(r) or "cached")
             for r in report["scaling_K"] + report["scaling_m"]],
            ["vary", "K", "m", "n", "compile_s", "steady_s", "exact"]),
      "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
