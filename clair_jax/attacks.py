"""Attacks of the Byzantine-robust FL literature, and two aimed at CLAIR, as pure JAX functions.

Every attacker is *omniscient*, as the papers evaluate it: it reads every benign client's
update before choosing its own. One calling convention for all of them:

.. code-block:: python

  malicious = attack(updates, benign_mask, num_attackers, *, key=None, attacker_noise=0.0,
                     **params)  # -> (num_attackers, m, n)

- ``updates``: ``(K, m, n)``. Statistics read only the rows with ``benign_mask`` True (masked
  with ``where``, so the other rows may hold anything, NaN included: the attackers' own
  honest updates, zeros, garbage). Write ``B`` for the benign set and ``mu``, ``sd`` for the
  coordinate-wise benign mean and standard deviation (``ddof = 1``, as ByzFL and the
  papers' code use ``torch.std``).
- ``benign_mask``: ``(K,)`` bool, or ``None`` for "every row is benign".
- ``num_attackers``: ``f``, a Python int ``>= 1`` (it is the output's leading size). Where a
  formula needs the total number of clients it is ``n = |B| + f``.
- ``attacker_noise``: *absolute* per-entry standard deviation of independent Gaussian noise
  added to each attacker's copy. ``0`` (the default) sends ``f`` identical vectors, as the
  papers do; ``> 0`` needs ``key``. (:func:`clair_jax.synthetic.make_problem` takes it as a
  fraction of the benign noise level and converts.)
- ``key``: PRNG key for the attacks that draw (``gaussian``, ``tilt``) and for
  ``attacker_noise``.

Attacks (formula, source and defaults in each docstring): :func:`alie`, :func:`ipm`,
:func:`min_max`, :func:`min_sum`, :func:`opt_alie`, :func:`opt_ipm`, :func:`mimic`,
:func:`sign_flip`, :func:`gaussian`, :func:`tilt`, :func:`boost`; and :func:`adaptive`, a
white-box wrapper that searches an attack's strength to maximise a caller's objective.

All are pure and ``jit``-able with ``num_attackers`` and the options static, except the
searched ones (``opt_alie``, ``opt_ipm``, ``adaptive``), which run an eager Python search over
jitted evaluations and need a concrete ``benign_mask``. Parameters are checked at the
boundary; a bad one raises a ``ValueError`` that names it.
"""

from __future__ import annotations

import functools
import math
import numbers
from statistics import NormalDist
from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

PERTURBATIONS = ("unit_vec", "std", "sign")

# Streams folded into ``key``: attacker noise and an attack's own draws never share bits.
_NOISE_STREAM = 1
_ATTACK_STREAM = 2


# --------------------------------------------------------------------------- helpers


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_count(num_attackers, name: str) -> int:
  if (not isinstance(num_attackers, numbers.Integral) or isinstance(num_attackers, bool)
      or num_attackers < 1):
    raise ValueError(f"{name}: num_attackers must be a Python int >= 1, got {num_attackers!r}")
  return int(num_attackers)


def _prepare(updates, benign_mask, num_attackers, name: str, min_benign: int = 1):
  """Checks shapes and counts; returns ``(updates, benign_mask, f, |B| or None)``."""
  updates = jnp.asarray(updates)
  if updates.ndim != 3:
    raise ValueError(f"{name}: updates must have shape (K, m, n), got {updates.shape}")
  if not jnp.issubdtype(updates.dtype, jnp.floating):
    updates = updates.astype(jnp.float32)
  num_clients = updates.shape[0]
  if benign_mask is None:
    benign_mask = jnp.ones((num_clients,), bool)
  benign_mask = jnp.asarray(benign_mask)
  if benign_mask.shape != (num_clients,):
    raise ValueError(
        f"{name}: benign_mask must have shape ({num_clients},), got {benign_mask.shape}"
    )
  benign_mask = benign_mask.astype(bool)
  num_attackers = _check_count(num_attackers, name)
  num_benign = None if _is_traced(benign_mask) else int(np.sum(np.asarray(benign_mask)))
  if num_benign is not None and num_benign < min_benign:
    raise ValueError(
        f"{name} needs at least {min_benign} benign client(s) (benign_mask), got {num_benign}"
    )
  return updates, benign_mask, num_attackers, num_benign


def _check_noise(attacker_noise, key, name: str) -> None:
  if _is_traced(attacker_noise):
    if key is None:
      raise ValueError(f"{name}: a traced attacker_noise needs a key")
    return
  if not float(attacker_noise) >= 0:
    raise ValueError(f"{name}: attacker_noise must be >= 0, got {attacker_noise}")
  if float(attacker_noise) > 0 and key is None:
    raise ValueError(f"{name}: attacker_noise > 0 needs a key")


def _replicate(vectors, num_attackers: int, key, attacker_noise):
  """``(f, m, n)``: the vector(s) broadcast to every attacker plus independent noise."""
  out = jnp.broadcast_to(vectors, (num_attackers,) + vectors.shape[-2:])
  if not _is_traced(attacker_noise) and float(attacker_noise) == 0:
    return out
  noise_key = jax.random.fold_in(key, _NOISE_STREAM)
  return out + attacker_noise * jax.random.normal(noise_key, out.shape, out.dtype)


def _masked(updates, benign_mask):
  return jnp.where(benign_mask[:, None, None], updates, 0.0)


def benign_mean(updates, benign_mask) -> jax.Array:
  """Coordinate-wise mean of the benign rows, ``mu = (1/|B|) sum_{k in B} D_k``."""
  count = jnp.sum(benign_mask).astype(updates.dtype)
  return jnp.sum(_masked(updates, benign_mask), axis=0) / count


def benign_std(updates, benign_mask) -> jax.Array:
  """Coordinate-wise sample standard deviation (``ddof = 1``) of the benign rows."""
  mean = benign_mean(updates, benign_mask)
  count = jnp.sum(benign_mask).astype(updates.dtype)
  centred = jnp.where(benign_mask[:, None, None], updates - mean[None], 0.0)
  return jnp.sqrt(jnp.sum(jnp.square(centred), axis=0) / (count - 1.0))


def _pairwise_sq(updates, benign_mask):
  """``(K, K)`` squared Frobenius distances, zero outside benign pairs."""
  flat = _masked(updates, benign_mask).reshape(updates.shape[0], -1)
  dist = jax.vmap(lambda x: jnp.sum(jnp.square(flat - x[None]), axis=1))(flat)
  pair = benign_mask[:, None] & benign_mask[None, :]
  return jnp.where(pair, dist, 0.0)


def _sq_dist_to(updates, benign_mask, point):
  """``(K,)`` squared distances from ``point`` to each benign row (0 elsewhere)."""
  dist = jnp.sum(jnp.square(_masked(updates, benign_mask) - point[None]), axis=(1, 2))
  return jnp.where(benign_mask, dist, 0.0)


def benign_subspace(updates, benign_mask, rank: int) -> jax.Array:
  """Top-``r`` left singular vectors of the stacked benign updates, ``(m, r)`` orthonormal.

  From the eigen-decomposition of the ``m x m`` Gram ``sum_{k in B} D_k D_k^T``.
  """
  blocks = _masked(updates, benign_mask)
  gram = jnp.einsum("kmn,kpn->mp", blocks, blocks)
  _, vectors = jnp.linalg.eigh(gram)
  return vectors[:, ::-1][:, :rank]


def _project(x, basis):
  return jnp.einsum("mr,pr,...pn->...mn", basis, basis, x)


def _check_subspace(updates, rank, subspace, name: str):
  m = updates.shape[1]
  if subspace is not None:
    subspace = jnp.asarray(subspace, updates.dtype)
    if subspace.ndim != 2 or subspace.shape[0] != m or not 1 <= subspace.shape[1] < m:
      raise ValueError(
          f"{name}: subspace must have shape (m={m}, r) with 1 <= r < m, got {subspace.shape}"
      )
    return subspace, subspace.shape[1]
  if rank is None:
    raise ValueError(f"{name} needs rank (or subspace)")
  if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank < m:
    raise ValueError(f"{name}: rank must be an int in [1, m={m}), got {rank!r}")
  return None, int(rank)


def _check_own(own_updates, updates, num_attackers, name: str):
  if own_updates is None:
    return None
  own_updates = jnp.asarray(own_updates, updates.dtype)
  expected = (num_attackers,) + updates.shape[1:]
  if own_updates.shape != expected:
    raise ValueError(f"{name}: own_updates must have shape {expected}, got {own_updates.shape}")
  return own_updates


# --------------------------------------------------------------------------- ALIE, IPM


def alie_z(num_clients: int, num_attackers: int) -> float:
  """ALIE's ``z_max`` (Baruch et al. 2019, Sec. 3):

  .. math::
    s = \\lfloor n/2 + 1 \\rfloor - f, \\qquad z = \\Phi^{-1}\\big((n - s) / n\\big),

  the largest shift (in benign standard deviations) at which the ``f`` attackers still find
  ``s`` benign "supporters" closer to the attack than to the mean, ``n`` the total number of
  clients. ``n = 40, f = 12`` gives ``s = 9`` and ``z = Phi^{-1}(0.775) = 0.755``. Small ``f``
  gives ``z <= 0`` (the paper's formula, kept as is).

  Raises:
    ValueError: if ``s <= 0`` (``f >= n/2 + 1``: no finite ``z``) or ``f >= n``.
  """
  if not 1 <= num_attackers < num_clients:
    raise ValueError(
        f"alie_z: need 1 <= num_attackers < num_clients, got num_attackers={num_attackers}, "
        f"num_clients={num_clients}"
    )
  supporters = math.floor(num_clients / 2 + 1) - num_attackers
  if supporters <= 0:
    raise ValueError(
        f"alie_z: num_attackers={num_attackers} of num_clients={num_clients} leaves "
        f"s = floor(n/2 + 1) - f = {supporters} <= 0 supporters; the paper's z is infinite"
    )
  return NormalDist().inv_cdf((num_clients - supporters) / num_clients)


def _alie_z_traced(num_benign, num_attackers, dtype):
  n = num_benign + num_attackers
  s = jnp.floor(n / 2 + 1) - num_attackers
  return jax.scipy.special.ndtri(((n - s) / n).astype(dtype))


def alie(updates, benign_mask, num_attackers, *, z=None, key=None, attacker_noise=0.0):
  """A Little Is Enough (Baruch, Baruch, Goldberg, NeurIPS 2019).

  .. math::
    a = \\mu - z\\, \\sigma \\quad \\text{(coordinate-wise)},

  ``mu``/``sigma`` the benign mean and standard deviation (``ddof = 1``). Default ``z``: the
  paper's :func:`alie_z` at ``n = |B| + f`` (0.755 for ``n = 40, f = 12``). Needs
  ``|B| >= 2``.

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, num_benign = _prepare(updates, benign_mask, num_attackers, "alie", 2)
  _check_noise(attacker_noise, key, "alie")
  if z is None:
    if num_benign is not None:
      z = alie_z(num_benign + f, f)
    else:
      z = _alie_z_traced(jnp.sum(benign_mask), f, updates.dtype)
  vector = benign_mean(updates, benign_mask) - z * benign_std(updates, benign_mask)
  return _replicate(vector, f, key, attacker_noise)


def ipm(updates, benign_mask, num_attackers, *, epsilon=0.1, key=None, attacker_noise=0.0):
  """Inner-product manipulation (Xie, Koyejo, Gupta, "Fall of Empires", UAI 2020).

  .. math::
    a = -\\varepsilon\\, \\mu,

  which makes the inner product of the aggregate with the true mean negative once the
  attackers are heard. The paper's two regimes: ``epsilon = 0.1`` (default, small, hides
  near the benign cloud) and ``epsilon = 100`` (large).

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, "ipm", 1)
  _check_noise(attacker_noise, key, "ipm")
  vector = -epsilon * benign_mean(updates, benign_mask)
  return _replicate(vector, f, key, attacker_noise)


# --------------------------------------------------------------------------- min-max, min-sum


def _perturbation(updates, benign_mask, kind: str):
  mean = benign_mean(updates, benign_mask)
  if kind == "unit_vec":
    norm = jnp.linalg.norm(mean)
    return mean, jnp.where(norm > 0, -mean / jnp.where(norm > 0, norm, 1.0), 0.0)
  if kind == "std":
    return mean, -benign_std(updates, benign_mask)
  if kind == "sign":
    return mean, -jnp.sign(mean)
  raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {kind!r}")


def largest_feasible(feasible: Callable, start, *, max_doublings: int = 64,
                     bisections: int = 64):
  """The largest ``gamma >= 0`` with ``feasible(gamma)``, for a feasible set ``[0, gamma*]``.

  No cap (unlike the NDSS'21 code, whose search never leaves ``[0, 2 gamma_init]``): from
  ``start`` double while feasible (or halve while infeasible) until the boundary is bracketed,
  then bisect ``bisections`` times. Returns the feasible end of the bracket, so
  ``feasible(result)`` holds. Jittable (``lax`` loops).
  """
  start = jnp.asarray(start)
  ok = feasible(start)
  grow = jnp.where(ok, 2.0, 0.5).astype(start.dtype)

  def cond(state):
    g, i = state
    return (i < max_doublings) & (feasible(g * grow) == ok)

  def body(state):
    g, i = state
    return g * grow, i + 1

  edge, _ = jax.lax.while_loop(cond, body, (start, 0))
  lo = jnp.where(ok, edge, edge * 0.5)
  hi = jnp.where(ok, edge * 2.0, edge)

  def bisect(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    good = feasible(mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

  lo, _ = jax.lax.fori_loop(0, bisections, bisect, (lo, hi))
  return lo


def search_gamma(updates, benign_mask=None, *, rule: str = "min_max",
                 perturbation: str = "unit_vec") -> jax.Array:
  """Shejwalkar & Houmansadr's (NDSS 2021) attack strength ``gamma`` (uncapped search).

  With ``a(gamma) = mu + gamma p`` and the benign updates ``g_i``:

  .. math::
    \\text{min-max:}\\ \\max_{i \\in B} \\|a - g_i\\| \\le \\max_{i,j \\in B} \\|g_i - g_j\\|,
    \\qquad
    \\text{min-sum:}\\ \\sum_{i \\in B} \\|a - g_i\\|^2
      \\le \\max_{i \\in B} \\sum_{j \\in B} \\|g_i - g_j\\|^2.

  Both sides are convex in ``gamma`` and hold at ``gamma = 0`` (the mean lies in the benign
  hull), so the feasible set is an interval ``[0, gamma*]``; :func:`largest_feasible`
  finds ``gamma*`` to float precision. ``gamma = 0`` when ``p = 0``.

  Args:
    updates: ``(K, m, n)``.
    benign_mask: ``(K,)`` bool or ``None``.
    rule: ``"min_max"`` or ``"min_sum"``.
    perturbation: ``"unit_vec"`` (``-mu/||mu||``), ``"std"`` (``-sd``) or ``"sign"``
      (``-sign(mu)``).

  Returns:
    Scalar ``gamma*``.
  """
  if rule not in ("min_max", "min_sum"):
    raise ValueError(f"rule must be 'min_max' or 'min_sum', got {rule!r}")
  if perturbation not in PERTURBATIONS:
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
  updates, benign_mask, _, _ = _prepare(updates, benign_mask, 1, rule, 2)
  return _search_gamma(updates, benign_mask, rule, perturbation)


@functools.partial(jax.jit, static_argnames=("rule", "perturbation"))
def _search_gamma(updates, benign_mask, rule, perturbation):
  mean, direction = _perturbation(updates, benign_mask, perturbation)
  pairwise = _pairwise_sq(updates, benign_mask)
  if rule == "min_max":
    bound = jnp.max(pairwise)
    value = lambda g: jnp.max(_sq_dist_to(updates, benign_mask, mean + g * direction))
    scale = jnp.sqrt(bound)
  else:
    bound = jnp.max(jnp.sum(pairwise, axis=1))
    value = lambda g: jnp.sum(_sq_dist_to(updates, benign_mask, mean + g * direction))
    scale = jnp.sqrt(bound / jnp.sum(benign_mask))
  size = jnp.linalg.norm(direction)
  start = jnp.where(size > 0, scale / jnp.where(size > 0, size, 1.0), 1.0)
  start = jnp.where(start > 0, start, 1.0).astype(updates.dtype)
  gamma = largest_feasible(lambda g: value(g) <= bound, start)
  return jnp.where(size > 0, gamma, 0.0)


def _shejwalkar(rule, updates, benign_mask, num_attackers, perturbation, gamma, key,
                attacker_noise):
  if perturbation not in PERTURBATIONS:
    raise ValueError(f"{rule}: perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, rule, 2)
  _check_noise(attacker_noise, key, rule)
  mean, direction = _perturbation(updates, benign_mask, perturbation)
  if gamma is None:
    gamma = _search_gamma(updates, benign_mask, rule, perturbation)
  return _replicate(mean + gamma * direction, f, key, attacker_noise)


def min_max(updates, benign_mask, num_attackers, *, perturbation="unit_vec", gamma=None,
            key=None, attacker_noise=0.0):
  """Min-max attack (Shejwalkar & Houmansadr, NDSS 2021, AGR-agnostic).

  .. math::
    a = \\mu + \\gamma^\\star p, \\qquad
    \\gamma^\\star = \\max\\{\\gamma : \\max_{i \\in B}\\|a - g_i\\|
      \\le \\max_{i,j \\in B}\\|g_i - g_j\\|\\},

  the malicious update is no farther from any benign update than two benign updates are from
  each other. ``p``: ``"unit_vec"`` (default, the paper's code default) ``-mu/||mu||``,
  ``"std"`` ``-sd``, ``"sign"`` ``-sign(mu)``. ``gamma`` by :func:`search_gamma` (no cap)
  unless given. Needs ``|B| >= 2``.

  Returns:
    ``(num_attackers, m, n)``.
  """
  return _shejwalkar("min_max", updates, benign_mask, num_attackers, perturbation, gamma, key,
                     attacker_noise)


def min_sum(updates, benign_mask, num_attackers, *, perturbation="unit_vec", gamma=None,
            key=None, attacker_noise=0.0):
  """Min-sum attack (Shejwalkar & Houmansadr, NDSS 2021, AGR-agnostic).

  .. math::
    a = \\mu + \\gamma^\\star p, \\qquad
    \\gamma^\\star = \\max\\{\\gamma : \\sum_{i \\in B}\\|a - g_i\\|^2
      \\le \\max_{i \\in B} \\sum_{j \\in B}\\|g_i - g_j\\|^2\\},

  the malicious update's summed squared distance to the benign ones is no larger than any
  benign update's. Perturbations and defaults as in :func:`min_max`. Needs ``|B| >= 2``.

  Returns:
    ``(num_attackers, m, n)``.
  """
  return _shejwalkar("min_sum", updates, benign_mask, num_attackers, perturbation, gamma, key,
                     attacker_noise)


# --------------------------------------------------------------------------- Opt-ALIE / Opt-IPM


class LineSearchResult(NamedTuple):
  """Output of :func:`line_maximize`: the best strength found, its value, evaluations used."""

  argmax: float
  value: float
  num_evals: int


def line_maximize(objective: Callable[[float], float], *, evals: int = 16, start: float = 0.0,
                  delta: float = 1.0, ratio: float = 0.8) -> LineSearchResult:
  """Best-effort ``argmax_{x >= 0} objective(x)`` by exploration (ByzFL's ``LineMaximize``).

  Expansion: from ``start``, step ``x + delta``, doubling ``delta`` while the value improves;
  then contraction: probe around the best point with ``delta`` shrunk by ``ratio`` per
  evaluation (probes below 0 are pulled back halfway). ``evals`` evaluations in all.
  Defaults are ByzFL's (Allouah et al. 2023): 16, 0, 1, 0.8.
  """
  if not isinstance(evals, numbers.Integral) or evals < 1:
    raise ValueError(f"line_maximize: evals must be an int >= 1, got {evals!r}")
  if start < 0 or delta <= 0 or not 0.5 < ratio < 1.0:
    raise ValueError(
        f"line_maximize: need start >= 0, delta > 0, 0.5 < ratio < 1; got start={start}, "
        f"delta={delta}, ratio={ratio}"
    )
  best_x, best_y = float(start), float(objective(start))
  left, prop_x = evals - 1, best_x
  while left > 0:  # expansion
    prop_x = best_x + delta
    prop_y = float(objective(prop_x))
    left -= 1
    if prop_y > best_y:
      best_x, best_y = prop_x, prop_y
      delta *= 2.0
    else:
      delta *= ratio
      break
  while left > 0:  # contraction
    if prop_x < best_x:
      prop_x += delta
    else:
      x = prop_x - delta
      while x < 0:
        x = 0.5 * (x + prop_x)
      prop_x = x
    prop_y = float(objective(prop_x))
    left -= 1
    if prop_y > best_y:
      best_x, best_y = prop_x, prop_y
    delta *= ratio
  return LineSearchResult(best_x, best_y, evals - left)


def coordinate_median(stacked: jax.Array) -> jax.Array:
  """Default target aggregator: coordinate-wise median of ``(K, m, n)`` -> ``(m, n)``."""
  return jnp.median(stacked, axis=0)


@functools.partial(jax.jit, static_argnames=("target", "num_attackers"))
def _damage(benign, malicious, target, num_attackers):
  mean = jnp.mean(benign, axis=0)
  attackers = jnp.broadcast_to(malicious, (num_attackers,) + benign.shape[1:])
  stacked = jnp.concatenate([benign, attackers], axis=0)
  return jnp.linalg.norm(target(stacked) - mean)


def _concrete_benign(updates, benign_mask, name):
  if _is_traced(benign_mask) or _is_traced(updates):
    raise ValueError(f"{name} runs an eager search: call it outside jit (concrete arrays)")
  return updates[np.asarray(benign_mask)]


def aggregator_damage(updates, benign_mask, malicious, target: Callable | None = None) -> float:
  """``||target(benign + malicious) - mu||_F``: how far the attack moves the target's output.

  The objective Opt-ALIE / Opt-IPM maximise (Allouah et al. 2023). ``malicious`` is
  ``(f, m, n)``; the target sees the benign rows followed by the ``f`` malicious ones.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, np.shape(malicious)[0],
                                        "aggregator_damage", 1)
  benign = _concrete_benign(updates, benign_mask, "aggregator_damage")
  stacked = jnp.concatenate([benign, jnp.asarray(malicious, updates.dtype)], axis=0)
  target = coordinate_median if target is None else target
  return float(jnp.linalg.norm(target(stacked) - jnp.mean(benign, axis=0)))


def _opt(kind, updates, benign_mask, num_attackers, target, evals, start, delta, ratio, key,
         attacker_noise):
  name = f"opt_{kind}"
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, name,
                                        2 if kind == "alie" else 1)
  _check_noise(attacker_noise, key, name)
  target = coordinate_median if target is None else target
  benign = _concrete_benign(updates, benign_mask, name)
  mean = jnp.mean(benign, axis=0)
  if kind == "alie":
    direction = -jnp.std(benign, axis=0, ddof=1)
    vector = lambda x: mean + x * direction
  else:
    vector = lambda x: -x * mean
  objective = lambda x: _damage(benign, vector(jnp.asarray(x, updates.dtype)), target, f)
  best = line_maximize(objective, evals=evals, start=start, delta=delta, ratio=ratio)
  return _replicate(vector(jnp.asarray(best.argmax, updates.dtype)), f, key, attacker_noise)


def opt_alie(updates, benign_mask, num_attackers, *, target: Callable | None = None,
             evals: int = 16, start: float = 0.0, delta: float = 1.0, ratio: float = 0.8,
             key=None, attacker_noise=0.0):
  """Optimised ALIE (Allouah et al., "Fixing by Mixing", AISTATS 2023; ByzFL).

  .. math::
    a = \\mu - z^\\star \\sigma, \\qquad
    z^\\star = \\operatorname{argmax}_{z \\ge 0}
      \\big\\|T(\\{g_i\\}_{i \\in B} \\cup \\{a(z)\\}^{f}) - \\mu\\big\\|_F

  found by :func:`line_maximize` (ByzFL's defaults: 16 evaluations from 0, step 1, ratio
  0.8). ``target`` ``T``: a ``(K', m, n) -> (m, n)`` aggregator, default
  :func:`coordinate_median`; it must be jittable and hashable (a module-level function).
  Eager (concrete ``benign_mask``). Needs ``|B| >= 2``.

  Returns:
    ``(num_attackers, m, n)``.
  """
  return _opt("alie", updates, benign_mask, num_attackers, target, evals, start, delta, ratio,
              key, attacker_noise)


def opt_ipm(updates, benign_mask, num_attackers, *, target: Callable | None = None,
            evals: int = 16, start: float = 0.0, delta: float = 1.0, ratio: float = 0.8,
            key=None, attacker_noise=0.0):
  """Optimised IPM (Allouah et al. 2023; ByzFL): ``a = -eps* mu`` with ``eps*`` line-searched.

  .. math::
    \\varepsilon^\\star = \\operatorname{argmax}_{\\varepsilon \\ge 0}
      \\big\\|T(\\{g_i\\}_{i \\in B} \\cup \\{-\\varepsilon\\mu\\}^{f}) - \\mu\\big\\|_F

  Search and ``target`` as in :func:`opt_alie`.

  Returns:
    ``(num_attackers, m, n)``.
  """
  return _opt("ipm", updates, benign_mask, num_attackers, target, evals, start, delta, ratio,
              key, attacker_noise)


# --------------------------------------------------------------------------- mimic, sign, gaussian


def mimic_target(updates, benign_mask=None) -> jax.Array:
  """Index of the benign client the mimic attack copies (largest-variance direction).

  Karimireddy, He, Jaggi (ICLR 2022): ``z`` = top principal direction of the centred benign
  updates, ``i* = argmax_{i in B} |<z, g_i - mu>|``. The paper estimates ``z`` online over
  rounds; one-shot, it is the top eigenvector of the benign covariance (computed through
  the ``K x K`` Gram of the centred rows, whose top eigenvector ``v`` gives
  ``<z, g_i - mu> proportional to v_i``).
  """
  updates, benign_mask, _, _ = _prepare(updates, benign_mask, 1, "mimic", 1)
  return _mimic_index(updates, benign_mask)


def _mimic_index(updates, benign_mask):
  mean = benign_mean(updates, benign_mask)
  centred = jnp.where(benign_mask[:, None, None], updates - mean[None], 0.0)
  flat = centred.reshape(updates.shape[0], -1)
  _, vectors = jnp.linalg.eigh(flat @ flat.T)
  loading = jnp.abs(vectors[:, -1])
  return jnp.argmax(jnp.where(benign_mask, loading, -1.0))


def mimic(updates, benign_mask, num_attackers, *, client=None, key=None, attacker_noise=0.0):
  """Mimic (Karimireddy, He, Jaggi, ICLR 2022): every attacker sends one benign update.

  .. math::
    a = g_{i^\\star}, \\qquad i^\\star = \\operatorname{argmax}_{i \\in B}
      |\\langle z, g_i - \\mu \\rangle|

  with ``z`` the top principal direction of the benign updates (:func:`mimic_target`),
  which over-weights that client's direction of heterogeneity. ``client``: copy this
  index of ``updates`` instead (it must be benign when the mask is concrete).

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, "mimic", 1)
  _check_noise(attacker_noise, key, "mimic")
  if client is None:
    client = _mimic_index(updates, benign_mask)
  elif not _is_traced(client):
    if not (0 <= int(client) < updates.shape[0]):
      raise ValueError(
          f"mimic: client must index updates (0..{updates.shape[0] - 1}), got {client}"
      )
    if not _is_traced(benign_mask) and not bool(np.asarray(benign_mask)[int(client)]):
      raise ValueError(f"mimic: client {client} is not benign (benign_mask)")
  return _replicate(updates[client], f, key, attacker_noise)


def sign_flip(updates, benign_mask, num_attackers, *, scale=1.0, own_updates=None, key=None,
              attacker_noise=0.0):
  """Sign flipping (as in ByzFL, after Allen-Zhu et al., ICLR 2021).

  .. math::
    a = -s\\, \\mu \\quad \\text{(default)}, \\qquad a_j = -s\\, h_j
    \\quad \\text{(``own_updates`` given: each attacker flips its own honest } h_j),

  default ``s = 1``. (``clair_jax.synthetic``'s older ``sign_flip`` is the second form with
  ``s = 3``.)

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, "sign_flip", 1)
  _check_noise(attacker_noise, key, "sign_flip")
  own = _check_own(own_updates, updates, f, "sign_flip")
  base = benign_mean(updates, benign_mask) if own is None else own
  return _replicate(-scale * base, f, key, attacker_noise)


def gaussian(updates, benign_mask, num_attackers, *, sigma=None, key=None, attacker_noise=0.0):
  """Gaussian attack: ``a ~ N(mu, sigma^2 I)``, one draw shared by every attacker.

  The papers' absolute ``sigma`` depends on their gradients' scale; the default here is
  scale-free: ``sigma = sqrt(mean_ij sd_ij^2)``, the benign clients' root-mean-square
  coordinate-wise standard deviation (needs ``|B| >= 2``). Needs ``key``.

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, "gaussian",
                                        2 if sigma is None else 1)
  if key is None:
    raise ValueError("gaussian needs a key")
  _check_noise(attacker_noise, key, "gaussian")
  if sigma is None:
    sigma = jnp.sqrt(jnp.mean(jnp.square(benign_std(updates, benign_mask))))
  elif not _is_traced(sigma) and not float(sigma) >= 0:
    raise ValueError(f"gaussian: sigma must be >= 0, got {sigma}")
  draw = jax.random.normal(jax.random.fold_in(key, _ATTACK_STREAM), updates.shape[1:],
                           updates.dtype)
  return _replicate(benign_mean(updates, benign_mask) + sigma * draw, f, key, attacker_noise)


# --------------------------------------------------------------------------- aimed at CLAIR


def benign_noise_level(updates, benign_mask, subspace) -> jax.Array:
  """Per-entry noise std from the benign off-subspace residuals.

  .. math::
    \\hat\\sigma^2 = \\frac{\\sum_{k \\in B}\\|(I - U U^T) D_k\\|_F^2}{|B|\\,(m - r)\\, n}.

  (With ``U`` fitted on the same data it is slightly low: the fit absorbs some noise.)
  """
  m, n = updates.shape[1:]
  rank = subspace.shape[1]
  blocks = _masked(updates, benign_mask)
  residual = blocks - _project(blocks, subspace)
  count = jnp.sum(benign_mask).astype(updates.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(residual)) / (count * (m - rank) * n))


def tilt_direction(key, subspace, n: int, direction=None) -> jax.Array:
  """A unit-Frobenius ``(m, n)`` direction whose columns are orthogonal to ``subspace``.

  Default: ``d = a b^T`` with ``a`` a Gaussian vector with ``U`` projected out and ``b`` a
  Gaussian ``n``-vector, both normalised (rank one: every attacker pushes the same new
  column direction ``a``). A given ``direction`` is projected off ``U`` and normalised.
  """
  if direction is None:
    k_left, k_right = jax.random.split(key)
    left = jax.random.normal(k_left, (subspace.shape[0],), subspace.dtype)
    right = jax.random.normal(k_right, (n,), subspace.dtype)
    direction = jnp.outer(left, right)
  direction = jnp.asarray(direction, subspace.dtype)
  for _ in range(2):  # project out U twice (re-orthogonalised)
    direction = direction - _project(direction, subspace)
  return direction / jnp.linalg.norm(direction)


def tilt(updates, benign_mask, num_attackers, *, rank=None, subspace=None, noise_level=None,
         tilt_scale=1.0, direction=None, own_updates=None, key=None, attacker_noise=0.0):
  """Subspace tilt, aimed at CLAIR: one shared off-subspace direction at noise size.

  .. math::
    a_j = b_j + t\\, \\hat\\sigma \\sqrt{m n}\\; d, \\qquad U^T d = 0,\\ \\|d\\|_F = 1,

  ``b_j`` the attacker's own honest update (``own_updates``) or, by default, the benign mean
  ``mu``; ``sigma_hat sqrt(m n)`` a benign client's noise norm (``noise_level`` or
  :func:`benign_noise_level`); ``t = tilt_scale`` (default 1). No single attacker stands
  out (its extra norm is one noise norm), but ``f`` of them add ``f t^2 sigma^2 m n`` of
  energy along the same new column direction, which tilts a fitted subspace. ``U``:
  ``subspace`` (e.g. the true one) or the top-``rank`` subspace of the benign updates
  (:func:`benign_subspace`). ``d``: ``direction`` (projected off ``U``) or drawn from ``key``
  (:func:`tilt_direction`); one of them is required.

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, "tilt", 1)
  _check_noise(attacker_noise, key, "tilt")
  basis, rank = _check_subspace(updates, rank, subspace, "tilt")
  if key is None and direction is None:
    raise ValueError("tilt needs key or direction")
  if direction is not None and np.shape(direction) != updates.shape[1:]:
    raise ValueError(f"tilt: direction must have shape {updates.shape[1:]}, got "
                     f"{np.shape(direction)}")
  if not _is_traced(tilt_scale) and not float(tilt_scale) >= 0:
    raise ValueError(f"tilt: tilt_scale must be >= 0, got {tilt_scale}")
  own = _check_own(own_updates, updates, f, "tilt")
  if basis is None:
    basis = benign_subspace(updates, benign_mask, rank)
  if noise_level is None:
    noise_level = benign_noise_level(updates, benign_mask, basis)
  m, n = updates.shape[1:]
  unit = tilt_direction(
      None if key is None else jax.random.fold_in(key, _ATTACK_STREAM), basis, n, direction
  )
  push = tilt_scale * noise_level * math.sqrt(m * n) * unit
  base = benign_mean(updates, benign_mask) if own is None else own
  return _replicate(base + push, f, key, attacker_noise)


def boost(updates, benign_mask, num_attackers, *, factor=10.0, rank=None, subspace=None,
          own_updates=None, key=None, attacker_noise=0.0):
  """In-subspace boost, aimed at CLAIR: an honest-looking update times a large factor.

  .. math::
    a_j = c\\, U U^T b_j,

  ``b_j`` the benign mean (default: identical attackers) or each attacker's own honest update
  (``own_updates``), ``c = factor`` (default 10; the issue's grid uses 10 and 100), ``U`` as
  in :func:`tilt`. Such updates live in the benign subspace: they must not move anyone's
  refined update, and a count of explained energy must not let them win.

  Returns:
    ``(num_attackers, m, n)``.
  """
  updates, benign_mask, f, _ = _prepare(updates, benign_mask, num_attackers, "boost", 1)
  _check_noise(attacker_noise, key, "boost")
  basis, rank = _check_subspace(updates, rank, subspace, "boost")
  own = _check_own(own_updates, updates, f, "boost")
  if basis is None:
    basis = benign_subspace(updates, benign_mask, rank)
  base = benign_mean(updates, benign_mask) if own is None else own
  return _replicate(factor * _project(base, basis), f, key, attacker_noise)


# --------------------------------------------------------------------------- registry, adaptive


ATTACKS = {
    "alie": alie,
    "ipm": ipm,
    "min_max": min_max,
    "min_sum": min_sum,
    "opt_alie": opt_alie,
    "opt_ipm": opt_ipm,
    "mimic": mimic,
    "sign_flip": sign_flip,
    "gaussian": gaussian,
    "tilt": tilt,
    "boost": boost,
}

# The keyword :func:`adaptive` searches, per attack.
STRENGTH_PARAMS = {
    "alie": "z",
    "ipm": "epsilon",
    "min_max": "gamma",
    "min_sum": "gamma",
    "sign_flip": "scale",
    "gaussian": "sigma",
    "tilt": "tilt_scale",
    "boost": "factor",
}

DEFAULT_STRENGTHS = {
    "alie": (0.25, 0.5, 1.0, 2.0, 4.0),
    "ipm": (0.1, 0.5, 1.0, 2.0, 10.0, 100.0),
    "sign_flip": (0.5, 1.0, 2.0, 4.0),
    "tilt": (0.25, 0.5, 1.0, 2.0, 4.0),
    "boost": (2.0, 10.0, 100.0),
}


class AdaptiveResult(NamedTuple):
  """Output of :func:`adaptive`.

  Attributes:
    updates: ``(num_attackers, m, n)`` the most damaging malicious updates found.
    strength: the strength that produced them.
    value: ``evaluate(updates)`` there.
    values: ``evaluate`` at every strength tried, in order.
  """

  updates: jax.Array
  strength: float
  value: float
  values: tuple[float, ...]


def adaptive(attack: str, updates, benign_mask, num_attackers, *, evaluate: Callable,
             strengths=None, key=None, attacker_noise=0.0, **params) -> AdaptiveResult:
  """White-box adaptive attack: the strength of ``attack`` that maximises ``evaluate``.

  .. math::
    s^\\star = \\operatorname{argmax}_{s \\in S}\\ \\text{evaluate}(\\text{attack}(\\ldots;
      s)),

  over the grid ``S = strengths`` (default :data:`DEFAULT_STRENGTHS`; the keyword searched is
  :data:`STRENGTH_PARAMS`). ``evaluate`` receives the ``(num_attackers, m, n)`` malicious
  updates and returns a float to maximise (e.g. CLAIR's benign error after inserting them:
  a white-box attacker that can run the defence). Every candidate uses the same ``key``, so
  only the strength differs. An eager Python loop (one ``evaluate`` per strength).

  Returns:
    :class:`AdaptiveResult`.
  """
  if attack not in STRENGTH_PARAMS:
    raise ValueError(
        f"adaptive: attack must be one of {sorted(STRENGTH_PARAMS)}, got {attack!r}"
    )
  param = STRENGTH_PARAMS[attack]
  if param in params:
    raise ValueError(f"adaptive searches {param!r}; pass candidates as strengths, not {param}")
  if strengths is None:
    if attack not in DEFAULT_STRENGTHS:
      raise ValueError(f"adaptive: give strengths for {attack!r} (no default grid)")
    strengths = DEFAULT_STRENGTHS[attack]
  strengths = tuple(float(s) for s in strengths)
  if not strengths:
    raise ValueError("adaptive: strengths must be non-empty")
  fn = ATTACKS[attack]
  best, values = None, []
  for strength in strengths:
    malicious = fn(updates, benign_mask, num_attackers, key=key, attacker_noise=attacker_noise,
                   **{param: strength}, **params)
    value = float(evaluate(malicious))
    values.append(value)
    # NaN counts as the worst value (an attack that breaks the evaluation is not "better").
    if best is None or (value > best[2]) or (math.isnan(best[2]) and not math.isnan(value)):
      best = (malicious, strength, value)
  return AdaptiveResult(best[0], best[1], best[2], tuple(values))
