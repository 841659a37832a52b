"""The CLAIR estimator on dense updates, stage by stage.

validate (:func:`clair_dense`, once) -> normalise -> robust start -> calibrate weights ->
decompose -> detect (with the subspace fit) -> refine -> result; :func:`clair_core` calls
one short function per stage and passes NamedTuples between them.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._src import client_stack
from clair_jax._src import detect
from clair_jax._src import refine as refine_lib
from clair_jax._src import robust
from clair_jax._src import solver
from clair_jax._src import svt
from clair_jax._src import validate
from clair_jax._src.prox import safe_norm
from clair_jax._src.subspace import project_onto_subspace
from clair_jax._src.status import Start
from clair_jax._src.status import Status
from clair_jax._src.subspace import stack_clients
from clair_jax._src.subspace import to_columns

# Where the benign set came from (see ClairResult.start).
START_CONVEX = int(Start.CONVEX)
START_CONSENSUS = int(Start.CONSENSUS)
START_COMPLEMENT = int(Start.COMPLEMENT)
START_NAMES = {int(code): code.name.lower() for code in Start}

# Default lambda_L is this factor above the edge of the noise spectrum, sigma (sqrt(m) +
# sqrt(K n)). The SVT input M - S keeps each contaminated block at norm lambda_S (1.5x a
# benign block's noise norm), which lifts the edge: on the benchmark problem (K=64,
# 256 x 32, 20% contaminated) 15 pure-noise directions sit within 9% above it. At the
# edge itself they enter L with shrink factors below 0.1, and, clustered at the threshold,
# they make every SVT converge slowly; 10% above it L holds the signal alone.
NOISE_EDGE_MARGIN = 1.1
# Default lambda_S is this multiple of the benign median residual: just above a benign
# block's noise norm, so benign blocks stay out of S.
LAM_SPARSE_RATIO = 1.5


class DetectionOptions(NamedTuple):
  """Detection: which clients are flagged (the residual tests and the trimming loop).

  Attributes:
    threshold_ratio: a client is flagged when its residual exceeds this multiple of the
      benign median residual, or of its own noise level; default ``None``: a floor from
      the degrees of freedom, ``exp(4 sd)`` of benign sampling noise (see
      ``detect.sampling_floors``: 1.09 and 1.15 at 64 x 16, rank 4) ...
    mad_multiplier: ... or ``exp(median + mad_multiplier * 1.4826 * MAD)`` of the benign
      log-scores, whichever is larger, so benign clients that spread (different noise
      levels) are not flagged (default 3).
    scale_floor: floor on the benign median residual, relative to the median client norm
      (default 1e-4); keeps scores meaningful for noiseless data.
    consensus: also start the trimming loop from the client-count consensus (default on;
      needed against coherent groups with larger norms).
    num_candidates: clients proposing a subspace in the consensus search (default
      ``min(K, 64)``, evenly spaced).
    max_trim_steps: cap on trimming (C-step) iterations.
    noise_level: noise std ``sigma`` per entry (input units). Default: estimated, as
      ``median_benign ||(I - U U^T) D_k||_F / sqrt((m - r) n)``.
  """

  threshold_ratio: float | None = None
  mad_multiplier: float = 3.0
  scale_floor: float = 1e-4
  consensus: bool = True
  num_candidates: int | None = None
  max_trim_steps: int = 30
  noise_level: float | None = None


class WeightOptions(NamedTuple):
  """Weights of the convex program ``lambda_L ||L||_* + lambda_S sum_k w_k ||S_k||_F``.

  Attributes:
    lam_low_rank: nuclear weight ``lambda_L`` (input units). Default
      ``1.1 sigma_hat (sqrt(m) + sqrt(K n))``: 10% above the spectral norm of ``m x K n``
      noise (see ``NOISE_EDGE_MARGIN``).
    lam_sparse: group weight ``lambda_S`` (input units). Default ``1.5`` times the median
      benign off-subspace residual, i.e. just above a benign block's noise norm.
    convex_floor: floor on that residual when it sets the convex weights (default 1e-2):
      with (near) noiseless data the convex program is degenerate (any split of ``M`` into
      ``L + S`` costs ~0) and converges slowly; the trimming loop decides there anyway.
  """

  lam_low_rank: float | None = None
  lam_sparse: float | None = None
  convex_floor: float = 1e-2


class SolverOptions(NamedTuple):
  """The convex solver (see :func:`clair_jax.solve_decomposition`).

  Attributes:
    tol: relative stopping tolerance (default 1e-4).
    max_steps: cap on solver iterations (default 500).
    continuation_factor: each step shrinks the weights by this factor in ``(0, 1]``
      toward their target (default 0.7).
    svt_method: how singular values are thresholded, one of ``svt.SVT_METHODS``
      (default ``"auto"``).
    svt_width: columns of the warm-started SVT basis; it must exceed ``4/3`` of the rank
      of ``L`` (default 32 below ``m = 512``, else ``min(m / 8, 512)``).
  """

  tol: float = 1e-4
  max_steps: int = 500
  continuation_factor: float = 0.7
  svt_method: str = "auto"
  svt_width: int | None = None


class RefineOptions(NamedTuple):
  """Refinement: what each client gets back (flat names in :class:`ClairOptions` in brackets).

  Attributes:
    method: (``refine``) ``"pool"`` (default): partial pooling of the benign clients
      inside a refine subspace chosen from data (:func:`clair_jax.refine_updates`):
      ``U_R (C_bar + S (C_k - C_bar))``; ``"projection"``: the paper's ``U U^T D_k`` with
      the detection subspace (rank ``r``).
    strength: (``refine_strength``) ``"auto"`` (default, server-only empirical-Bayes
      shrinkage) or a float in ``[0, 1]`` (``1`` keeps each client's own coefficients,
      ``0`` gives every benign client the pooled update; e.g. from
      :func:`clair_jax.choose_strength`, a federated evaluation round).
    rank: (``refine_rank``) refine rank (``None``: chosen from data, decoupled from
      ``rank``).
    max_rank: (``refine_max_rank``) static width of the refine subspace (default
      ``min(m, K n, 64)``).
    subspace_noise: per-entry noise std *inside* the subspace, if clients measured it
      (e.g. from two half-data updates); default: taken equal to the off-subspace noise.
    contaminated_output: ``"keep"`` returns flagged clients as sent; ``"project"``
      projects the finite ones onto the subspace too (non-finite ones are still returned
      as sent).
  """

  method: str = "pool"
  strength: float | str = "auto"
  rank: int | None = None
  max_rank: int | None = None
  subspace_noise: float | None = None
  contaminated_output: str = "keep"


class ClairOptions(NamedTuple):
  """Every knob of :func:`clair`, flat; each default is derived from the data.

  The fields come in four groups, documented there; ``side`` is the one field of its own.
  Build from groups with :meth:`grouped`, read a group back with :attr:`detection`,
  :attr:`weights`, :attr:`solver` or :attr:`refinement`. The object is hashable: it is a
  static argument of the jitted core (float fields are traced, see ``TRACED_OPTIONS``).

  Attributes:
    threshold_ratio, mad_multiplier, scale_floor, consensus, num_candidates,
      max_trim_steps, noise_level: detection, see :class:`DetectionOptions`.
    lam_low_rank, lam_sparse, convex_floor: convex weights, see :class:`WeightOptions`.
    tol, max_steps, continuation_factor, svt_method, svt_width: convex solver, see
      :class:`SolverOptions`.
    refine, refine_strength, refine_rank, refine_max_rank, subspace_noise,
      contaminated_output: refinement, see :class:`RefineOptions` (there ``method``,
      ``strength``, ``rank``, ``max_rank``).
    side: ``"left"`` shares the column space (``m`` side, ``U`` is ``m x r``); ``"right"``
      shares the row space (each update is transposed, ``U`` is ``n x r``).
  """

  lam_low_rank: float | None = None
  lam_sparse: float | None = None
  noise_level: float | None = None
  threshold_ratio: float | None = None
  mad_multiplier: float = 3.0
  scale_floor: float = 1e-4
  convex_floor: float = 1e-2
  consensus: bool = True
  num_candidates: int | None = None
  max_trim_steps: int = 30
  tol: float = 1e-4
  max_steps: int = 500
  continuation_factor: float = 0.7
  svt_method: str = "auto"
  svt_width: int | None = None
  side: str = "left"
  contaminated_output: str = "keep"
  refine: str = "pool"
  refine_strength: float | str = "auto"
  refine_rank: int | None = None
  refine_max_rank: int | None = None
  subspace_noise: float | None = None

  @classmethod
  def grouped(cls, *, detection: DetectionOptions | None = None,
              weights: WeightOptions | None = None, solver: SolverOptions | None = None,
              refine: RefineOptions | None = None, side: str = "left") -> ClairOptions:
    """The flat options from groups (``None``: that group's defaults), validated.

    ``ClairOptions.grouped(**opts.as_groups()) == opts`` for any valid ``opts``.

    Raises:
      TypeError: a group of the wrong type.
      ValueError: a bad value, named by its path (``"solver.tol must be ..."``).
    """
    groups = {key: group for key, group in (("detection", detection), ("weights", weights),
                                            ("solver", solver), ("refine", refine))
              if group is not None}
    for key, group in groups.items():
      _check_group_type(key, group)  # also `refine`: here it is the group, never the name
    return resolve_options(None, side=side, **groups)

  @property
  def detection(self) -> DetectionOptions:
    """The detection fields, as a :class:`DetectionOptions`."""
    return _group_of(self, "detection")

  @property
  def weights(self) -> WeightOptions:
    """The convex weights, as a :class:`WeightOptions`."""
    return _group_of(self, "weights")

  @property
  def solver(self) -> SolverOptions:
    """The convex solver settings, as a :class:`SolverOptions`."""
    return _group_of(self, "solver")

  @property
  def refinement(self) -> RefineOptions:
    """The refinement fields, as a :class:`RefineOptions` (``refine`` is its ``method``)."""
    return _group_of(self, "refine")

  def as_groups(self) -> dict:
    """``{"detection", "weights", "solver", "refine": group, "side": str}``: the
    keywords of :meth:`grouped` (and of :func:`clair_jax.clair`) that rebuild these options."""
    return {**{key: _group_of(self, key) for key in OPTION_GROUPS}, "side": self.side}


# Where each flat field lives: group keyword -> (group type, {group field: flat field}).
# Every field of ClairOptions but `side` is in exactly one group (tests/test_options.py).
OPTION_GROUPS = {
    "detection": (DetectionOptions, {name: name for name in DetectionOptions._fields}),
    "weights": (WeightOptions, {name: name for name in WeightOptions._fields}),
    "solver": (SolverOptions, {name: name for name in SolverOptions._fields}),
    "refine": (RefineOptions, {"method": "refine", "strength": "refine_strength",
                               "rank": "refine_rank", "max_rank": "refine_max_rank",
                               "subspace_noise": "subspace_noise",
                               "contaminated_output": "contaminated_output"}),
}


def _group_of(opts: ClairOptions, key: str):
  group_type, fields = OPTION_GROUPS[key]
  return group_type(**{name: getattr(opts, flat) for name, flat in fields.items()})


def _group_key(value) -> str | None:
  """The group keyword whose type ``value`` has, else ``None``."""
  for key, (group_type, _) in OPTION_GROUPS.items():
    if isinstance(value, group_type):
      return key
  return None


def _group_items(key: str, group) -> list[tuple[str, str, object]]:
  """``(flat field, path, value)`` for every field of a group object."""
  _, fields = OPTION_GROUPS[key]
  return [(flat, f"{key}.{name}", getattr(group, name)) for name, flat in fields.items()]


def _groups_in(options) -> list:
  """The group objects of ``options=`` (one group, or a list or tuple of them)."""
  if _group_key(options) is not None:
    return [options]
  # Any NamedTuple is a tuple: only a plain list or tuple is a sequence of groups here.
  if isinstance(options, (list, tuple)) and not hasattr(options, "_fields"):
    for index, item in enumerate(options):
      if _group_key(item) is None:
        raise TypeError(f"options[{index}] must be a clair_jax option group "
                        f"({_GROUP_TYPE_NAMES}); got {type(item).__name__}")
    return list(options)
  raise TypeError(f"options must be a clair_jax.ClairOptions, an option group "
                  f"({_GROUP_TYPE_NAMES}) or a list of groups; got {type(options).__name__}")


_GROUP_TYPE_NAMES = ", ".join(group_type.__name__ for group_type, _ in OPTION_GROUPS.values())


def _same(a, b) -> bool:
  """Whether two stated values agree (``1e-4`` and ``np.float64(1e-4)`` do)."""
  if a is b:
    return True
  try:
    return bool(a == b)
  except (TypeError, ValueError):  # arrays, tracers: not comparable here, so not the same
    return False


def resolve_options(options=None, **keywords) -> ClairOptions:
  """The validated :class:`ClairOptions` from every route :func:`clair_jax.clair` accepts.

  Args:
    options: ``None``; a :class:`ClairOptions`, the base that keywords update (as
      before); or an option group, or a list or tuple of groups.
    **keywords: flat fields of :class:`ClairOptions` and group keywords (``detection``,
      ``weights``, ``solver``, ``refine``; ``refine`` is the group when given a
      :class:`RefineOptions`, else the flat method name).

  A group object states every field of its group (its defaults too). Flat keywords are
  applied last, on top of the base and the groups (``clair(x, r, solver=SolverOptions(
  max_steps=50), tol=1e-5)`` runs with both), as they are on a ``ClairOptions`` base. Two
  groups stating one field with different values (``options=SolverOptions(tol=1e-6),
  solver=SolverOptions(tol=1e-5)``) are ambiguous, so that raises rather than picking one.

  Raises:
    TypeError: ``options`` or a group keyword of the wrong type, or an unknown option.
    ValueError: conflicting values for one field, or a bad value (named by the path it
      came by: ``"solver.tol"`` from a group, ``"tol"`` from a flat keyword).
  """
  unknown = set(keywords) - set(ClairOptions._fields) - set(OPTION_GROUPS)
  if unknown:
    raise TypeError(f"unknown option(s) {sorted(unknown)}; valid options: "
                    f"{list(ClairOptions._fields)} and the groups {list(OPTION_GROUPS)}")
  base = {}
  given = {}  # flat field -> (value, path it came by, route)
  if isinstance(options, ClairOptions):
    base = options._asdict()
  elif options is not None:
    for group in _groups_in(options):
      _give_group(given, _group_key(group), group, "options=")
  flat_keywords = {}
  for key, value in keywords.items():
    if key in OPTION_GROUPS and (key != "refine" or _group_key(value) is not None):
      if value is not None:
        _check_group_type(key, value)
        _give_group(given, key, value, f"{key}=")
    else:
      flat_keywords[key] = value
  paths = {field: path for field, (_, path, _) in given.items()}
  paths.update({key: key for key in flat_keywords})
  flat = {**base, **{field: value for field, (value, _, _) in given.items()}, **flat_keywords}
  return _options(flat, paths)


def _check_group_type(key: str, value) -> None:
  group_type, _ = OPTION_GROUPS[key]
  if not isinstance(value, group_type):
    raise TypeError(f"{key} must be a clair_jax.{group_type.__name__}; "
                    f"got {type(value).__name__}")


def _give_group(given: dict, key: str, group, route: str) -> None:
  for field, path, value in _group_items(key, group):
    _give(given, field, path, value, route)


def _give(given: dict, field: str, path: str, value, route: str) -> None:
  if field in given and not _same(given[field][0], value):
    old_value, old_path, old_route = given[field]
    raise ValueError(
        f"conflicting values for option {field}: {old_path}={old_value!r} ({old_route}) "
        f"and {path}={value!r} ({route}); a group sets every field of its group, "
        f"defaults included: give each group once (flat keywords override groups)")
  given.setdefault(field, (value, path, route))


class ClairResult(NamedTuple):
  """What :func:`clair` found. Arrays; ``K`` clients, ``m x n`` updates, rank ``r``.

  Attributes:
    contaminated: ``(K,)`` bool, flagged clients (non-finite clients always flagged).
    scores: ``(K,)`` how far each client is past its threshold: the larger of
      ``residual_scores / thresholds[0]`` and ``structure_scores / thresholds[1]``; larger
      is more suspicious; ``+inf`` for non-finite clients.
    threshold: scalar 1.0; ``contaminated == scores > threshold``.
    residual_scores: ``(K,)`` off-subspace residual ``||(I - U U^T) D_k||_F`` over the
      benign median (catches garbage and large off-subspace updates).
    structure_scores: ``(K,)`` off-subspace residual over the client's own noise level
      (estimated from its spectrum beyond rank ``r``), benign-normalised; robust to benign
      clients with different noise levels, catches coherent groups (0 when ``n <= r``).
    thresholds: ``(2,)`` the two tests' thresholds, each
      ``max(threshold_ratio, exp(med + mad_multiplier * 1.4826 * MAD))`` over benign
      log-scores.
    subspace: ``(m, r)`` orthonormal, top-``r`` left singular vectors of the benign clients'
      updates (``(n, r)`` with ``side="right"``).
    refined: ``(K, m, n)`` benign clients refined (partial pooling by default, see the
      ``refine`` option); contaminated ones as sent (see options).
    low_rank, sparse: ``(K, m, n)`` blocks of the convex decomposition ``M = L + S + E``.
    convex_contaminated: ``(K,)`` bool, clients whose convex ``S_k`` is nonzero.
    noise_level: estimated noise std per entry (input units).
    lam_low_rank, lam_sparse: weights the convex program used (input units).
    status: int32, ``solver.STATUS_NAMES`` (0 successful).
    solver_steps, solver_residual: convex solver statistics; ``max_steps`` is its cap.
    trim_steps: trimming iterations of the winning start.
    start: where the winning benign set grew from: 0 the convex solution, 1 the consensus
      search, 2 the complement of the consensus (see ``START_NAMES``).
    consensus: ``(m, n)`` one update for servers that broadcast a single model:
      ``U_R C_bar``, the refine subspace times the robust centre of the benign clients'
      coefficients.
    refine_subspace: ``(m, w)`` the refine subspace ``U_R`` (columns beyond
      ``refine_rank`` are zero); refined benign updates are ``U_R (C_bar + S (C_k -
      C_bar))``, a LoRA update of rank ``refine_rank`` on the ``m`` side.
    refine_rank: int32, directions of ``U_R`` used.
    refine_strength: ``(w,)`` pooling strength ``S`` per direction of ``U_R`` (0 pools fully,
      1 keeps each client's own coefficients).
    duplicate_weights: ``(K,)`` ``1 / size`` of each client's near-duplicate group (1 for
      independent clients): every count, median and fit counts a group once.
  """

  contaminated: jax.Array
  scores: jax.Array
  threshold: jax.Array
  residual_scores: jax.Array
  structure_scores: jax.Array
  thresholds: jax.Array
  subspace: jax.Array
  refined: jax.Array
  low_rank: jax.Array
  sparse: jax.Array
  convex_contaminated: jax.Array
  noise_level: jax.Array
  lam_low_rank: jax.Array
  lam_sparse: jax.Array
  status: jax.Array
  solver_steps: jax.Array
  solver_residual: jax.Array
  max_steps: jax.Array
  trim_steps: jax.Array
  start: jax.Array
  consensus: jax.Array
  refine_subspace: jax.Array
  refine_rank: jax.Array
  refine_strength: jax.Array
  duplicate_weights: jax.Array

  @property
  def benign(self) -> jax.Array:
    return ~self.contaminated

  @property
  def status_name(self) -> str:
    return Status(int(self.status)).name.lower()

  @property
  def status_message(self) -> str:
    """What the status means, in a sentence (:class:`clair_jax.Status`)."""
    return Status(int(self.status)).message

  def summary(self) -> str:
    """A few human-readable lines (call on concrete results, not inside jit).

    A batched result (from ``jax.vmap`` over problems: ``contaminated`` is ``(B, K)``)
    gives one block per problem.
    """
    batch_shape = np.shape(self.contaminated)[:-1]
    if batch_shape:
      blocks = []
      for index in np.ndindex(*batch_shape):
        one = jax.tree.map(lambda x, index=index: np.asarray(x)[index], self)
        blocks.append(f"problem {index if len(index) > 1 else index[0]}: " + one.summary())
      return "\n".join(blocks)
    flagged = np.flatnonzero(np.asarray(self.contaminated))
    thresholds = ", ".join(f"{float(t):.3g}" for t in np.asarray(self.thresholds).ravel())
    return "\n".join([
        f"CLAIR: {len(flagged)} of {self.contaminated.shape[0]} clients flagged: "
        f"{flagged.tolist()}",
        f"  rank {self.subspace.shape[1]}, noise level {float(self.noise_level):.3g}, "
        f"thresholds [{thresholds}] (residual, structure)",
        f"  convex solver: {self.status_name} after {int(self.solver_steps)} steps "
        f"(residual {float(self.solver_residual):.2e}); trimming steps {int(self.trim_steps)}, "
        f"start {START_NAMES[int(self.start)]}",
    ] + ([] if int(self.status) == Status.SUCCESSFUL else [f"  ({self.status_message})"]))


def _options(options: dict, paths: dict | None = None) -> ClairOptions:
  """Validated :class:`ClairOptions` from flat fields.

  ``paths`` names a field in the errors by the way it came (``{"tol": "solver.tol"}``);
  a field not in it is named flat.
  """
  unknown = set(options) - set(ClairOptions._fields)
  if unknown:
    raise TypeError(
        f"unknown option(s) {sorted(unknown)}; valid options: {list(ClairOptions._fields)}")
  opts = ClairOptions(**options)
  name = functools.partial(_path, paths or {})
  _check_choices(opts, name)
  _check_refine(opts, name)
  _check_svt_width(opts, name)
  if opts.threshold_ratio is not None and not opts.threshold_ratio > 1.0:
    raise ValueError(f"{name('threshold_ratio')} must be > 1; got {opts.threshold_ratio}")
  for field in ("lam_low_rank", "lam_sparse", "noise_level"):
    value = getattr(opts, field)
    if value is not None and not float(value) > 0:
      raise ValueError(f"{name(field)} must be positive or None; got {value}")
  _check_number(opts, "tol", lambda v: v > 0, "> 0", name)
  _check_number(opts, "mad_multiplier", lambda v: v >= 0, ">= 0", name)
  _check_number(opts, "scale_floor", lambda v: v >= 0, ">= 0", name)
  _check_number(opts, "convex_floor", lambda v: v >= 0, ">= 0", name)
  # The continuation shrinks the weights geometrically toward their target: a factor
  # outside (0, 1] would grow them or flip their sign.
  _check_number(opts, "continuation_factor", lambda v: 0 < v <= 1, "in (0, 1]", name)
  _check_int(opts, "max_steps", 1, name)
  _check_int(opts, "max_trim_steps", 0, name)
  if opts.num_candidates is not None:
    _check_int(opts, "num_candidates", 1, name)
  return opts


def _path(paths: dict, field: str) -> str:
  return paths.get(field, field)


def _check_choices(opts: ClairOptions, name) -> None:
  """The fields that take one of a few names."""
  if opts.side not in ("left", "right"):
    raise ValueError(f"{name('side')} must be 'left' or 'right'; got {opts.side!r}")
  if opts.contaminated_output not in ("keep", "project"):
    raise ValueError(f"{name('contaminated_output')} must be 'keep' or 'project'; "
                     f"got {opts.contaminated_output!r}")
  if opts.refine not in ("pool", "projection"):
    raise ValueError(f"{name('refine')} must be 'pool' or 'projection'; got {opts.refine!r}")
  if opts.svt_method not in svt.SVT_METHODS:
    raise ValueError(f"{name('svt_method')} must be one of {svt.SVT_METHODS}; "
                     f"got {opts.svt_method!r}")


def _check_refine(opts: ClairOptions, name) -> None:
  if isinstance(opts.refine_strength, str):
    if opts.refine_strength != "auto":
      raise ValueError(f"{name('refine_strength')} must be 'auto' or a float in [0, 1]; "
                       f"got {opts.refine_strength!r}")
  elif not 0.0 <= float(opts.refine_strength) <= 1.0:
    raise ValueError(f"{name('refine_strength')} must be in [0, 1]; got {opts.refine_strength}")
  for field in ("refine_rank", "refine_max_rank"):
    value = getattr(opts, field)
    if value is not None and not (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool) and value >= 0):
      raise ValueError(f"{name(field)} must be a nonnegative int or None; got {value!r}")
  if opts.subspace_noise is not None and not float(opts.subspace_noise) >= 0:
    raise ValueError(f"{name('subspace_noise')} must be >= 0 or None; got {opts.subspace_noise}")


def _check_svt_width(opts: ClairOptions, name) -> None:
  if opts.svt_width is not None and not (isinstance(opts.svt_width, numbers.Integral)
                                         and not isinstance(opts.svt_width, bool)
                                         and opts.svt_width >= 1):
    raise ValueError(f"{name('svt_width')} must be a positive int or None; "
                     f"got {opts.svt_width!r}")


def _check_number(opts, field: str, ok, rule: str, name=str) -> None:
  value = getattr(opts, field)
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or not ok(value)):
    raise ValueError(f"{name(field)} must be a finite number {rule}; got {value!r}")


def _check_int(opts, field: str, minimum: int, name=str) -> None:
  value = getattr(opts, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name(field)} must be an int >= {minimum}; got {value!r}")


def clair_dense(updates, rank: int | None = None, *, client_weights=None,
                **options) -> ClairResult:
  """:func:`clair_jax.clair` on a dense ``(K, m, n)`` stack (validation, then the jitted core).

  See :func:`clair_jax._src.api.clair` for the method, arguments and result.
  """
  updates = validate.check_updates(updates)
  opts = _options(options)
  # The SVD fallback stacks (gathers) the clients; keep sharded clients in place.
  gather = not is_sharded(updates)
  if opts.side == "right":
    updates = jnp.swapaxes(updates, 1, 2)
  traced = validate.is_traced(updates)
  if not traced:
    validate.check_any_finite(robust.finite_clients(updates), updates.shape,
                              "updates")
  if rank is None:
    if traced:
      raise ValueError("rank=None chooses the rank from data and needs concrete updates; "
                       "pass an int rank inside jit/vmap.")
    rank = estimate_rank(updates, options=opts)
  rank = validate.check_rank(rank, updates.shape)
  num_clients = updates.shape[0]
  client_weights = validate.check_client_weights(client_weights, num_clients, updates.dtype)
  result = _clair_jit(updates, client_weights, rank, opts, gather)
  if opts.side == "right":
    swap = lambda x: jnp.swapaxes(x, 1, 2)
    result = result._replace(refined=swap(result.refined), low_rank=swap(result.low_rank),
                             sparse=swap(result.sparse))
  return result


def is_sharded(x) -> bool:
  """Whether ``x`` is a concrete array split over more than one device."""
  sharding = getattr(x, "sharding", None)
  if validate.is_traced(x) or sharding is None:
    return False
  return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


# Options whose values are traced through jit (a new value does not recompile); whether
# one is given (None selects the estimated default) and every other field stay static.
TRACED_OPTIONS = ("lam_low_rank", "lam_sparse", "noise_level", "threshold_ratio",
                  "mad_multiplier", "scale_floor", "convex_floor", "tol",
                  "continuation_factor", "refine_strength", "subspace_noise")
_TRACED = "<traced>"  # stands in for a traced value in the static options


def split_options(opts: ClairOptions) -> tuple[ClairOptions, dict]:
  """``(static, values)``: the options with every given float replaced by a marker (the
  hashable part a jit compiles for) and those floats as scalars (traced arguments)."""
  values = {name: jnp.asarray(getattr(opts, name)) for name in TRACED_OPTIONS
            if not isinstance(getattr(opts, name), (type(None), str))}
  return opts._replace(**dict.fromkeys(values, _TRACED)), values


def merge_options(static: ClairOptions, values: dict) -> ClairOptions:
  """Inverse of :func:`split_options` (inside the jit: the values are tracers)."""
  return static._replace(**values)


def _clair_jit(updates, client_weights, rank: int, opts: ClairOptions,
               gather: bool = True) -> ClairResult:
  static, values = split_options(opts)
  return _clair_compiled(updates, client_weights, values, rank, static, gather)


@functools.partial(jax.jit, static_argnames=("rank", "static", "gather"))
def _clair_compiled(updates, client_weights, values: dict, rank: int, static: ClairOptions,
                    gather: bool) -> ClairResult:
  return clair_core(updates, client_weights, rank, merge_options(static, values),
                    gather=gather)


def _normalise(updates: jax.Array):
  """Zeroes non-finite clients and scales by the median finite client norm.

  The scale is found in two steps so that no square over- or underflows for any finite
  input (float32 from ~1e-30 to ~1e30 gives the same verdicts): first every client is
  divided by the median of the clients' largest entries (a division, exact up to
  rounding), then by the median client norm of what that leaves. A client whose squared
  norm still overflows (its entries ~1e19 times the median client's, in float32) counts as
  non-finite: its energy, residual and Gram terms cannot be represented.
  """
  dtype = validate.compute_dtype(updates.dtype)
  x = updates.astype(dtype)
  finite = robust.finite_clients(x)
  x = jnp.where(finite[:, None, None], x, 0.0)
  largest = jnp.max(jnp.abs(x), axis=(1, 2))
  magnitude = robust.masked_median(largest, finite & (largest > 0))
  magnitude = jnp.where(magnitude > 0, magnitude, jnp.max(largest))
  magnitude = jnp.where(magnitude > 0, magnitude, 1.0)
  scaled = x / magnitude
  active = finite & jnp.isfinite(jnp.sum(scaled * scaled, axis=(1, 2)))
  scaled = jnp.where(active[:, None, None], scaled, 0.0)
  x = jnp.where(active[:, None, None], x, 0.0)
  norms = safe_norm(scaled, axis=(1, 2))
  norm_scale = robust.masked_median(norms, active)
  norm_scale = jnp.where(norm_scale > 0, norm_scale, jnp.max(norms))
  norm_scale = jnp.where(norm_scale > 0, norm_scale, 1.0)
  return x, scaled / norm_scale, active, magnitude * norm_scale


def _num_candidates(x_n, opts: ClairOptions) -> int:
  num_clients = x_n.shape[0]
  return max(1, min(opts.num_candidates or min(num_clients, 64), num_clients))


def _robust_split(x_n, active, rank, opts: ClairOptions):
  """Consensus start + trimming (residual test only); used to pick the rank."""
  clients = detect.prepare_clients(to_columns(x_n), active)
  return detect.concentrate(
      clients, detect.consensus_start(clients, rank, _num_candidates(x_n, opts)), rank,
      max_steps=opts.max_trim_steps, threshold_ratio=opts.threshold_ratio,
      mad_multiplier=opts.mad_multiplier, scale_floor=opts.scale_floor)


class Normalised(NamedTuple):
  """Stage 1: the updates made safe and scale-free (:func:`_normalise`)."""

  x: jax.Array            # (K, m, n) compute dtype, non-finite clients zeroed
  x_n: jax.Array          # x / data_scale
  active: jax.Array       # (K,) bool, finite clients whose squared norm fits the dtype
  data_scale: jax.Array   # scalar, median client scale


class RobustStart(NamedTuple):
  """Stage 2: the best split from the robust starts (consensus and its complement)."""

  split: detect.Split
  take_complement: jax.Array  # bool, the complement's split won


class ConvexWeights(NamedTuple):
  """Stage 3: the convex program's weights, calibrated on the robust start's residual."""

  lam_low_rank: jax.Array     # nuclear weight (normalised units)
  lam_sparse: jax.Array       # group weight (normalised units)
  group_weights: jax.Array    # (K,) w_k, zero for inactive clients


class Verdict(NamedTuple):
  """Stage 5: the convex verdict, the trimming from it, and the winning split."""

  split: detect.Split          # benign set, scores, thresholds, subspace (stage 6's fit)
  convex_benign: jax.Array     # (K,) bool, clients with S_k = 0
  use_robust: jax.Array        # bool, the robust start's split won over the convex one


def robust_start_stage(clients: detect.Clients, spectra, trim, rank: int,
                       num_candidates: int) -> RobustStart:
  """Consensus start (the client-count majority subspace) and its complement (the clients
  that subspace explains worst: a benign majority whose signal is weaker than a coherent
  group's), each trimmed; the better explanation of a majority wins."""
  consensus = trim(detect.consensus_start(clients, rank, num_candidates, own_left=spectra.left))
  unexplained = detect.unexplained_fraction(clients.columns, consensus.subspace,
                                            energy=clients.energy)
  majority = detect.majority_mass(clients.weights)
  complement = trim(detect.weighted_smallest_mask(-unexplained, clients.weights, majority))
  return RobustStart(detect.select_split(consensus, complement),
                     ~detect.better_split(consensus, complement))


def calibrate_weights_stage(start: RobustStart, normalised: Normalised, client_weights,
                            dof, dims: tuple[int, int], opts: ClairOptions) -> ConvexWeights:
  r"""``lambda_L = 1.1 sigma (sqrt(m) + sqrt(K n))`` just above the noise spectrum and
  ``lambda_S = 1.5`` benign median residuals (unless given), from the robust start's
  benign median residual (floored at ``convex_floor``)."""
  m, n = dims
  dtype = normalised.x.dtype
  scale = jnp.maximum(start.split.scale, opts.convex_floor)
  sigma = scale / jnp.sqrt(dof)
  num_active = jnp.sum(normalised.active).astype(dtype)
  lam_low_rank = (NOISE_EDGE_MARGIN * sigma * (jnp.sqrt(m * 1.0) + jnp.sqrt(num_active * n))
                  if opts.lam_low_rank is None else opts.lam_low_rank / normalised.data_scale)
  lam_sparse = (LAM_SPARSE_RATIO * scale
                if opts.lam_sparse is None else opts.lam_sparse / normalised.data_scale)
  group_weights = jnp.where(normalised.active, client_weights.astype(dtype), 0.0)
  return ConvexWeights(lam_low_rank, lam_sparse, group_weights)


def decompose_stage(clients: detect.Clients, weights: ConvexWeights, opts: ClairOptions,
                    gather: bool) -> solver.DecompositionSolution:
  """The convex split ``M = L + S + E`` (:func:`clair_jax.solve_decomposition`)."""
  return solver.solve_columns(
      clients.columns, weights.lam_low_rank, weights.lam_sparse * weights.group_weights,
      tol=opts.tol, max_steps=opts.max_steps, continuation_factor=opts.continuation_factor,
      svt_method=opts.svt_method, svt_width=opts.svt_width, gather=gather)


def detect_stage(clients: detect.Clients, decomposition, start: RobustStart, trim,
                 active, opts: ClairOptions) -> Verdict:
  """Convex verdict (clients with ``S_k != 0``), trimming from it (or from the majority
  with the smallest ``||S_k||`` when the convex benign set is not one), and the split
  that explains a majority best, the robust start's included. Each split's subspace is
  the rank-``r`` fit to its benign clients (the subspace stage, inside the trimming)."""
  majority = detect.majority_mass(clients.weights)
  sparse_norms = safe_norm(decomposition.sparse, axis=(1, 2))
  convex_benign = active & (sparse_norms == 0)
  convex_start = jnp.where(
      jnp.sum(jnp.where(convex_benign, clients.weights, 0.0)) >= majority, convex_benign,
      detect.weighted_smallest_mask(sparse_norms, clients.weights, majority))
  convex_split = trim(convex_start)
  if not opts.consensus:
    return Verdict(convex_split, convex_benign, jnp.asarray(False))
  return Verdict(detect.select_split(start.split, convex_split), convex_benign,
                 ~detect.better_split(convex_split, start.split))


def clair_core(updates, client_weights, rank: int, opts: ClairOptions,
               weight_shape: tuple[int, int] | None = None, *,
               gather: bool = True, refine_clients=None) -> ClairResult:
  """The traced body of :func:`clair` (no validation; ``rank`` and ``opts`` static).

  Stages, in order: normalise (:func:`_normalise`) -> robust start
  (:func:`robust_start_stage`) -> calibrate weights (:func:`calibrate_weights_stage`) ->
  decompose (:func:`decompose_stage`) -> detect and fit the subspace
  (:func:`detect_stage`) -> refine (:func:`refine_stage`) -> result
  (:func:`_result`).

  ``weight_shape`` is the ``(m, n)`` used in the noise degrees of freedom ``(m - r) n``
  and in the nuclear weight ``1.1 sigma (sqrt(m) + sqrt(K n))``; default
  ``updates.shape[1:]``.
  The factored path (:mod:`clair_jax._src.factored`) runs this body on exactly reduced
  ``(K, p, q)`` blocks; with ``dense_weights=True`` it passes the dense ``(m, n)``, so the
  convex weights and the noise level are those of the dense problem. ``gather=False``
  (sharded clients) keeps the SVT off its SVD fallback, which would stack the clients.
  ``refine_clients`` (factored path) are the clients the refine reads instead of the
  normalised blocks (:class:`client_stack.FactoredClients`); ``refined`` is then rebuilt
  by the caller.
  """
  _, m, n = updates.shape
  if weight_shape is not None:
    m, n = weight_shape
  normalised = Normalised(*_normalise(updates))
  dof = jnp.asarray(max(m - rank, 1) * n, normalised.x.dtype)
  fixed_scale = (None if opts.noise_level is None
                 else opts.noise_level * jnp.sqrt(dof) / normalised.data_scale)
  # One batched eigh gives each client's noise tail and its own subspace (the consensus
  # candidates); every later step reads the column layout (m, K, n): one transpose, here.
  spectra = detect.client_spectra(normalised.x_n, rank)
  clients = detect.prepare_clients(to_columns(normalised.x_n), normalised.active, spectra,
                                   rank, sketch=not gather)
  trim = functools.partial(
      detect.concentrate, clients, rank=rank, max_steps=opts.max_trim_steps,
      threshold_ratio=opts.threshold_ratio, mad_multiplier=opts.mad_multiplier,
      scale_floor=opts.scale_floor, fixed_scale=fixed_scale)
  start = robust_start_stage(clients, spectra, trim, rank, _num_candidates(normalised.x_n, opts))
  weights = calibrate_weights_stage(start, normalised, client_weights, dof, (m, n), opts)
  decomposition = decompose_stage(clients, weights, opts, gather)
  verdict = detect_stage(clients, decomposition, start, trim, normalised.active, opts)
  benign = verdict.split.benign & normalised.active
  refine_input = (normalised.x_n if refine_clients is None else
                  refine_clients.masked(normalised.active).scaled(1.0 / normalised.data_scale))
  refinement = refine_stage(refine_input, benign, clients.representative,
                            verdict.split.subspace, opts, normalised.data_scale)
  return _result(updates, normalised, start, weights, decomposition, verdict, refinement,
                 clients.weights, dof, opts)


def _result(updates, normalised: Normalised, start: RobustStart, weights: ConvexWeights,
            decomposition, verdict: Verdict, refinement, duplicate_weights, dof,
            opts: ClairOptions) -> ClairResult:
  """Assembles :class:`ClairResult` in input units (``refined``: benign clients refined,
  others as sent or projected; a placeholder for factored refine input)."""
  x, x_n, active, data_scale = normalised
  split = verdict.split
  benign = split.benign & active
  if refinement.refined is None:  # factored refine: the caller rebuilds `refined`
    pooled = x_n * data_scale
  else:
    pooled = refinement.refined * data_scale
  if opts.contaminated_output == "project":
    projected = project_onto_subspace(x, split.subspace)
    refined = jnp.where(benign[:, None, None], pooled,
                        jnp.where(active[:, None, None], projected, x))
  else:
    refined = jnp.where(benign[:, None, None], pooled, x)
  refined = jnp.where(active[:, None, None], refined.astype(updates.dtype), updates)
  status = jnp.where(jnp.any(active), decomposition.status, solver.NO_FINITE_CLIENTS)
  start_code = jnp.where(verdict.use_robust,
                         jnp.where(start.take_complement, START_COMPLEMENT, START_CONSENSUS),
                         START_CONVEX)
  return ClairResult(
      contaminated=~benign,
      scores=split.scores,
      threshold=jnp.asarray(1.0, x.dtype),
      residual_scores=split.residual_scores,
      structure_scores=split.structure_scores,
      thresholds=split.thresholds,
      subspace=split.subspace,
      refined=refined,
      low_rank=(decomposition.low_rank * data_scale).astype(updates.dtype),
      sparse=(decomposition.sparse * data_scale).astype(updates.dtype),
      convex_contaminated=active & ~verdict.convex_benign,
      noise_level=split.scale * data_scale / jnp.sqrt(dof),
      lam_low_rank=weights.lam_low_rank * data_scale,
      lam_sparse=weights.lam_sparse * data_scale,
      status=status.astype(jnp.int32),
      solver_steps=decomposition.num_steps,
      solver_residual=decomposition.residual,
      max_steps=jnp.asarray(opts.max_steps, jnp.int32),
      trim_steps=split.num_steps,
      start=start_code.astype(jnp.int32),
      consensus=(refinement.consensus * data_scale).astype(updates.dtype),
      refine_subspace=refinement.subspace,
      refine_rank=refinement.rank,
      refine_strength=refinement.strength,
      duplicate_weights=duplicate_weights,
  )


def refine_stage(x_n, benign, representative, subspace, opts: ClairOptions,
                 data_scale=1.0) -> refine_lib.Refinement:
  """Refine: partial pooling in a data-chosen subspace, or the paper's projection.

  ``x_n`` are the (normalised) updates (an array, or :mod:`client_stack`
  ``DenseClients`` / ``FactoredClients``; factored clients get ``refined=None``, the
  caller builds refined factors), ``benign`` the detected benign set and
  ``representative`` one client per near-duplicate group (the pooling statistics count
  each group once). With ``opts.refine == "projection"`` every benign client gets
  ``U U^T D_k`` with the detection subspace ``U``, and the consensus is ``U C_bar``.
  """
  clients = client_stack.as_clients(x_n)
  dtype = clients.dtype
  if opts.refine == "projection":
    coefficients = clients.coefficients(subspace)
    voters = benign & representative
    centre = refine_lib.huber_centre(coefficients, voters.astype(dtype))
    rank = subspace.shape[1]
    dense = isinstance(clients, client_stack.DenseClients)
    return refine_lib.Refinement(
        subspace=subspace, rank=jnp.asarray(rank, jnp.int32), centre=centre,
        strength=jnp.ones((rank,), dtype),
        refined=clients.project(subspace, coefficients) if dense else None,
        consensus=subspace @ centre, coefficients=coefficients, benign=benign,
        noise_level=jnp.asarray(jnp.nan, dtype),
        subspace_noise=jnp.asarray(jnp.nan, dtype),
        singular_values=jnp.zeros((rank,), dtype), threshold=jnp.zeros((), dtype),
        saturated=jnp.asarray(False))
  num_clients, m, n = clients.shape
  max_rank = opts.refine_max_rank or refine_lib.default_max_rank(m, n, num_clients)
  max_rank = max(1, min(max_rank, m, num_clients * n))
  strength = (None if isinstance(opts.refine_strength, str)
              else jnp.asarray(opts.refine_strength, dtype))
  inside = (jnp.nan if opts.subspace_noise is None
            else jnp.asarray(opts.subspace_noise, dtype) / data_scale)
  rank = None if opts.refine_rank is None else min(opts.refine_rank, max_rank)
  return refine_lib._refine(clients, benign, jnp.asarray(jnp.nan, dtype),  # pylint: disable=protected-access
                            jnp.asarray(inside, dtype), rank, strength,
                            max_rank=max_rank, voters=representative)


def _eigengap_rank(singular_values: np.ndarray, max_rank: int) -> int:
  """``argmax_{1 <= i <= max_rank} s_i / s_{i+1}`` (``s_{i+1}`` floored at ``eps * s_1``)."""
  s = np.asarray(singular_values, np.float64)
  if s.size < 2 or s[0] <= 0:
    return 1
  max_rank = max(1, min(max_rank, s.size - 1))
  floor = np.finfo(np.float32).eps * s[0]
  ratios = s[:max_rank] / np.maximum(s[1:max_rank + 1], floor)
  return int(np.argmax(ratios)) + 1


def estimate_rank(updates, max_rank: int | None = None, *,
                  options: ClairOptions | None = None) -> int:
  """Chooses the shared rank from data by the eigen-gap, robustly to contamination.

  1. Each finite client proposes the eigen-gap rank of its own block; ``r_0`` is the
     median proposal (a majority of clients is benign).
  2. The consensus/trimming benign set for ``r_0`` is found, and the rank is the
     eigen-gap of the benign clients' *stacked* spectrum (clients may individually use
     only part of the shared subspace).

  Args:
    updates: ``(K, m, n)`` concrete array.
    max_rank: largest rank considered (default ``min(m, K n) // 2``, at least 1).
    options: the caller's :class:`ClairOptions` (the trimming in step 2 uses its
      ``threshold_ratio``, ``mad_multiplier``, ``scale_floor``, ``max_trim_steps`` and
      ``num_candidates``); default all defaults.

  Returns:
    ``int`` rank.
  """
  updates = validate.check_updates(updates)
  if validate.is_traced(updates):
    raise ValueError("estimate_rank needs concrete updates (it runs eagerly).")
  num_clients, m, n = updates.shape
  x, x_n, active, _ = _normalise(updates)
  if max_rank is None:
    max_rank = max(1, min(m, num_clients * n) // 2)
  own_spectra = np.asarray(jnp.linalg.svd(x_n, compute_uv=False))[np.asarray(active)]
  proposals = [_eigengap_rank(s, min(max_rank, min(m, n) - 1)) for s in own_spectra]
  first_rank = int(np.median(proposals)) if proposals else 1
  first_rank = validate.check_rank(max(1, first_rank), updates.shape)
  static, values = split_options(options or ClairOptions())
  split = _robust_split_jit(x_n, active, values, first_rank, static)
  benign = np.asarray(split.benign)
  stacked = stack_clients(jnp.asarray(np.asarray(x_n)[benign]))
  return _eigengap_rank(np.asarray(jnp.linalg.svd(stacked, compute_uv=False)), max_rank)


_robust_split_jit = jax.jit(
    lambda x_n, active, values, rank, static: _robust_split(
        x_n, active, rank, merge_options(static, values)),
    static_argnames=("rank", "static"))
