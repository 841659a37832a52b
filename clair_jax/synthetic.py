"""Synthetic client updates with a known shared subspace and a known contaminated set.

Benign clients follow the model of the CLAIR spec:

.. math::
  \\Delta_k = U W_k, \\qquad \\hat D_k = \\Delta_k + E_k, \\qquad
  W_k = \\sqrt{m / r}\\,\\big(\\sqrt{1 - h}\\, W_0 + \\sqrt{h}\\, G_k\\big),

with ``U`` an ``m x r`` orthonormal basis drawn uniformly, ``W_0, G_k`` standard Gaussian
``r x n`` (``W_0`` shared, ``G_k`` client-specific), heterogeneity ``h`` in ``[0, 1]`` and
noise ``E_k`` i.i.d. ``N(0, sigma^2)`` per entry. The scaling makes every entry of
``Delta_k`` have unit variance, so ``||Delta_k||_F^2 ~ m n`` and ``sigma`` is the per-entry
noise-to-signal ratio.

A fraction of the clients (a uniformly random subset, not the first ones) is contaminated
by one of the :data:`ATTACKS`; ``attack_scale`` multiplies the attacker's norm relative to a
benign update (defaults per attack in :data:`DEFAULT_ATTACK_SCALE`):

- ``random``: dense Gaussian updates, ``N(0, s^2)`` per entry.
- ``coherent``: a coordinated group in its own rank-``r`` subspace ``V`` orthogonal to ``U``
  (``V W'_k`` with the benign coefficient model), plus noise.
- ``overlap``: like ``coherent`` but ``V = c U Q + s U_perp Q'`` has all principal angles
  to ``U`` equal to ``arcsin(separation)`` (``separation=1`` is ``coherent``, ``0`` lies in
  ``U``).
- ``sparse``: the client's benign update plus large spikes on ``spike_rows`` rows.
- ``boosted``: ``coherent`` with a large norm (default ``5x``), the case where a minority
  can outvote the majority in any SVD-based start.
- ``sign_flip``: in-subspace sign flip and scaling, ``-s Delta_k`` plus noise (cannot be
  told apart from a benign client by its subspace; must not hurt the others).
- ``nonfinite``: benign-looking updates in which entries are NaN (even-numbered attackers)
  or +/-Inf (odd-numbered attackers).

The attacks of the Byzantine-robust FL literature (:data:`LITERATURE_ATTACKS`, computed by
:mod:`clair_jax.attacks`) are omniscient: every client first draws its honest noisy update
``Delta_k + E_k`` as above (the benign clients are the same draws as for the model attacks
with the same key), then the contaminated clients replace theirs by the attack computed from
the benign clients' noisy updates, with the papers' default parameters; ``truth`` stays the
honest ``Delta_k``. By default all attackers send one vector; ``attacker_noise`` adds
independent ``N(0, (attacker_noise * sigma)^2)`` noise per attacker and entry (a fraction of
the benign noise level). ``attack_scale`` overrides the attack's strength parameter
(:data:`clair_jax.attacks.STRENGTH_PARAMS`). Names:

- ``alie``; ``ipm_small`` / ``ipm_large`` (``epsilon`` 0.1 / 100);
- ``min_max_uv`` / ``min_max_std`` / ``min_sum_uv`` / ``min_sum_std`` (unit-vector or std
  perturbation, uncapped gamma search);
- ``opt_alie`` / ``opt_ipm`` (line-searched against the coordinate median);
- ``mimic``; ``sign_flip_mean`` (``-mu``; the model attack ``sign_flip`` above is the older
  own-update flip); ``gaussian``;
- ``tilt`` (each attacker's own honest update plus one shared off-subspace direction of one
  benign noise norm, subspace and noise estimated from the benign updates at rank ``r``);
  ``boost_10`` / ``boost_100`` (the benign mean projected onto the benign top-``r`` subspace,
  times 10 / 100).

:data:`ADAPTIVE_ATTACKS` (``adaptive_alie``, ``adaptive_tilt``) are white-box: for each
strength in a small grid the problem is built and ``objective(problem)`` evaluated (the
caller passes it, e.g. CLAIR's benign error); the most damaging problem is returned
(:func:`make_attacked_problem` also reports the strength).

The regression setting (:func:`make_regression_problem`) is where the paper starts from:
client ``k`` holds ``(X_k, Y_k)`` with ``Y_k = X_k B_k + noise`` and its preliminary
estimate is ridge/OLS, ``Dhat_k = (X_k^T X_k + lam I)^{-1} X_k^T Y_k``; benign clients have
``B_k = Delta_k`` and contaminated ones poison their targets with the attack's coefficients
(model attacks only: the literature's attacks act on updates, not on data).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import attacks as attacks_lib

# Attacks drawn from a model of the attacker (the original set; the default study grid).
MODEL_ATTACKS = ("random", "coherent", "overlap", "sparse", "boosted", "sign_flip", "nonfinite")

# name -> (clair_jax.attacks function, fixed parameters). ``own`` passes each attacker's own
# honest update as ``own_updates``; ``rank`` passes the problem's rank.
LITERATURE_SPECS = {
    "alie": ("alie", {}),
    "ipm_small": ("ipm", {"epsilon": 0.1}),
    "ipm_large": ("ipm", {"epsilon": 100.0}),
    "min_max_uv": ("min_max", {"perturbation": "unit_vec"}),
    "min_max_std": ("min_max", {"perturbation": "std"}),
    "min_sum_uv": ("min_sum", {"perturbation": "unit_vec"}),
    "min_sum_std": ("min_sum", {"perturbation": "std"}),
    "opt_alie": ("opt_alie", {}),
    "opt_ipm": ("opt_ipm", {}),
    "mimic": ("mimic", {}),
    "sign_flip_mean": ("sign_flip", {}),
    "gaussian": ("gaussian", {}),
    "tilt": ("tilt", {"own": True, "rank": True}),
    "boost_10": ("boost", {"factor": 10.0, "rank": True}),
    "boost_100": ("boost", {"factor": 100.0, "rank": True}),
}
LITERATURE_ATTACKS = tuple(LITERATURE_SPECS)

# name -> (literature attack whose strength is searched, default strength grid).
ADAPTIVE_SPECS = {
    "adaptive_alie": ("alie", (0.25, 0.5, 1.0, 2.0, 4.0)),
    "adaptive_tilt": ("tilt", (0.25, 0.5, 1.0, 2.0, 4.0)),
}
ADAPTIVE_ATTACKS = tuple(ADAPTIVE_SPECS)

ATTACKS = MODEL_ATTACKS + LITERATURE_ATTACKS + ADAPTIVE_ATTACKS

DEFAULT_ATTACK_SCALE = {
    "random": 1.0,
    "coherent": 1.0,
    "overlap": 1.0,
    "sparse": 1.0,
    "boosted": 5.0,
    "sign_flip": 3.0,
    "nonfinite": 1.0,
}

# Sine of the principal angles between the attackers' subspace and U, per attack.
DEFAULT_SEPARATION = {"coherent": 1.0, "boosted": 1.0, "overlap": 0.5}


class SyntheticProblem(NamedTuple):
  """Client updates with known truth.

  Attributes:
    updates: ``(K, m, n)`` what the clients send, ``Dhat_k``.
    truth: ``(K, m, n)`` benign truth ``Delta_k = U W_k`` (defined for every client; for a
      contaminated client it is what it would have sent had it been honest).
    subspace: ``(m, r)`` the shared orthonormal basis ``U``.
    contaminated: ``(K,)`` bool, the contaminated set.
    noise: per-entry noise std ``sigma`` of the benign estimates.
  """

  updates: jax.Array
  truth: jax.Array
  subspace: jax.Array
  contaminated: jax.Array
  noise: float


class RegressionProblem(NamedTuple):
  """Multi-response regression clients; ``updates`` are their OLS/ridge estimates.

  Attributes:
    features: ``(K, N, m)`` design matrices ``X_k``.
    targets: ``(K, N, n)`` responses ``Y_k``.
    updates: ``(K, m, n)`` preliminary estimates ``Dhat_k``.
    truth: ``(K, m, n)`` benign coefficients ``Delta_k = U W_k``.
    subspace: ``(m, r)`` shared basis ``U``.
    contaminated: ``(K,)`` bool.
    noise: per-entry std of the response noise.
  """

  features: jax.Array
  targets: jax.Array
  updates: jax.Array
  truth: jax.Array
  subspace: jax.Array
  contaminated: jax.Array
  noise: float


def _gaussians(key: jax.Array, shapes: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
  """Standard normal arrays of the given shapes cut from one draw.

  One ``jax.random.normal`` call per problem instead of one per array keeps the jitted
  generator small (each threefry call compiles separately and is slow to compile).
  """
  sizes = [math.prod(shape) for shape in shapes]
  flat = jax.random.normal(key, (sum(sizes),))
  out, start = [], 0
  for shape, size in zip(shapes, sizes):
    out.append(flat[start : start + size].reshape(shape))
    start += size
  return out


def _orthonormalise(gaussian: jax.Array) -> jax.Array:
  """Q factor of a Gaussian matrix with the sign fixed so it is Haar distributed."""
  q, upper = jnp.linalg.qr(gaussian)
  return q * jnp.sign(jnp.diagonal(upper))[None, :]


def random_orthonormal(key: jax.Array, m: int, r: int) -> jax.Array:
  """Uniformly random ``m x r`` matrix with orthonormal columns (QR of a Gaussian)."""
  return _orthonormalise(jax.random.normal(key, (m, r)))


def _check_angle_args(basis, separation):
  m, r = basis.shape
  if 2 * r > m:
    raise ValueError(f"subspace_at_angle needs 2*r <= m, got basis of shape {basis.shape}")
  if isinstance(separation, (int, float)) and not 0.0 <= separation <= 1.0:
    raise ValueError(f"separation must be in [0, 1], got {separation}")


def _angle_basis(basis, separation, gauss_rotation, gauss_perp):
  rotation = _orthonormalise(gauss_rotation)
  perp = gauss_perp
  for _ in range(2):  # project out U twice (classical Gram-Schmidt, re-orthogonalised)
    perp = jnp.linalg.qr(perp - basis @ (basis.T @ perp))[0]
  separation = jnp.asarray(separation, basis.dtype)
  cos = jnp.sqrt(jnp.maximum(1.0 - separation**2, 0.0))
  return cos * basis @ rotation + separation * perp


def subspace_at_angle(key: jax.Array, basis: jax.Array, separation: float) -> jax.Array:
  """A random orthonormal ``m x r`` basis at principal angles ``arcsin(separation)`` to ``basis``.

  .. math::
    V = \\sqrt{1 - s^2}\\, U Q + s\\, U_\\perp Q', \\qquad U^T U_\\perp = 0,

  with ``Q`` a random ``r x r`` rotation and ``U_perp Q'`` a random orthonormal basis of
  ``r`` directions orthogonal to ``U``, so ``V^T V = I`` and ``||sin Theta(V, U)||_2 = s``.

  Args:
    key: PRNG key.
    basis: ``(m, r)`` orthonormal ``U`` with ``2 r <= m``.
    separation: ``s`` in ``[0, 1]`` (may be traced; checked only when it is a Python number).

  Returns:
    ``(m, r)`` orthonormal ``V``.
  """
  _check_angle_args(basis, separation)
  m, r = basis.shape
  gauss_rotation, gauss_perp = _gaussians(key, ((r, r), (m, r)))
  return _angle_basis(basis, separation, gauss_rotation, gauss_perp)


def _coefficients(shared, own, m, rank, heterogeneity):
  """``W_k = sqrt(m/r) (sqrt(1-h) W_0 + sqrt(h) G_k)``, Gaussians ``W_0 (1,r,n)``, ``G (K,r,n)``."""
  mix = jnp.sqrt(1.0 - heterogeneity) * shared + jnp.sqrt(heterogeneity) * own
  return math.sqrt(m / rank) * mix


def _check_sizes(num_clients, m, n, rank, fraction, noise, heterogeneity, attack,
                 allowed=ATTACKS):
  if attack not in allowed:
    raise ValueError(f"unknown attack {attack!r}; choose one of {allowed}")
  if min(num_clients, m, n, rank) < 1:
    raise ValueError(
        f"sizes must be positive, got num_clients={num_clients}, m={m}, n={n}, rank={rank}"
    )
  if 2 * rank > m:
    raise ValueError(f"need 2*rank <= m for the attackers' subspace, got rank={rank}, m={m}")
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}")
  if noise < 0:
    raise ValueError(f"noise must be >= 0, got {noise}")
  if not 0.0 <= heterogeneity <= 1.0:
    raise ValueError(f"heterogeneity must be in [0, 1], got {heterogeneity}")


def contaminated_mask(key: jax.Array, num_clients: int, fraction: float) -> jax.Array:
  """Bool ``(K,)`` with exactly ``round(fraction * K)`` True entries at random positions."""
  return _mask_from_count(
      jax.random.normal(key, (num_clients,)), int(round(fraction * num_clients))
  )


def _mask_from_count(gaussian: jax.Array, count) -> jax.Array:
  """The ``count`` clients with the smallest of i.i.d. draws ``(K,)`` (``count`` may be traced)."""
  num_clients = gaussian.shape[0]
  order = jnp.argsort(gaussian)
  position = jnp.zeros((num_clients,), jnp.int32).at[order].set(
      jnp.arange(num_clients, dtype=jnp.int32)
  )
  return position < count


def _attack_shapes(num_clients, m, n, rank):
  return ((rank, rank), (m, rank), (1, rank, n), (num_clients, rank, n), (num_clients, m),
          (num_clients, m, n), (num_clients, m, n))


def _attack_coefficients(
    gaussians,
    attack: str,
    truth: jax.Array,
    subspace: jax.Array,
    *,
    heterogeneity,
    attack_scale,
    separation,
    spike_rows: int,
) -> jax.Array:
  """Noiseless ``(K, m, n)`` matrices the attackers build (used for every client, then masked).

  ``gaussians`` are standard normal arrays of the shapes :func:`_attack_shapes` lists.
  """
  num_clients, m, _ = truth.shape
  rank = subspace.shape[1]
  g_rot, g_perp, g_shared, g_own, g_rows, g_dense, g_other = gaussians
  if attack == "random":
    return attack_scale * g_dense
  if attack in ("coherent", "overlap", "boosted"):
    basis = _angle_basis(subspace, separation, g_rot, g_perp)
    coef = _coefficients(g_shared, g_own, m, rank, heterogeneity)
    return attack_scale * jnp.einsum("mr,krn->kmn", basis, coef)
  if attack == "sparse":
    # the spike_rows rows with the largest draws (a uniformly random subset per client)
    threshold = jnp.sort(g_rows, axis=1)[:, m - spike_rows]
    row_mask = g_rows >= threshold[:, None]
    # spike norm ~ attack_scale * ||Delta_k||_F, concentrated on spike_rows rows
    spikes = attack_scale * math.sqrt(m / spike_rows) * g_dense
    return truth + jnp.where(row_mask[:, :, None], spikes, 0.0)
  if attack == "sign_flip":
    return -attack_scale * truth
  if attack == "nonfinite":  # ~10% NaN entries; callers turn every other attacker's into Inf
    entries = g_other > 1.2815516  # P(N(0,1) > 1.2816) = 0.1
    return jnp.where(entries, jnp.nan, attack_scale * truth)
  raise ValueError(f"unknown attack {attack!r}; choose one of {ATTACKS}")


def _nonfinite_rank(contaminated: jax.Array) -> jax.Array:
  """Position of each attacker among the attackers (to alternate NaN and Inf)."""
  return jnp.cumsum(contaminated) - 1


def make_problem(
    key: jax.Array,
    *,
    num_clients: int = 30,
    m: int = 64,
    n: int = 16,
    rank: int = 4,
    fraction: float = 0.2,
    attack: str = "random",
    noise: float = 0.3,
    heterogeneity: float = 0.5,
    attack_scale: float | None = None,
    separation: float | None = None,
    spike_rows: int = 2,
    dtype=jnp.float32,
    attacker_noise: float = 0.0,
    attack_options: dict | None = None,
    objective: Callable[[SyntheticProblem], float] | None = None,
) -> SyntheticProblem:
  """Draws client updates ``Dhat_k`` with a known subspace and contaminated set.

  Args:
    key: PRNG key; the problem is a deterministic function of it and the options.
    num_clients: ``K``.
    m: rows of each update (the side the subspace lives on).
    n: columns of each update.
    rank: ``r``, dimension of the shared subspace (``2 r <= m``).
    fraction: contaminated fraction; ``round(fraction * K)`` clients are attackers.
    attack: one of :data:`ATTACKS` (see the module docstring).
    noise: per-entry noise std ``sigma`` (signal entries have unit variance).
    heterogeneity: ``h`` in ``[0, 1]``; ``0`` means identical benign clients, ``1`` means
      independent coefficients inside the shared subspace.
    attack_scale: model attacks: attacker norm relative to a benign update (``None`` uses
      :data:`DEFAULT_ATTACK_SCALE`); literature attacks: the value of the attack's strength
      parameter (:data:`clair_jax.attacks.STRENGTH_PARAMS`, e.g. ALIE's ``z``; ``None``: the
      paper's default); adaptive attacks: a fixed strength instead of the search.
    separation: sine of the principal angles between the attackers' and the benign subspace
      (``coherent``, ``overlap``, ``boosted``); ``None`` uses :data:`DEFAULT_SEPARATION`.
    spike_rows: rows hit by the ``sparse`` attack.
    dtype: float dtype of the arrays.
    attacker_noise: literature and adaptive attacks only: independent per-attacker noise,
      as a fraction of ``noise`` (``0``: identical attackers).
    attack_options: literature and adaptive attacks only: extra keywords for the
      :mod:`clair_jax.attacks` function (e.g. ``{"perturbation": "sign"}``); for adaptive
      attacks ``"strengths"`` replaces the searched grid.
    objective: adaptive attacks only: ``problem -> float`` to maximise.

  Returns:
    A :class:`SyntheticProblem`.
  """
  if attack in LITERATURE_SPECS or attack in ADAPTIVE_SPECS:
    return make_attacked_problem(
        key, num_clients=num_clients, m=m, n=n, rank=rank, fraction=fraction, attack=attack,
        noise=noise, heterogeneity=heterogeneity, attack_scale=attack_scale,
        attacker_noise=attacker_noise, attack_options=attack_options, objective=objective,
        dtype=dtype,
    ).problem
  _check_sizes(num_clients, m, n, rank, fraction, noise, heterogeneity, attack)
  if attacker_noise != 0 or attack_options or objective is not None:
    raise ValueError(
        f"attacker_noise, attack_options and objective apply to the literature and adaptive "
        f"attacks, not to {attack!r}"
    )
  if not 1 <= spike_rows <= m:
    raise ValueError(f"spike_rows must be in [1, m={m}], got {spike_rows}")
  scale = DEFAULT_ATTACK_SCALE[attack] if attack_scale is None else float(attack_scale)
  sep = DEFAULT_SEPARATION.get(attack, 1.0) if separation is None else float(separation)
  updates, truth, subspace, contaminated = _problem_arrays(
      key,
      int(round(fraction * num_clients)),
      noise,
      heterogeneity,
      scale,
      sep,
      num_clients=num_clients,
      m=m,
      n=n,
      rank=rank,
      attack=attack,
      spike_rows=spike_rows,
  )
  return SyntheticProblem(
      updates=updates.astype(dtype),
      truth=truth.astype(dtype),
      subspace=subspace.astype(dtype),
      contaminated=contaminated,
      noise=float(noise),
  )


_STATIC = ("num_clients", "m", "n", "rank", "attack", "spike_rows")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _problem_arrays(
    key, count, noise, heterogeneity, scale, separation, *, num_clients, m, n, rank, attack,
    spike_rows,
):
  """Jitted core of :func:`make_problem` (one compile per attack and size)."""
  shapes = ((m, rank), (1, rank, n), (num_clients, rank, n), (num_clients,), (num_clients, m, n))
  draws = _gaussians(key, shapes + _attack_shapes(num_clients, m, n, rank))
  g_u, g_shared, g_own, g_mask, g_noise = draws[: len(shapes)]
  subspace = _orthonormalise(g_u)
  coef = _coefficients(g_shared, g_own, m, rank, heterogeneity)
  truth = jnp.einsum("mr,krn->kmn", subspace, coef)
  contaminated = _mask_from_count(g_mask, count)
  noise_draw = noise * g_noise
  attacked = _attack_coefficients(
      draws[len(shapes) :],
      attack,
      truth,
      subspace,
      heterogeneity=heterogeneity,
      attack_scale=scale,
      separation=separation,
      spike_rows=spike_rows,
  )
  if attack == "nonfinite":  # NaN for even-numbered attackers, +/-Inf for odd-numbered
    odd = (_nonfinite_rank(contaminated) % 2 == 1)[:, None, None]
    infs = jnp.where(noise_draw >= 0, jnp.inf, -jnp.inf)
    attacked = jnp.where(jnp.isnan(attacked) & odd, infs, attacked)
  updates = jnp.where(contaminated[:, None, None], attacked + noise_draw, truth + noise_draw)
  return updates, truth, subspace, contaminated


class AttackedProblem(NamedTuple):
  """Output of :func:`make_attacked_problem`.

  Attributes:
    problem: the :class:`SyntheticProblem`.
    strength: the attack's strength parameter used (``None``: the attack's own default or
      search); for adaptive attacks, the most damaging one.
    values: adaptive attacks: ``objective`` at each strength tried (else empty).
    strengths: adaptive attacks: the strengths tried (else empty).
  """

  problem: SyntheticProblem
  strength: float | None
  values: tuple[float, ...]
  strengths: tuple[float, ...]


@functools.partial(jax.jit, static_argnames=("num_clients", "m", "n", "rank"))
def _honest_arrays(key, count, noise, heterogeneity, *, num_clients, m, n, rank):
  """Every client's honest update ``Delta_k + E_k`` (the draws of :func:`_problem_arrays`)."""
  shapes = ((m, rank), (1, rank, n), (num_clients, rank, n), (num_clients,), (num_clients, m, n))
  draws = _gaussians(key, shapes + _attack_shapes(num_clients, m, n, rank))
  g_u, g_shared, g_own, g_mask, g_noise = draws[: len(shapes)]
  subspace = _orthonormalise(g_u)
  coef = _coefficients(g_shared, g_own, m, rank, heterogeneity)
  truth = jnp.einsum("mr,krn->kmn", subspace, coef)
  contaminated = _mask_from_count(g_mask, count)
  return truth + noise * g_noise, truth, subspace, contaminated


def literature_updates(attack: str, honest: jax.Array, contaminated, rank: int, key, *,
                       noise: float, attacker_noise: float = 0.0, strength=None,
                       options: dict | None = None) -> jax.Array:
  """Client updates with the contaminated clients' replaced by a literature attack.

  Args:
    attack: one of :data:`LITERATURE_ATTACKS`.
    honest: ``(K, m, n)`` every client's honest noisy update.
    contaminated: ``(K,)`` bool (concrete).
    rank: ``r`` (for ``tilt`` and ``boost``).
    key: PRNG key of the attack's own draws and the attacker noise.
    noise: benign per-entry noise std ``sigma``.
    attacker_noise: per-attacker noise as a fraction of ``sigma``.
    strength: overrides the attack's strength parameter (``STRENGTH_PARAMS``).
    options: extra keywords for the attack function.

  Returns:
    ``(K, m, n)`` updates.
  """
  name, fixed = LITERATURE_SPECS[attack]
  mask = np.asarray(contaminated)
  attackers = np.flatnonzero(mask)
  if attackers.size == 0:
    return honest
  params = {k: v for k, v in fixed.items() if k not in ("own", "rank")}
  if fixed.get("rank"):
    params["rank"] = rank
  if fixed.get("own"):
    params["own_updates"] = honest[attackers]
  if strength is not None:
    if name not in attacks_lib.STRENGTH_PARAMS:
      raise ValueError(f"attack {attack!r} has no strength parameter for attack_scale")
    params[attacks_lib.STRENGTH_PARAMS[name]] = float(strength)
  params.update(options or {})
  fn = attacks_lib.ATTACKS[name]
  malicious = fn(honest, ~mask, int(attackers.size), key=key,
                 attacker_noise=float(attacker_noise) * float(noise), **params)
  return honest.at[attackers].set(malicious.astype(honest.dtype))


def make_attacked_problem(
    key: jax.Array,
    *,
    num_clients: int = 30,
    m: int = 64,
    n: int = 16,
    rank: int = 4,
    fraction: float = 0.2,
    attack: str = "alie",
    noise: float = 0.3,
    heterogeneity: float = 0.5,
    attack_scale: float | None = None,
    attacker_noise: float = 0.0,
    attack_options: dict | None = None,
    objective: Callable[[SyntheticProblem], float] | None = None,
    dtype=jnp.float32,
) -> AttackedProblem:
  """A problem under a literature or adaptive attack, with the strength it used.

  Options as in :func:`make_problem` (``attack`` in :data:`LITERATURE_ATTACKS` or
  :data:`ADAPTIVE_ATTACKS`). Eager: the attacked clients' updates are computed from the
  concrete honest draws (the draws themselves are jitted, one compile per size).

  Returns:
    An :class:`AttackedProblem`.
  """
  allowed = LITERATURE_ATTACKS + ADAPTIVE_ATTACKS
  _check_sizes(num_clients, m, n, rank, fraction, noise, heterogeneity, attack, allowed)
  if not attacker_noise >= 0:
    raise ValueError(f"attacker_noise must be >= 0, got {attacker_noise}")
  count = int(round(fraction * num_clients))
  honest, truth, subspace, contaminated = _honest_arrays(
      key, count, noise, heterogeneity, num_clients=num_clients, m=m, n=n, rank=rank
  )
  attack_key = jax.random.fold_in(key, 0xA77AC)
  options = dict(attack_options or {})

  def build(name, strength):
    updates = literature_updates(
        name, honest, contaminated, rank, attack_key, noise=noise,
        attacker_noise=attacker_noise, strength=strength, options=options,
    )
    return SyntheticProblem(
        updates=updates.astype(dtype),
        truth=truth.astype(dtype),
        subspace=subspace.astype(dtype),
        contaminated=contaminated,
        noise=float(noise),
    )

  if attack in LITERATURE_SPECS:
    return AttackedProblem(build(attack, attack_scale), attack_scale, (), ())
  base, grid = ADAPTIVE_SPECS[attack]
  grid = tuple(float(s) for s in options.pop("strengths", grid))
  if attack_scale is not None:  # a fixed strength: no search
    return AttackedProblem(build(base, attack_scale), float(attack_scale), (), ())
  if objective is None:
    raise ValueError(f"adaptive attack {attack!r} needs objective (problem -> float)")
  if not grid:
    raise ValueError(f"adaptive attack {attack!r}: strengths must be non-empty")
  best, values = None, []
  for strength in grid:
    problem = build(base, strength)
    value = float(objective(problem))
    values.append(value)
    if best is None or value > best[2] or (math.isnan(best[2]) and not math.isnan(value)):
      best = (problem, strength, value)
  return AttackedProblem(best[0], best[1], tuple(values), grid)


def least_squares_estimates(
    features: jax.Array, targets: jax.Array, ridge: float = 0.0
) -> jax.Array:
  """Per-client ridge / OLS estimates ``(X_k^T X_k + lam I)^{-1} X_k^T Y_k``.

  Args:
    features: ``(K, N, m)``.
    targets: ``(K, N, n)``.
    ridge: ``lam >= 0``; ``0`` is OLS (needs ``N >= m``).

  Returns:
    ``(K, m, n)`` estimates (non-finite targets give non-finite estimates).
  """
  if features.ndim != 3 or targets.ndim != 3 or features.shape[:2] != targets.shape[:2]:
    raise ValueError(
        f"expected features (K, N, m) and targets (K, N, n), got {features.shape} "
        f"and {targets.shape}"
    )
  m = features.shape[2]
  gram = jnp.einsum("kNm,kNp->kmp", features, features) + ridge * jnp.eye(m)[None]
  cross = jnp.einsum("kNm,kNn->kmn", features, targets)
  return jnp.linalg.solve(gram, cross)


def make_regression_problem(
    key: jax.Array,
    *,
    num_clients: int = 30,
    m: int = 32,
    n: int = 8,
    rank: int = 3,
    num_samples: int = 64,
    fraction: float = 0.2,
    attack: str = "random",
    noise: float = 1.0,
    heterogeneity: float = 0.5,
    ridge: float = 0.0,
    attack_scale: float | None = None,
    separation: float | None = None,
    spike_rows: int = 2,
    dtype=jnp.float32,
) -> RegressionProblem:
  """Regression clients ``Y_k = X_k B_k + eps_k`` and their OLS / ridge estimates.

  ``X_k`` has i.i.d. ``N(0, 1)`` entries and ``eps_k`` i.i.d. ``N(0, noise^2)``, so the OLS
  error of a benign client is about ``noise / sqrt(N)`` per entry. Benign clients have
  ``B_k = Delta_k = U W_k``; contaminated clients fit the attack's coefficient matrix
  (poisoned targets; ``nonfinite`` puts NaN/Inf into ``Y_k``).

  Args:
    key: PRNG key.
    num_clients: ``K``.
    m: number of features (rows of each coefficient matrix).
    n: number of responses.
    rank: ``r`` of the shared subspace.
    num_samples: ``N`` samples per client (``N >= m`` for OLS).
    fraction: contaminated fraction.
    attack: one of :data:`ATTACKS`.
    noise: response noise std.
    heterogeneity: ``h`` in ``[0, 1]``.
    ridge: ridge penalty ``lam >= 0``.
    attack_scale: see :func:`make_problem`.
    separation: see :func:`make_problem`.
    spike_rows: see :func:`make_problem`.
    dtype: float dtype.

  Returns:
    A :class:`RegressionProblem`.
  """
  _check_sizes(num_clients, m, n, rank, fraction, noise, heterogeneity, attack,
               allowed=MODEL_ATTACKS)
  if ridge < 0:
    raise ValueError(f"ridge must be >= 0, got {ridge}")
  if ridge == 0 and num_samples < m:
    raise ValueError(f"OLS needs num_samples >= m, got num_samples={num_samples}, m={m}")
  scale = DEFAULT_ATTACK_SCALE[attack] if attack_scale is None else float(attack_scale)
  sep = DEFAULT_SEPARATION.get(attack, 1.0) if separation is None else float(separation)
  arrays = _regression_arrays(
      key,
      int(round(fraction * num_clients)),
      noise,
      heterogeneity,
      scale,
      sep,
      ridge,
      num_clients=num_clients,
      m=m,
      n=n,
      rank=rank,
      attack=attack,
      spike_rows=spike_rows,
      num_samples=num_samples,
  )
  features, targets, updates, truth, subspace, contaminated = arrays
  return RegressionProblem(
      features=features.astype(dtype),
      targets=targets.astype(dtype),
      updates=updates.astype(dtype),
      truth=truth.astype(dtype),
      subspace=subspace.astype(dtype),
      contaminated=contaminated,
      noise=float(noise),
  )


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_samples",))
def _regression_arrays(
    key, count, noise, heterogeneity, scale, separation, ridge, *, num_clients, m, n, rank,
    attack, spike_rows, num_samples,
):
  """Jitted core of :func:`make_regression_problem`."""
  shapes = (
      (m, rank), (1, rank, n), (num_clients, rank, n), (num_clients,),
      (num_clients, num_samples, m), (num_clients, num_samples, n),
  )
  draws = _gaussians(key, shapes + _attack_shapes(num_clients, m, n, rank))
  g_u, g_shared, g_own, g_mask, g_x, g_eps = draws[: len(shapes)]
  subspace = _orthonormalise(g_u)
  coef = _coefficients(g_shared, g_own, m, rank, heterogeneity)
  truth = jnp.einsum("mr,krn->kmn", subspace, coef)
  contaminated = _mask_from_count(g_mask, count)
  attacked = _attack_coefficients(
      draws[len(shapes) :],
      attack,
      truth,
      subspace,
      heterogeneity=heterogeneity,
      attack_scale=scale,
      separation=separation,
      spike_rows=spike_rows,
  )
  features = g_x
  eps = noise * g_eps
  coefficients = jnp.where(contaminated[:, None, None], attacked, truth)
  if attack == "nonfinite":
    # poisoned responses: the bad entries of the attacker's matrix land in a few targets
    bad_rows = ~jnp.all(jnp.isfinite(coefficients), axis=1)  # (K, n)
    clean = jnp.where(jnp.isfinite(coefficients), coefficients, 0.0)
    targets = jnp.einsum("kNm,kmn->kNn", features, clean) + eps
    poison = jnp.where(
        (_nonfinite_rank(contaminated) % 2 == 1)[:, None, None], jnp.inf, jnp.nan
    )
    first_rows = (jnp.arange(num_samples) < 2)[None, :, None]
    targets = jnp.where(bad_rows[:, None, :] & first_rows, poison, targets)
  else:
    targets = jnp.einsum("kNm,kmn->kNn", features, coefficients) + eps
  updates = least_squares_estimates(features, targets, ridge)
  return features, targets, updates, truth, subspace, contaminated
