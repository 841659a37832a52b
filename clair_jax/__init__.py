"""clair_jax: robust federated low-rank update aggregation (CLAIR) in JAX."""

import warnings as _warnings

from clair_jax._src import threads as _threads

try:  # jaxlib's CPU LAPACK on one OpenBLAS thread (see clair_jax._src.threads)
  _threads.limit_lapack_threads()
except ValueError as _error:
  _warnings.warn(str(_error), stacklevel=2)

from clair_jax._src.estimator import ClairOptions
from clair_jax._src.estimator import ClairResult
from clair_jax._src.estimator import DetectionOptions
from clair_jax._src.estimator import RefineOptions
from clair_jax._src.estimator import SolverOptions
from clair_jax._src.estimator import WeightOptions
from clair_jax._src.api import clair
from clair_jax._src.estimator import estimate_rank
from clair_jax._src.factored import FactoredUpdates
from clair_jax._src.factored import clair_factored
from clair_jax._src.factored import from_flax_lora
from clair_jax._src.factored import from_peft_lora
from clair_jax._src.prox import prox_group_lasso
from clair_jax._src.prox import prox_group_lasso_blocks
from clair_jax._src.prox import prox_nuclear
from clair_jax._src.prox import prox_nuclear_gram
from clair_jax._src.prox import safe_norm
from clair_jax._src.refine import Refinement
from clair_jax._src.refine import choose_strength
from clair_jax._src.refine import refine_updates
from clair_jax._src.refine import refined_factors
from clair_jax._src.solver import DecompositionSolution
from clair_jax._src.solver import DecompositionState
from clair_jax._src.solver import STATUS_NAMES
from clair_jax._src.status import Status
from clair_jax._src.solver import decomposition_step
from clair_jax._src.solver import init_decomposition
from clair_jax._src.solver import solve_decomposition
from clair_jax._src.solver import sparse_part
from clair_jax._src.svt import svt_blocks
from clair_jax._src.subspace import fit_subspace
from clair_jax._src.subspace import from_columns
from clair_jax._src.subspace import project_onto_subspace
from clair_jax._src.subspace import stack_clients
from clair_jax._src.subspace import to_columns
from clair_jax._src.subspace import unstack_clients

# Public submodules (they depend on the core above, never the reverse).
from clair_jax import adapters
from clair_jax import attacks
from clair_jax import baselines
from clair_jax import metrics
from clair_jax import synthetic
from clair_jax.adapters import aggregate_adapters

__version__ = "0.1.0"

__all__ = (
    "ClairOptions",
    "ClairResult",
    "DecompositionSolution",
    "DecompositionState",
    "DetectionOptions",
    "FactoredUpdates",
    "RefineOptions",
    "STATUS_NAMES",
    "SolverOptions",
    "Status",
    "WeightOptions",
    "aggregate_adapters",
    "clair",
    "clair_factored",
    "decomposition_step",
    "estimate_rank",
    "from_flax_lora",
    "from_peft_lora",
    "init_decomposition",
    "prox_group_lasso",
    "prox_group_lasso_blocks",
    "prox_nuclear",
    "prox_nuclear_gram",
    "safe_norm",
    "Refinement",
    "choose_strength",
    "refine_updates",
    "refined_factors",
    "solve_decomposition",
    "sparse_part",
    "svt_blocks",
    "to_columns",
    "from_columns",
    "fit_subspace",
    "project_onto_subspace",
    "stack_clients",
    "unstack_clients",
    "adapters",
    "attacks",
    "baselines",
    "metrics",
    "synthetic",
)
