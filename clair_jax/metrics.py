"""Metrics every study reports: subspace error, detection quality, benign-client error."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DetectionMetrics(NamedTuple):
  """Detection quality of a predicted contaminated set (all scalars in ``[0, 1]``).

  Attributes:
    precision: ``tp / (tp + fp)``; ``1`` when nothing is flagged (no false alarm).
    recall: ``tp / (tp + fn)``; ``1`` when there is nothing to find.
    f1: ``2 p r / (p + r)``; ``0`` when ``p + r = 0``.
    exact: ``1.0`` if the predicted set equals the true set, else ``0.0``.
  """

  precision: jax.Array
  recall: jax.Array
  f1: jax.Array
  exact: jax.Array


def subspace_error(estimate: jax.Array, truth: jax.Array, norm: str = "spectral") -> jax.Array:
  """Sine of the principal angles between two subspaces, ``||sin Theta(Uhat, U)||``.

  .. math::
    \\|\\sin\\Theta(\\hat U, U)\\| = \\|(I - U U^T)\\hat U\\|

  computed from the residual (not as ``sqrt(1 - cos^2)``, which loses all accuracy for
  small angles). With equal ranks the value is symmetric in its arguments; with
  ``rank(estimate) > rank(truth)`` the extra directions count as error.

  Args:
    estimate: ``(m, r_hat)`` orthonormal columns ``Uhat``.
    truth: ``(m, r)`` orthonormal columns ``U``.
    norm: ``"spectral"`` (largest sine, in ``[0, 1]``) or ``"frobenius"`` (root sum of
      squared sines, in ``[0, sqrt(r_hat)]``).

  Returns:
    Scalar error.
  """
  if estimate.ndim != 2 or truth.ndim != 2 or estimate.shape[0] != truth.shape[0]:
    raise ValueError(
        f"expected estimate (m, r_hat) and truth (m, r), got {estimate.shape} and {truth.shape}"
    )
  residual = estimate - truth @ (truth.T @ estimate)
  if norm == "spectral":
    return jnp.linalg.norm(residual, ord=2)
  if norm == "frobenius":
    return jnp.linalg.norm(residual)
  raise ValueError(f"norm must be 'spectral' or 'frobenius', got {norm!r}")


def detection_metrics(predicted: jax.Array, truth: jax.Array) -> DetectionMetrics:
  """Precision, recall, F1 and exact-set recovery of a predicted contaminated set.

  Args:
    predicted: ``(K,)`` bool, clients flagged as contaminated.
    truth: ``(K,)`` bool, the truly contaminated clients.

  Returns:
    :class:`DetectionMetrics` of float scalars. Conventions for empty sets: precision is
    ``1`` when nothing is flagged, recall is ``1`` when nothing is contaminated.
  """
  if predicted.shape != truth.shape or predicted.ndim != 1:
    raise ValueError(
        f"expected predicted and truth of the same shape (K,), got {predicted.shape} "
        f"and {truth.shape}"
    )
  predicted = predicted.astype(bool)
  truth = truth.astype(bool)
  tp = jnp.sum(predicted & truth)
  num_predicted = jnp.sum(predicted)
  num_true = jnp.sum(truth)
  precision = jnp.where(num_predicted > 0, tp / jnp.maximum(num_predicted, 1), 1.0)
  recall = jnp.where(num_true > 0, tp / jnp.maximum(num_true, 1), 1.0)
  denom = precision + recall
  f1 = jnp.where(denom > 0, 2 * precision * recall / jnp.where(denom > 0, denom, 1.0), 0.0)
  exact = jnp.all(predicted == truth).astype(f1.dtype)
  return DetectionMetrics(precision=precision, recall=recall, f1=f1, exact=exact)


def per_client_error(estimates: jax.Array, truth: jax.Array) -> jax.Array:
  """``||Dtilde_k - Delta_k||_F^2`` for every client, ``+inf`` where it is not finite.

  Args:
    estimates: ``(K, m, n)``.
    truth: ``(K, m, n)``.

  Returns:
    ``(K,)`` squared errors.
  """
  if estimates.shape != truth.shape or estimates.ndim != 3:
    raise ValueError(
        f"expected estimates and truth of the same shape (K, m, n), got {estimates.shape} "
        f"and {truth.shape}"
    )
  errors = jnp.sum(jnp.square(estimates - truth), axis=(1, 2))
  return jnp.where(jnp.isfinite(errors), errors, jnp.inf)


def benign_error(estimates: jax.Array, truth: jax.Array, benign_mask: jax.Array) -> jax.Array:
  """Mean squared error over the benign clients.

  .. math::
    \\frac{1}{|B|} \\sum_{k \\in B} \\|\\tilde D_k - \\Delta_k\\|_F^2

  A benign client with a non-finite estimate contributes ``+inf`` (not NaN), so a method
  that propagates a NaN attack is ranked last rather than dropped from comparisons.

  Args:
    estimates: ``(K, m, n)`` per-client estimates ``Dtilde_k``.
    truth: ``(K, m, n)`` true ``Delta_k``.
    benign_mask: ``(K,)`` bool, the benign set ``B``.

  Returns:
    Scalar; NaN if ``B`` is empty.
  """
  if benign_mask.shape != estimates.shape[:1]:
    raise ValueError(
        f"expected benign_mask of shape ({estimates.shape[0]},), got {benign_mask.shape}"
    )
  errors = per_client_error(estimates, truth)
  benign_mask = benign_mask.astype(bool)
  total = jnp.sum(jnp.where(benign_mask, errors, 0.0))
  return total / jnp.sum(benign_mask)
