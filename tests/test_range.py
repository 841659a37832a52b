"""Input range, option validation and result summaries at the boundary of :func:`clair`."""

import chex
import jax
import numpy as np
import pytest

import clair_jax
from problems import make_problem

# One shape for the whole file: a single compile serves every scale.
PROBLEM = make_problem(num_clients=20, m=48, n=12, rank=3, fraction=0.25, noise=0.05, seed=3)


@pytest.fixture(scope="module")
def reference():
  return clair_jax.clair(PROBLEM.updates, 3)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_verdicts_do_not_depend_on_the_input_scale(reference, scale):
  """Float32 input scaled anywhere from 1e-30 to 1e30: the same verdicts (no square
  over- or underflows), and outputs that scale with the input."""
  assert np.array_equal(reference.contaminated, PROBLEM.contaminated)
  scaled = (PROBLEM.updates.astype(np.float64) * scale).astype(np.float32)
  result = clair_jax.clair(scaled, 3)
  assert result.status_name == "successful"
  chex.assert_shape(result.refined, PROBLEM.updates.shape)
  chex.assert_shape(result.subspace, (PROBLEM.updates.shape[1], 3))
  chex.assert_tree_all_finite((result.refined, result.scores[reference.benign]))
  np.testing.assert_array_equal(result.contaminated, reference.contaminated)
  np.testing.assert_allclose(float(result.noise_level) / scale, float(reference.noise_level),
                             rtol=1e-3)
  benign = ~np.asarray(reference.contaminated)
  np.testing.assert_allclose(np.asarray(result.refined)[benign] / scale,
                             np.asarray(reference.refined)[benign], rtol=1e-3, atol=1e-5)


def test_all_non_finite_input_is_one_clear_error():
  bad = np.full((5, 8, 4), np.nan, np.float32)
  bad[1] = np.inf
  with pytest.raises(ValueError, match="all 5 client updates contain NaN or Inf"):
    clair_jax.clair(bad, 1)
  with pytest.raises(ValueError, match="all 5 client factors contain NaN or Inf"):
    clair_jax.clair(clair_jax.FactoredUpdates(bad[:, :, :2], bad[:, :2, :]), 1)


@pytest.mark.parametrize("option, value", [
    ("tol", -1.0), ("tol", float("nan")), ("max_steps", 0), ("max_steps", 2.5),
    ("continuation_factor", 2.0), ("continuation_factor", 0.0), ("max_trim_steps", -1),
    ("mad_multiplier", -1.0), ("num_candidates", 0), ("scale_floor", -1e-3),
])
def test_out_of_range_options_are_refused_by_name(option, value):
  with pytest.raises(ValueError, match=option):
    clair_jax.clair(PROBLEM.updates, 3, **{option: value})


def test_negative_or_nan_client_weights_are_refused():
  weights = np.ones(20)
  weights[[2, 7]] = [-1.0, np.nan]
  with pytest.raises(ValueError, match=r"clients \[2, 7\]"):
    clair_jax.clair(PROBLEM.updates, 3, client_weights=weights)


def test_summary_rounds_and_handles_batched_results(reference):
  text = reference.summary()
  assert "clients flagged" in text
  # Every number in the thresholds list has at most 3 significant digits.
  thresholds = text.split("thresholds [")[1].split("]")[0].split(", ")
  assert all(len(t.replace(".", "").replace("-", "").lstrip("0")) <= 3 for t in thresholds)
  batched = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), reference,
                         reference)
  lines = batched.summary()
  assert lines.count("problem 0:") == 1 and lines.count("problem 1:") == 1
  assert lines.count("clients flagged") == 2


def test_a_new_float_option_value_does_not_recompile():
  """Float options are traced: a second value reuses the compiled program, and the value
  still acts (a higher residual floor flags no more clients)."""
  from clair_jax._src import estimator
  first = clair_jax.clair(PROBLEM.updates, 3, threshold_ratio=1.7, tol=3e-4)
  compiled = estimator._clair_compiled._cache_size()
  second = clair_jax.clair(PROBLEM.updates, 3, threshold_ratio=50.0, tol=2e-4)
  assert estimator._clair_compiled._cache_size() == compiled
  assert np.sum(second.contaminated) <= np.sum(first.contaminated)
  assert float(np.asarray(second.thresholds)[0]) >= 50.0 - 1e-3  # the floor took effect
  assert float(np.asarray(first.thresholds)[0]) < 50.0


def test_status_codes_carry_their_meaning(reference):
  assert reference.status_name == "successful"
  assert "converged" in reference.status_message
  assert clair_jax.STATUS_NAMES == {int(s): s.name.lower() for s in clair_jax.Status}
  assert "max_steps" in clair_jax.Status.MAX_STEPS_REACHED.message
  assert clair_jax.Status(3).message.startswith("no client has finite updates")


def test_options_object_and_keywords_agree(reference):
  options = clair_jax.ClairOptions(threshold_ratio=50.0, mad_multiplier=0.0)
  as_object = clair_jax.clair(PROBLEM.updates, 3, options=options)
  as_keywords = clair_jax.clair(PROBLEM.updates, 3, threshold_ratio=50.0, mad_multiplier=0.0)
  np.testing.assert_array_equal(as_object.thresholds, as_keywords.thresholds)
  assert float(np.asarray(as_object.thresholds)[0]) >= 50.0 - 1e-3
  # keywords override the object
  back = clair_jax.clair(PROBLEM.updates, 3, options=options, threshold_ratio=None,
                         mad_multiplier=3.0)
  np.testing.assert_array_equal(back.contaminated, reference.contaminated)
  with pytest.raises(TypeError, match="ClairOptions"):
    clair_jax.clair(PROBLEM.updates, 3, options={"tol": 1e-3})


def test_estimate_rank_honours_the_callers_options(monkeypatch):
  from clair_jax._src import estimator
  seen = []
  original = estimator._robust_split

  def spy(x_n, active, rank, opts):
    seen.append(opts)
    return original(x_n, active, rank, opts)

  monkeypatch.setattr(estimator, "_robust_split", spy)
  # (max_trim_steps is static, so this value traces afresh and the spy sees the options)
  rank = clair_jax.estimate_rank(PROBLEM.updates, options=clair_jax.ClairOptions(max_trim_steps=7))
  assert rank == 3
  assert seen and all(o.max_trim_steps == 7 for o in seen)
