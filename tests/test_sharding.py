"""Clients sharded on 4 host devices: same answer, outputs stay sharded, no big gather.

``--xla_force_host_platform_device_count`` must be set before JAX is imported, so the
check runs in a subprocess and the rest of the suite keeps one device. The subprocess
inherits the suite's persistent compilation cache (``tests/conftest.py`` sets it in the
environment).

One problem, at m = 128: the size at which jaxlib's batched LAPACK kernels, two at once,
deadlocked the 2-thread pool (the client spectra and the consensus SVDs before they were
merged), and at which "auto" runs the warm-started subspace SVT with its Gram fallback
(the exact step the sharded solver takes while the basis is saturated, on the first
steps). Two compiles: the sharded program and the one-device reference.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, math, re, sys
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import clair_jax
from clair_jax._src import estimator
from clair_jax._src import validate
from problems import make_problem

K, M, N, R = 16, 128, 16, 3
problem = make_problem(num_clients=K, m=M, n=N, rank=R, fraction=0.25, noise=0.05, seed=3)
mesh = Mesh(np.array(jax.devices()), ("clients",))
sharding = NamedSharding(mesh, P("clients"))
updates = jax.device_put(jnp.asarray(problem.updates), sharding)
sharded = clair_jax.clair(updates, R)
single = clair_jax.clair(jnp.asarray(problem.updates), R, svt_method="gram")

# The program clair() ran for the sharded input (gather=False: no SVD fallback): the same
# arguments clair() passes, so this is the executable above (a cache hit), not a new one.
opts = estimator.ClairOptions()
weights = validate.check_client_weights(None, K, updates.dtype)
static, values = estimator.split_options(opts)
hlo = estimator._clair_compiled.lower(updates, weights, values, R, static,
                                      False).compile().as_text()
def elements(line):
  found = re.search(r"= \(?\w+\[([\d,]*)\]", line)
  return math.prod(int(d) for d in found.group(1).split(",") if d) if found else 0
collectives = [l for l in hlo.splitlines()
               if re.search(r" (all-gather|all-reduce|all-to-all|collective-permute)\(", l)]
print(json.dumps({
    "devices": jax.device_count(),
    "dense_elements": int(np.prod(problem.updates.shape)),
    "max_collective_elements": max(elements(l) for l in collectives),
    "gram_all_reduce": any("all-reduce" in l and f"f32[{M},{M}]" in l for l in collectives),
    "contaminated": np.asarray(sharded.contaminated).tolist(),
    "truth": problem.contaminated.tolist(),
    "single_contaminated": np.asarray(single.contaminated).tolist(),
    "subspace_gap": float(np.abs(np.asarray(sharded.subspace @ sharded.subspace.T)
                                 - np.asarray(single.subspace @ single.subspace.T)).max()),
    "refined_gap": float(np.abs(np.asarray(sharded.refined) - np.asarray(single.refined)).max()),
    "refined_scale": float(np.abs(problem.updates).max()),
    "refined_spec": str(sharded.refined.sharding.spec),
    "low_rank_spec": str(sharded.low_rank.sharding.spec),
    "refined_devices": len(sharded.refined.sharding.device_set),
}))
'''


@pytest.mark.slow
def test_sharded_clients_match_one_device_and_stay_sharded():
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""),
                               "--xla_force_host_platform_device_count=4"]).strip()
  tests_dir = pathlib.Path(__file__).parent
  env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), env.get("PYTHONPATH", "")])
  run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(run.stdout.strip().splitlines()[-1])
  assert report["devices"] == 4
  assert report["contaminated"] == report["single_contaminated"] == report["truth"]
  assert report["subspace_gap"] < 1e-5
  assert report["refined_gap"] < 1e-5 * report["refined_scale"]
  # Per-client outputs stay sharded on the client axis, over all four devices.
  for key in ("refined_spec", "low_rank_spec"):   # "P('clients',)" or "PartitionSpec(...)"
    assert report[key].removeprefix("PartitionSpec").removeprefix("P").startswith("('clients'")
  assert report["refined_devices"] == 4
  # No collective moves the (K, m, n) array; the m x m Gram is all-reduced.
  assert report["max_collective_elements"] < report["dense_elements"]
  assert report["gram_all_reduce"]
