"""Clients sharded on 4 host devices: same answer, outputs stay sharded, no big gather.

``--xla_force_host_platform_device_count`` must be set before JAX is imported, so the
check runs in a subprocess and the rest of the suite keeps one device.
"""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = r'''
import json, math, re, sys
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import clair_jax
from clair_jax._src import estimator
from problems import make_problem

problem = make_problem(num_clients=16, m=24, n=12, rank=3, fraction=0.25, noise=0.05, seed=3)
mesh = Mesh(np.array(jax.devices()), ("clients",))
sharding = NamedSharding(mesh, P("clients"))
updates = jax.device_put(jnp.asarray(problem.updates), sharding)
sharded = clair_jax.clair(updates, 3)
single = clair_jax.clair(jnp.asarray(problem.updates), 3, svt_method="gram")

def wide_report():
  # m = 128: the sizes at which jaxlib's batched LAPACK kernels, two at once, deadlocked
  # the 2-thread pool (the client spectra and the consensus SVDs before they were merged).
  wide = make_problem(num_clients=16, m=128, n=16, rank=3, fraction=0.25, noise=0.05, seed=3)
  result = clair_jax.clair(jax.device_put(jnp.asarray(wide.updates), sharding), 3)
  alone = clair_jax.clair(jnp.asarray(wide.updates), 3, svt_method="gram")
  return {"contaminated": np.asarray(result.contaminated).tolist(),
          "single_contaminated": np.asarray(alone.contaminated).tolist(),
          "truth": wide.contaminated.tolist(),
          "subspace_gap": float(np.abs(np.asarray(result.subspace @ result.subspace.T)
                                       - np.asarray(alone.subspace @ alone.subspace.T)).max())}

# What clair() compiles for sharded input (gather=False: no SVD fallback).
weights = jax.device_put(jnp.ones(16, jnp.float32), sharding)
hlo = estimator._clair_jit.lower(updates, weights, 3, estimator.ClairOptions(),
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
    "gram_all_reduce": any("all-reduce" in l and "f32[24,24]" in l for l in collectives),
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
    "wide": wide_report(),
}))
'''


def test_sharded_clients_match_one_device_and_stay_sharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
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
  wide = report["wide"]
  assert wide["contaminated"] == wide["single_contaminated"] == wide["truth"]
  assert wide["subspace_gap"] < 1e-5
