"""clair_jax: robust federated low-rank update aggregation (CLAIR) in JAX."""

from clair_jax._src.subspace import fit_subspace
from clair_jax._src.subspace import project_onto_subspace
from clair_jax._src.subspace import stack_clients
from clair_jax._src.subspace import unstack_clients

__version__ = "0.1.0"

__all__ = (
    "fit_subspace",
    "project_onto_subspace",
    "stack_clients",
    "unstack_clients",
)
