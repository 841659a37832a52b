r"""Real adapters in, real adapters out: whole-model CLAIR on PEFT / Flax LoRA adapters.

K clients fine-tuned the same base model with LoRA and sent their adapters (PEFT
directories, PEFT-keyed state dicts, or Flax NNX LoRA state through
:func:`from_flax_lora_state`). :func:`aggregate_adapters` reads every module's update
``Delta_jk = scaling_k * B_jk A_jk`` ``(out, in)`` in factored form (left ``scaling B``,
right ``A``; the shared subspace on the ``out`` side), and

1. runs CLAIR's detection on every module by the exact factored reduction (never a dense
   ``out x in`` update), same-shape modules batched into one compiled call (``jax.vmap``
   over modules, or ``jax.lax.map`` on the CPU; one compile per module shape and batch
   size);
2. takes one joint verdict per client from the ``(J, K)`` scores
   (:func:`joint_verdict`: geometric mean of score / threshold over modules, then an
   one-step ``median + 3 * 1.4826 * MAD`` cut over all finite clients, capped at 1);
3. refines every module with the jointly benign set, the same clients for all modules
   (the core's refine: partial pooling ``U (C_bar + s (C_k - C_bar))`` by default, or the
   projection; see :mod:`clair_jax._src.joint`).

What each client receives: every finite client, flagged or not, its own update refined with
the benign statistics, ``U_j ((1 - s_j) C_bar_j + s_j U_j^T Delta_jk)`` (flagged clients never
enter the statistics); a client with a non-finite tensor (or an update norm that overflows
float32) the consensus ``U_j C_bar_j``. Such a client is flagged with score ``+inf`` and is
left out of every computation, so the other clients' results are exactly those without it.

Output adapters stay LoRA: per module the refined rank ``w_j`` (the refine's rank, at least 1)
with ``lora_B = U_j`` ``(out, w_j)``, shared by every client, and ``lora_A`` the client's
``(w_j, in)`` coefficients; the scaling is folded in, and the config says so with
``lora_alpha = r`` and ``use_rslora = false`` (scaling 1), modules of another rank listed
in ``rank_pattern`` / ``alpha_pattern`` (:func:`lora_config`).

With ``base_adapter`` (clients that continued from a global adapter), each client's update
is the delta ``s_k B_k A_k - s_0 B_0 A_0``, factored as ``[s_k B_k, -s_0 B_0] [A_k; A_0]``.
Clients of different ranks are zero-padded to the largest (zero columns of ``B``, rows of
``A``), which changes no product.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src import estimator
from clair_jax._src import joint
from clair_jax._src import solver
from clair_jax._src import validate
from clair_jax._src.adapter_io import CONFIG_NAME
from clair_jax._src.adapter_io import PICKLE_NAME
from clair_jax._src.adapter_io import WEIGHTS_NAME
from clair_jax._src.adapter_io import Adapter
from clair_jax._src.adapter_io import LoraModule
from clair_jax._src.adapter_io import as_adapter
from clair_jax._src.adapter_io import check_lora
from clair_jax._src.adapter_io import dense_delta
from clair_jax._src.adapter_io import dense_deltas
from clair_jax._src.adapter_io import file_sha256
from clair_jax._src.adapter_io import from_flax_lora_state
from clair_jax._src.adapter_io import lora_config
from clair_jax._src.adapter_io import lora_modules
from clair_jax._src.adapter_io import module_scaling
from clair_jax._src.adapter_io import pattern_value
from clair_jax._src.adapter_io import read_peft
from clair_jax._src.adapter_io import to_flax_lora_state
from clair_jax._src.adapter_io import module_update
from clair_jax._src.adapter_io import write_peft
from clair_jax._src.joint import JointVerdict
from clair_jax._src.joint import joint_verdict
from clair_jax._src.joint import robust_cut

# Working-set budget of one batched call (bytes); sets the default module batch.
MODULE_BATCH_BYTES = 1 << 30
# A client whose ||scaling B|| ||A|| reaches this cannot be represented in float32 sums of
# squares (the core would flag it as non-finite too); it is treated as non-finite.
NORM_OVERFLOW = 1e18


class AdapterAggregation(NamedTuple):
  """What :func:`aggregate_adapters` found and the adapters it returns. ``K`` clients,
  ``J`` modules.

  Attributes:
    names: ``(K,)`` client names, in the input order.
    contaminated: ``(K,)`` bool, the joint verdict (non-finite clients included).
    scores: ``(K,)`` joint scores (geometric mean over modules of score / threshold;
      ``+inf`` for non-finite clients); ``contaminated == scores > cut``.
    cut: the joint cut (at most 1).
    finite: ``(K,)`` bool, clients whose tensors are all finite (the others were left out
      and receive the consensus).
    modules: ``(J,)`` module names.
    module_scores: ``(J, K)`` per-module CLAIR scores (``+inf`` for non-finite clients).
    module_thresholds: ``(J,)`` per-module thresholds.
    module_flags: ``(J, K)`` bool, per-module verdicts.
    noise_levels: ``(J,)`` per-module noise std (per reduced degree of freedom, as
      :func:`clair_jax.clair_factored` reports it).
    status: ``(J,)`` int convex-solver status per module (``clair_jax.STATUS_NAMES``).
    refine_ranks: ``(J,)`` refined LoRA rank per module (directions the refine used; the
      written rank is ``max(rank, 1)``).
    refine_saturated: ``(J,)`` bool, more directions passed than ``refine_max_rank``.
    refined: ``{name: PEFT state dict}`` (a read-only mapping, each client's dict built on
      access from the factored result: keep the dict you need).
    consensus: PEFT state dict of the consensus ``U_j C_bar_j``.
    config: the ``adapter_config.json`` of every output adapter (scaling 1).
    rank: the detection rank.
  """

  names: tuple
  contaminated: np.ndarray
  scores: np.ndarray
  cut: float
  finite: np.ndarray
  modules: tuple
  module_scores: np.ndarray
  module_thresholds: np.ndarray
  module_flags: np.ndarray
  noise_levels: np.ndarray
  status: np.ndarray
  refine_ranks: np.ndarray
  refine_saturated: np.ndarray
  refined: Mapping
  consensus: dict
  config: dict
  rank: int

  @property
  def status_names(self) -> tuple:
    return tuple(solver.STATUS_NAMES[int(s)] for s in self.status)

  def summary(self) -> str:
    """A few human-readable lines."""
    flagged = [n for n, c in zip(self.names, self.contaminated) if c]
    return "\n".join([
        f"CLAIR on {len(self.modules)} modules: {len(flagged)} of {len(self.names)} clients "
        f"flagged: {flagged}",
        f"  joint cut {self.cut:.3g}; refined ranks {sorted(set(self.refine_ranks.tolist()))}; "
        f"solver status {sorted(set(self.status_names))}",
    ])


# --------------------------------------------------------------------------- the plan


class _Module(NamedTuple):
  """One module across clients: names, keys, dtypes and each client's scaled factors."""

  name: str
  a_key: str
  b_key: str
  shape: tuple        # (out, in)
  width: int          # q: the largest client rank (+ the base adapter's rank)
  a_dtype: np.dtype
  b_dtype: np.dtype
  clients: tuple      # per client: LoraModule
  base: LoraModule | None


def _check_same(first_name, first: dict, who: str, modules: dict) -> None:
  """Same module set and shapes (ranks may differ); errors name the client and the key."""
  for module_name, module in first.items():
    if module_name not in modules:
      raise ValueError(f"{who} lacks key {module.a_key!r} (and its lora_B) that client "
                       f"{first_name!r} has.")
  for module_name, module in modules.items():
    if module_name not in first:
      raise ValueError(f"{who} has key {module.a_key!r} that client {first_name!r} lacks.")
    reference = first[module_name]
    if module.kind != reference.kind:
      raise ValueError(f"{who}: key {module.a_key!r} is a {module.kind} factor; client "
                       f"{first_name!r} has a {reference.kind} one.")
    if module.shape != reference.shape:
      for key, x, ref_key, ref in ((module.a_key, module.lora_a, reference.a_key,
                                    reference.lora_a),
                                   (module.b_key, module.lora_b, reference.b_key,
                                    reference.lora_b)):
        axis = 1 if key == module.a_key else 0
        if x.shape[axis] != ref.shape[axis]:
          raise ValueError(f"{who}: key {key!r} has shape {x.shape}, client "
                           f"{first_name!r} has {ref.shape} (key {ref_key!r}); the "
                           f"in/out dims must agree (ranks may differ).")


def _check_configs(first_name, first: Adapter, who: str, adapter: Adapter) -> None:
  """Same ``base_model_name_or_path`` and ``fan_in_fan_out`` (when both have a config)."""
  for field in ("base_model_name_or_path", "fan_in_fan_out"):
    if first.config is None or adapter.config is None:
      continue
    mine, theirs = adapter.config.get(field), first.config.get(field)
    if field == "fan_in_fan_out":
      mine, theirs = bool(mine), bool(theirs)
    if mine != theirs:
      raise ValueError(f"{who} has {field}={mine!r} but client {first_name!r} "
                       f"has {field}={theirs!r}; all adapters must adapt the same base "
                       f"model the same way.")


def _plan(adapters: dict, base: Adapter | None) -> tuple[_Module, ...]:
  """Validates the clients against the first one and pairs every module across them."""
  names = list(adapters)
  parsed = {name: lora_modules(adapters[name], client=name) for name in names}
  first_name = names[0]
  first = parsed[first_name]
  if not first:
    raise ValueError(f"client {first_name!r} has no LoRA tensors.")
  for name in names[1:]:
    _check_configs(first_name, adapters[first_name], f"client {name!r}", adapters[name])
    _check_same(first_name, first, f"client {name!r}", parsed[name])
  base_modules = None
  if base is not None:
    _check_configs(first_name, adapters[first_name], "the base adapter", base)
    base_modules = lora_modules(base, client="base adapter")
    _check_same(first_name, first, "the base adapter", base_modules)
  plan = []
  for module_name, reference in first.items():
    per_client = tuple(parsed[name][module_name] for name in names)
    base_module = None if base_modules is None else base_modules[module_name]
    width = max(m.rank for m in per_client) + (0 if base_module is None else base_module.rank)
    plan.append(_Module(module_name, reference.a_key, reference.b_key, reference.shape, width,
                        reference.lora_a.dtype, reference.lora_b.dtype, per_client,
                        base_module))
  return tuple(plan)


def compute_dtype() -> np.dtype:
  """float32, or float64 when JAX runs with ``jax_enable_x64`` (e.g. inside
  ``with jax.enable_x64(True):``): the precision of every computation here."""
  return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _factors(module: _Module, index: int) -> tuple[np.ndarray, np.ndarray]:
  """Client ``index``'s ``left (out, q)`` and ``right (q, in)`` (:func:`compute_dtype`,
  zero-padded): ``[s_k B_k, 0, -s_0 B_0]`` and ``[A_k; 0; A_0]``."""
  out, inner = module.shape
  dtype = compute_dtype()
  left = np.zeros((out, module.width), dtype)
  right = np.zeros((module.width, inner), dtype)
  client = module.clients[index]
  left[:, :client.rank] = client.scaling * client.lora_b.astype(dtype)
  right[:client.rank] = client.lora_a.astype(dtype)
  if module.base is not None:
    rank = module.base.rank
    left[:, module.width - rank:] = -module.base.scaling * module.base.lora_b.astype(dtype)
    right[module.width - rank:] = module.base.lora_a.astype(dtype)
  return left, right


def _stack(modules, indices) -> tuple[np.ndarray, np.ndarray]:
  """``(J, K', out, q)`` and ``(J, K', q, in)`` stacks of the listed clients."""
  pairs = [[_factors(m, k) for k in indices] for m in modules]
  left = np.stack([np.stack([p[0] for p in row]) for row in pairs])
  right = np.stack([np.stack([p[1] for p in row]) for row in pairs])
  return left, right


def _usable(module: _Module, index: int) -> bool:
  """Finite factors whose update norm cannot overflow float32 sums of squares."""
  client = module.clients[index]
  a = client.lora_a.astype(np.float64)
  b = client.lora_b.astype(np.float64)
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return False
  return bool(abs(client.scaling) * np.linalg.norm(b) * np.linalg.norm(a) < NORM_OVERFLOW)


def default_module_batch(num_clients: int, shape: tuple, width: int,
                         batching: str = "vmap") -> int:
  """Modules per compiled call: as many as fit ``MODULE_BATCH_BYTES``.

  A module's working set is a few ``p x p`` Grams and eigenvectors (``p = min(out, K q)``),
  the ``K q x K q`` client kernels, the reduced blocks ``(K, p, q)`` and the refine's
  coefficients ``(K, 64, n')`` (``n' = min(in, K q)``), held a few times over; its
  stacked factors are ``(K, out + in, q)``. With ``"vmap"`` every module of the batch is
  worked on at once; with ``"map"`` one at a time, so only the factors scale with the
  batch.
  """
  out, inner = shape
  p, n_reduced = min(out, num_clients * width), min(inner, num_clients * width)
  factors = 4 * 2 * num_clients * (out + inner) * width
  working = 4 * 4 * (2 * p * p + (num_clients * width) ** 2 + num_clients * p * width
                     + num_clients * 64 * n_reduced)
  if batching == "map":
    return max(1, int((MODULE_BATCH_BYTES - working) // factors))
  return max(1, int(MODULE_BATCH_BYTES // (factors + working)))


def _batches(plan, module_batch, batching):
  """``[(modules, batch size)]``: same-shape modules in batches of a fixed size."""
  groups: dict[tuple, list] = {}
  for module in plan:
    groups.setdefault((module.shape, module.width), []).append(module)
  out = []
  for (shape, width), modules in groups.items():
    size = module_batch or default_module_batch(len(modules[0].clients), shape, width,
                                                batching)
    size = max(1, min(size, len(modules)))
    for start in range(0, len(modules), size):
      out.append((modules[start:start + size], size))
  return out


def _padded(modules, size):
  """The batch padded to ``size`` with copies of its first module (one compile per size)."""
  return list(modules) + [modules[0]] * (size - len(modules))


# --------------------------------------------------------------------------- outputs


class RefinedAdapters(Mapping):
  """``{client name: PEFT state dict}``, each built on access from the factored result.

  Client ``k``'s module ``j``: ``lora_B = U_j`` (shared), ``lora_A = (1 - s) C_bar +
  s U_j^T left_k right_k`` (:func:`clair_jax._src.joint.refined_right`), or the consensus
  ``lora_A = C_bar`` for a non-finite client; in the input's dtypes.
  """

  def __init__(self, names, plan, refinements, positions, dtype=None):
    self._dtype = dtype               # output dtype; None: each tensor's input dtype
    self._names = tuple(names)
    self._plan = plan
    self._refinements = refinements   # per module: joint.ModuleRefinement (NumPy, trimmed)
    self._positions = positions       # name -> row in the refinement, or None (non-finite)

  def __getitem__(self, name) -> dict:
    if name not in self._positions:
      raise KeyError(name)
    index = self._names.index(name)
    row = self._positions[name]
    tensors = {}
    for module, refinement in zip(self._plan, self._refinements):
      if row is None:
        lora_a = refinement.centre
      else:
        lora_a = joint.refined_right(refinement, row, _factors(module, index)[1])
      tensors[module.a_key] = np.asarray(lora_a).astype(self._dtype or module.a_dtype)
      tensors[module.b_key] = refinement.shared.astype(self._dtype or module.b_dtype)
    return tensors

  def __iter__(self):
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def _trim(refinement: joint.ModuleRefinement, index: int) -> joint.ModuleRefinement:
  """Module ``index`` of a batched refinement, as NumPy, cut to its used rank (>= 1)."""
  width = max(int(refinement.rank[index]), 1)
  return joint.ModuleRefinement(
      shared=np.asarray(refinement.shared[index][:, :width]),
      centre=np.asarray(refinement.centre[index][:width]),
      strength=np.asarray(refinement.strength[index][:width]),
      coefficients=np.asarray(refinement.coefficients[index][:, :width]),
      rank=int(refinement.rank[index]),
      noise_level=float(refinement.noise_level[index]),
      saturated=bool(refinement.saturated[index]),
  )


def _detect_all(batches, indices, rank: int, opts, batching: str, progress) -> dict:
  """``{module name: ModuleDetection}`` (NumPy) of the clients ``indices``, batch by batch."""
  weights = jnp.ones((len(indices),), compute_dtype())
  detect_opts = joint.detection_options(opts)
  detections = {}
  for done, (modules, size) in enumerate(batches, 1):
    left, right = _stack(_padded(modules, size), indices)
    found = jax.device_get(joint.detect_modules(left, right, weights, rank, detect_opts,
                                                batching=batching))
    for j, module in enumerate(modules):
      detections[module.name] = jax.tree.map(lambda x, j=j: np.asarray(x[j]), found)
    if progress is not None:
      progress("detect", done, len(batches))
  return detections


def _refine_all(batches, indices, benign, rank: int, opts, batching: str, progress) -> dict:
  """``{module name: ModuleRefinement}`` (NumPy, trimmed) with the benign set ``benign``."""
  refinements = {}
  for done, (modules, size) in enumerate(batches, 1):
    left, right = _stack(_padded(modules, size), indices)
    refined = jax.device_get(joint.refine_modules(left, right, jnp.asarray(benign), rank,
                                                  opts, batching=batching))
    for j, module in enumerate(modules):
      refinements[module.name] = _trim(refined, j)
    if progress is not None:
      progress("refine", done, len(batches))
  return refinements


# --------------------------------------------------------------------------- the API


def _check_options(options: dict) -> estimator.ClairOptions:
  opts = estimator.resolve_options(None, **options)
  if opts.side != "left":
    raise ValueError("aggregate_adapters shares the output side of every module (side='left' "
                     "for B A); side='right' would share the input side, which a common "
                     "LoRA initialisation A_0 makes look shared for every client.")
  if "contaminated_output" in options:
    raise ValueError("contaminated_output does not apply: aggregate_adapters refines every "
                     "finite client with the benign statistics (see clair_jax.adapters).")
  return opts


def _check_rank(rank, plan, num_clients: int) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive int; got {rank!r}.")
  for module in plan:
    out, inner = module.shape
    limit = min(out, num_clients * min(module.width, inner))
    if rank > limit:
      raise ValueError(f"rank={rank} exceeds the rank of module {module.name!r}'s stack, "
                       f"min(out, K*min(q, in)) = min({out}, {num_clients}*"
                       f"{min(module.width, inner)}) = {limit}.")
  return int(rank)


def aggregate_adapters(clients: Mapping, rank: int, *, base_adapter=None, dtype=None,
                       module_batch: int | None = None, batching: str | None = None,
                       progress: Callable[[str, int, int], None] | None = None,
                       **options) -> AdapterAggregation:
  """CLAIR over every LoRA module of K clients' adapters: one verdict per client, refined
  adapters out (see the module docstring for the rule and what each client receives).

  Args:
    clients: ``{name: adapter}``, each a PEFT directory path, an :class:`Adapter`, a
      ``(state_dict, config)`` pair, or a PEFT-keyed state dict (scaling 1); at least 3.
    rank: detection rank ``r`` of the shared subspace (per module).
    base_adapter: optional adapter (same forms) the clients continued from; the update is
      then the client's adapter minus it.
    dtype: dtype of the output tensors (e.g. ``"float32"`` for bfloat16 inputs, to keep the
      aggregate's precision); default ``None`` keeps each tensor's input dtype. The
      computation itself runs in float32 (float64 under ``jax.enable_x64``).
    module_batch: modules per compiled call; default from ``MODULE_BATCH_BYTES``
      (:func:`default_module_batch`).
    batching: how a call runs its modules: ``"vmap"`` (one batched program) or ``"map"``
      (``jax.lax.map``, one module after the other); default ``"map"`` on the CPU, where
      jaxlib 0.10's batched LAPACK kernels can deadlock under ``vmap``
      (:func:`clair_jax._src.joint.over_modules`), ``"vmap"`` elsewhere.
    progress: optional ``progress(stage, done, total)`` callback, ``stage`` in
      ``("detect", "refine")``, called after each batch.
    **options: fields of :class:`clair_jax.ClairOptions` (e.g. ``refine_strength``,
      ``refine="projection"``, ``threshold_ratio``); ``side`` must stay ``"left"``.

  Returns:
    :class:`AdapterAggregation`.

  Raises:
    ValueError: fewer than 3 clients (or fewer than 3 finite ones), missing files, adapters
      that are not plain LoRA, clients whose module keys, shapes, ``base_model_name_or_path``
      or ``fan_in_fan_out`` differ (naming the client and the key), a bad rank or option.

  Example:
    >>> result = aggregate_adapters({"a": "runs/a", "b": "runs/b", ...}, rank=4)
    ... # doctest: +SKIP
    >>> result.contaminated, write_peft("out/a", Adapter(result.refined["a"], result.config))
    ... # doctest: +SKIP
  """
  if not isinstance(clients, Mapping):
    raise ValueError(f"clients must map a client name to an adapter; got "
                     f"{type(clients).__name__}.")
  names = tuple(clients)
  if len(names) < validate.MIN_CLIENTS:
    raise ValueError(f"aggregate_adapters needs at least {validate.MIN_CLIENTS} clients; got "
                     f"{len(names)}.")
  opts = _check_options(options)
  out_dtype = None if dtype is None else jnp.dtype(dtype)   # jnp knows "bfloat16"
  if out_dtype is not None and not jnp.issubdtype(out_dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype or None; got {dtype!r}.")
  if module_batch is not None and (isinstance(module_batch, bool) or int(module_batch) < 1):
    raise ValueError(f"module_batch must be a positive int or None; got {module_batch!r}.")
  batching = joint.default_batching() if batching is None else batching
  if batching not in ("vmap", "map"):
    raise ValueError(f"batching must be 'vmap', 'map' or None; got {batching!r}.")
  adapters = {name: as_adapter(clients[name], client=name) for name in names}
  base = None if base_adapter is None else as_adapter(base_adapter, client="base adapter")
  plan = _plan(adapters, base)
  finite = np.array([all(_usable(m, k) for m in plan) for k in range(len(names))])
  if base is not None and not all(np.all(np.isfinite(m.base.lora_a.astype(np.float32)))
                                  and np.all(np.isfinite(m.base.lora_b.astype(np.float32)))
                                  for m in plan):
    raise ValueError("the base adapter has non-finite tensors.")
  indices = np.flatnonzero(finite)
  if indices.size < validate.MIN_CLIENTS:
    raise ValueError(f"only {indices.size} of {len(names)} clients have finite tensors "
                     f"({[n for n, f in zip(names, finite) if not f]} do not); CLAIR needs "
                     f"at least {validate.MIN_CLIENTS}.")
  rank = _check_rank(rank, plan, indices.size)
  batches = _batches(plan, module_batch, batching)
  detections = _detect_all(batches, indices, rank, opts, batching, progress)
  module_names = tuple(m.name for m in plan)
  scores = np.stack([detections[n].scores for n in module_names]).astype(np.float64)
  thresholds = np.array([float(detections[n].threshold) for n in module_names])
  verdict = joint_verdict(scores, thresholds)
  benign = ~verdict.contaminated
  if not benign.any():  # cannot happen with a finite median; kept as a guard
    benign = np.ones_like(benign)
  refinements = _refine_all(batches, indices, benign, rank, opts, batching, progress)

  num_clients = len(names)
  full = lambda values, fill: _expand(values, indices, num_clients, fill)
  module_scores = np.stack([full(s, np.inf) for s in scores])
  joint_scores = full(verdict.joint_scores, np.inf)
  contaminated = full(verdict.contaminated, True).astype(bool)
  ordered = [refinements[n] for n in module_names]
  positions = {name: None for name in names}
  for row, k in enumerate(indices):
    positions[names[k]] = row
  ranks = {m.name: max(r.rank, 1) for m, r in zip(plan, ordered)}
  config = lora_config(ranks, adapters[names[0]].config)
  consensus = {}
  for module, refinement in zip(plan, ordered):
    consensus[module.a_key] = refinement.centre.astype(out_dtype or module.a_dtype)
    consensus[module.b_key] = refinement.shared.astype(out_dtype or module.b_dtype)
  return AdapterAggregation(
      names=names,
      contaminated=contaminated,
      scores=joint_scores,
      cut=verdict.cut,
      finite=finite,
      modules=module_names,
      module_scores=module_scores,
      module_thresholds=thresholds,
      module_flags=module_scores > thresholds[:, None],
      noise_levels=np.array([float(detections[n].noise_level) for n in module_names]),
      status=np.array([int(detections[n].status) for n in module_names], np.int32),
      refine_ranks=np.array([r.rank for r in ordered], np.int32),
      refine_saturated=np.array([r.saturated for r in ordered], bool),
      refined=RefinedAdapters(names, plan, ordered, positions, out_dtype),
      consensus=consensus,
      config=config,
      rank=rank,
  )


def _expand(values, indices, size: int, fill) -> np.ndarray:
  """Scatters ``values`` (one per finite client) into a ``(size,)`` array filled with ``fill``."""
  values = np.asarray(values)
  out = np.full((size,), fill, dtype=np.result_type(values.dtype, np.asarray(fill).dtype))
  out[indices] = values
  return out


__all__ = (
    "Adapter",
    "AdapterAggregation",
    "CONFIG_NAME",
    "JointVerdict",
    "LoraModule",
    "PICKLE_NAME",
    "RefinedAdapters",
    "WEIGHTS_NAME",
    "aggregate_adapters",
    "as_adapter",
    "check_lora",
    "compute_dtype",
    "default_module_batch",
    "dense_delta",
    "dense_deltas",
    "file_sha256",
    "from_flax_lora_state",
    "joint_verdict",
    "lora_config",
    "lora_modules",
    "module_scaling",
    "module_update",
    "pattern_value",
    "read_peft",
    "robust_cut",
    "to_flax_lora_state",
    "write_peft",
)
