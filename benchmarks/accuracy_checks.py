"""Prints the estimator's accuracy figures (issue 2's acceptance lines) on generated data.

    python benchmarks/accuracy_checks.py [--seeds 5]

For each scenario and seed: exact detection, ||sin Theta(U_hat, U)||_2 (spectral), and the
benign estimation error of CLAIR over the oracle's (subspace fitted on the true benign set)
and over the local estimates'. Everything runs in float32 with default options.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

import clair_jax
from clair_jax import baselines, metrics, synthetic

K, M, N, RANK = 40, 64, 16, 4


def tight_noisy_problem(key, fraction, attack, noise, ratio=2.0):
  """Contaminated off-subspace norm exactly ``ratio`` x a benign block's noise norm."""
  problem = synthetic.make_problem(key, num_clients=K, m=M, n=N, rank=RANK, fraction=fraction,
                                   attack=attack, noise=noise)
  basis = problem.subspace
  raw = problem.updates
  in_space = jnp.einsum("mr,pr,kpn->kmn", basis, basis, raw)
  off = raw - in_space
  off_norm = jnp.linalg.norm(off, axis=(1, 2), keepdims=True)
  target = ratio * noise * np.sqrt(M * N)
  attacked = in_space + target * off / off_norm
  updates = jnp.where(problem.contaminated[:, None, None], attacked, raw)
  return problem._replace(updates=updates)


def evaluate(problem):
  result = clair_jax.clair(problem.updates, RANK)
  benign = ~problem.contaminated
  oracle = baselines.oracle(problem.updates, benign, RANK).estimates
  error = lambda x: float(metrics.benign_error(x, problem.truth, benign))
  return (bool(jnp.all(result.contaminated == problem.contaminated)),
          float(metrics.subspace_error(result.subspace, problem.subspace)),
          error(result.refined), error(oracle), error(problem.updates))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seeds", type=int, default=5)
  args = parser.parse_args()
  print(f"clair_jax {clair_jax.__version__}, jax {jax.__version__}, "
        f"{jax.default_backend()} ({platform.processor() or platform.machine()}); "
        f"K={K}, m={M}, n={N}, rank={RANK}, float32, {args.seeds} seeds\n")
  scenarios = []
  for attack in ("random", "coherent"):
    for fraction in (0.1, 0.25, 0.4):
      scenarios.append((f"noiseless {attack} {fraction:.0%}",
                        lambda key, a=attack, f=fraction: synthetic.make_problem(
                            key, num_clients=K, m=M, n=N, rank=RANK, fraction=f, attack=a,
                            noise=0.0)))
  for attack in ("random", "coherent"):
    for fraction in (0.1, 0.25, 0.4):
      scenarios.append((f"noisy {attack} {fraction:.0%} (off = 2x noise)",
                        lambda key, a=attack, f=fraction: tight_noisy_problem(
                            key, f, a, noise=0.1)))
  for boost in (2.0, 4.0):
    scenarios.append((f"coherent 30% at {boost:.0f}x norms",
                      lambda key, b=boost: synthetic.make_problem(
                          key, num_clients=K, m=M, n=N, rank=RANK, fraction=0.3,
                          attack="coherent", attack_scale=b, noise=0.1)))
  print("| scenario | exact detection | max sin Theta | max CLAIR/oracle error "
        "| max CLAIR/local error |")
  print("|---|---|---|---|---|")
  for name, make in scenarios:
    rows = [evaluate(make(jax.random.PRNGKey(seed))) for seed in range(args.seeds)]
    exact, sines, clair_err, oracle_err, local_err = map(np.array, zip(*rows))
    if oracle_err.max() < 1e-8:  # noiseless: both at float32 round-off, a ratio means nothing
      vs_oracle = f"both < 1e-8 (max {clair_err.max():.1e})"
    else:
      vs_oracle = f"{(clair_err / oracle_err).max():.4f}"
    vs_local = f"{(clair_err / local_err).max():.3f}" if local_err.min() > 1e-8 else "n/a"
    print(f"| {name} | {exact.sum()}/{len(exact)} | {sines.max():.2e} | {vs_oracle} "
          f"| {vs_local} |")


if __name__ == "__main__":
  main()
