"""One factored CLAIR solve in a fresh process: total time (compile included) and peak RSS.

Usage: ``python benchmarks/factored_run.py M N K Q [RANK] [FRACTION]``; prints one JSON line.
Run in a subprocess so ``ru_maxrss`` is the peak of this solve alone.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def make_lora_problem(m: int, n: int, num_clients: int, q: int, rank: int, fraction: float,
                      noise: float = 0.05, seed: int = 0):
  """LoRA factors: benign ``A_k = U C_k + noise`` (``m x q``), contaminated ``A_k`` random.

  ``B_k`` is Gaussian ``q x n`` / sqrt(n) for every client; the dense stack is never formed.
  Returns ``(left (K, m, q), right (K, q, n), contaminated (K,))`` as NumPy float32.
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.standard_normal((m, rank)))[0]
  left = (np.einsum("mr,krq->kmq", basis, rng.standard_normal((num_clients, rank, q)))
          + noise * rng.standard_normal((num_clients, m, q)) / np.sqrt(m) * np.sqrt(rank))
  bad = np.zeros(num_clients, bool)
  bad[rng.permutation(num_clients)[: int(round(fraction * num_clients))]] = True
  scale = np.sqrt(rank / m)
  left[bad] = rng.standard_normal((int(bad.sum()), m, q)) * scale
  right = rng.standard_normal((num_clients, q, n)) / np.sqrt(n)
  return left.astype(np.float32), right.astype(np.float32), bad


def main(argv):
  m, n, num_clients, q = (int(a) for a in argv[:4])
  rank = int(argv[4]) if len(argv) > 4 else 4
  fraction = float(argv[5]) if len(argv) > 5 else 0.2
  import jax
  import numpy as np
  import clair_jax
  left, right, bad = make_lora_problem(m, n, num_clients, q, rank, fraction)
  start = time.perf_counter()
  factored = clair_jax.FactoredUpdates(jax.numpy.asarray(left), jax.numpy.asarray(right))
  result = clair_jax.clair(factored, rank)
  flagged = np.asarray(result.contaminated)
  total = time.perf_counter() - start
  start = time.perf_counter()
  again = clair_jax.clair(factored, rank)
  np.asarray(again.contaminated)
  steady = time.perf_counter() - start
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({
      "m": m, "n": n, "K": num_clients, "q": q, "rank": rank, "fraction": fraction,
      "total_s_with_compile": total, "second_call_s": steady,
      "peak_rss_gb": peak_kib / 1024**2, "exact_detection": bool((flagged == bad).all()),
      "flagged": int(flagged.sum()), "true_contaminated": int(bad.sum()),
      "solver_steps": int(result.solver_steps), "trim_steps": int(result.trim_steps),
      "status": result.status_name, "dense_gb_would_be": num_clients * m * n * 4 / 1e9,
  }))


if __name__ == "__main__":
  main(sys.argv[1:])
