"""Grouped options (detection, weights, solver, refine) beside the flat ClairOptions."""

import numpy as np
import pytest

import clair_jax
from clair_jax._src import estimator
from problems import make_problem

# The shape and rank of tests/test_range.py: the compiled program is shared with it.
PROBLEM = make_problem(num_clients=20, m=48, n=12, rank=3, fraction=0.25, noise=0.05, seed=3)
GROUP_TYPES = {"detection": clair_jax.DetectionOptions, "weights": clair_jax.WeightOptions,
               "solver": clair_jax.SolverOptions, "refine": clair_jax.RefineOptions}
# A value away from each field's default (fields keep their flat names here).
NON_DEFAULT = dict(
    threshold_ratio=2.0, mad_multiplier=2.5, scale_floor=1e-3, consensus=False,
    num_candidates=8, max_trim_steps=12, noise_level=0.1, lam_low_rank=0.5, lam_sparse=0.6,
    convex_floor=0.02, tol=1e-5, max_steps=77, continuation_factor=0.5, svt_method="svd",
    svt_width=16, refine="projection", refine_strength=0.4, refine_rank=2, refine_max_rank=9,
    subspace_noise=0.03, contaminated_output="project", side="right")


def test_groups_partition_the_fields():
  """Each flat field shows in exactly one group read back (or is ``side``), and the groups
  hold no other field."""
  assert set(NON_DEFAULT) == set(clair_jax.ClairOptions._fields)
  defaults = clair_jax.ClairOptions()
  places = ("detection", "weights", "solver", "refinement", "side")
  for field, value in NON_DEFAULT.items():
    changed = clair_jax.ClairOptions(**{field: value})
    moved = [place for place in places if getattr(changed, place) != getattr(defaults, place)]
    assert len(moved) == 1, f"{field} shows in {moved}"
  group_sizes = [len(getattr(defaults, place)._fields) for place in places[:-1]]
  assert sum(group_sizes) + 1 == len(clair_jax.ClairOptions._fields)
  for key, (group_type, fields) in estimator.OPTION_GROUPS.items():
    assert GROUP_TYPES[key] is group_type and set(fields) == set(group_type._fields)
    assert not isinstance(group_type(), clair_jax.ClairOptions)


def test_group_defaults_are_the_flat_defaults():
  defaults = clair_jax.ClairOptions()
  for key, group in defaults.as_groups().items():
    if key != "side":
      assert group == GROUP_TYPES[key](), key


@pytest.mark.parametrize("opts", [clair_jax.ClairOptions(), clair_jax.ClairOptions(**NON_DEFAULT)])
def test_round_trip_through_the_groups(opts):
  groups = {"detection": opts.detection, "weights": opts.weights, "solver": opts.solver,
            "refine": opts.refinement, "side": opts.side}
  assert groups == opts.as_groups()
  rebuilt = clair_jax.ClairOptions.grouped(**groups)
  assert rebuilt == opts and type(rebuilt) is clair_jax.ClairOptions
  assert clair_jax.ClairOptions.grouped() == clair_jax.ClairOptions()
  # The flat API is unchanged.
  assert opts._replace(tol=3e-3).solver.tol == 3e-3
  assert opts.refinement.method == opts.refine


def test_group_objects_and_options_are_hashable():
  opts = clair_jax.ClairOptions(**NON_DEFAULT)
  groups = (opts.detection, opts.weights, opts.solver, opts.refinement)
  for group in (*groups, opts):
    assert hash(group) == hash(type(group)(*group))
  assert len({clair_jax.SolverOptions(tol=1e-5), clair_jax.SolverOptions(tol=1e-5)}) == 1


def test_resolving_every_route_gives_the_same_flat_options():
  flat = clair_jax.ClairOptions(tol=1e-6, threshold_ratio=2.0, refine="projection")
  solver = clair_jax.SolverOptions(tol=1e-6)
  detection = clair_jax.DetectionOptions(threshold_ratio=2.0)
  refine = clair_jax.RefineOptions(method="projection")
  resolve = estimator.resolve_options
  assert resolve(None, tol=1e-6, threshold_ratio=2.0, refine="projection") == flat
  assert resolve([solver, detection, refine]) == flat
  assert resolve((solver, detection), refine="projection") == flat
  assert resolve(solver, detection=detection, refine=refine) == flat
  assert resolve(None, solver=solver, threshold_ratio=2.0, refine=refine) == flat
  # The same value twice is not a conflict; a ClairOptions is a base keywords update.
  assert resolve([solver, solver], solver=solver, detection=detection, refine=refine) == flat
  assert resolve(clair_jax.ClairOptions(tol=1.0), solver=solver, detection=detection,
                 refine=refine) == flat


def test_options_as_a_group_matches_the_flat_keyword():
  """`options=SolverOptions(...)`, `solver=` and the flat keyword run the same program on
  the same options (the static options are equal, so it is one compile)."""
  flat = clair_jax.clair(PROBLEM.updates, 3, tol=1e-5, threshold_ratio=1.5)
  compiled = estimator._clair_compiled._cache_size()
  by_group = clair_jax.clair(PROBLEM.updates, 3, options=clair_jax.SolverOptions(tol=1e-5),
                             detection=clair_jax.DetectionOptions(threshold_ratio=1.5))
  by_keyword = clair_jax.clair(PROBLEM.updates, 3, solver=clair_jax.SolverOptions(tol=1e-5),
                               threshold_ratio=1.5)
  assert estimator._clair_compiled._cache_size() == compiled
  for result in (by_group, by_keyword):
    np.testing.assert_array_equal(result.contaminated, flat.contaminated)
    np.testing.assert_array_equal(result.refined, flat.refined)
    np.testing.assert_array_equal(result.solver_steps, flat.solver_steps)


def test_a_new_float_value_through_a_group_does_not_recompile():
  first = clair_jax.clair(PROBLEM.updates, 3,
                          options=[clair_jax.DetectionOptions(threshold_ratio=1.7),
                                   clair_jax.SolverOptions(tol=3e-4)])
  compiled = estimator._clair_compiled._cache_size()
  second = clair_jax.clair(PROBLEM.updates, 3,
                           options=[clair_jax.DetectionOptions(threshold_ratio=50.0),
                                    clair_jax.SolverOptions(tol=2e-4)])
  assert estimator._clair_compiled._cache_size() == compiled
  assert float(np.asarray(second.thresholds)[0]) >= 50.0 - 1e-3  # the value took effect
  assert float(np.asarray(first.thresholds)[0]) < 50.0


@pytest.mark.parametrize("routes", [
    dict(options=clair_jax.SolverOptions(tol=1e-6), solver=clair_jax.SolverOptions(tol=1e-5)),
    dict(options=[clair_jax.SolverOptions(tol=1e-6), clair_jax.SolverOptions(tol=1e-5)]),
    # A group states its defaults too: tol=1e-4 here against the other group's 1e-5.
    dict(options=clair_jax.SolverOptions(max_steps=50), solver=clair_jax.SolverOptions(tol=1e-5)),
])
def test_conflicting_groups_raise_naming_the_field(routes):
  with pytest.raises(ValueError, match="conflicting values for option tol"):
    clair_jax.clair(PROBLEM.updates, 3, **routes)


@pytest.mark.parametrize("routes", [
    dict(options=clair_jax.SolverOptions(tol=1e-6), tol=1e-5),
    dict(solver=clair_jax.SolverOptions(tol=1e-6), tol=1e-5),
    dict(solver=clair_jax.SolverOptions(max_steps=50), tol=1e-5),
])
def test_flat_keywords_override_groups(routes):
  resolved = estimator.resolve_options(**routes)
  assert resolved.tol == 1e-5
  expected_steps = 50 if routes.get("solver") == clair_jax.SolverOptions(max_steps=50) else 500
  assert resolved.max_steps == expected_steps


def test_conflict_names_the_renamed_refine_field():
  with pytest.raises(ValueError, match=r"refine_strength: refine\.strength=0\.5"):
    clair_jax.clair(PROBLEM.updates, 3, options=clair_jax.RefineOptions(strength=0.5),
                    refine=clair_jax.RefineOptions(strength=0.2))


@pytest.mark.parametrize("group, path", [
    (clair_jax.SolverOptions(tol=-1.0), r"solver\.tol must be"),
    (clair_jax.SolverOptions(max_steps=0), r"solver\.max_steps must be"),
    (clair_jax.SolverOptions(svt_method="qr"), r"solver\.svt_method must be"),
    (clair_jax.DetectionOptions(threshold_ratio=0.5), r"detection\.threshold_ratio must be"),
    (clair_jax.WeightOptions(lam_sparse=-1.0), r"weights\.lam_sparse must be"),
    (clair_jax.RefineOptions(strength=2.0), r"refine\.strength must be"),
    (clair_jax.RefineOptions(method="mean"), r"refine\.method must be"),
    (clair_jax.RefineOptions(max_rank=-1), r"refine\.max_rank must be"),
])
def test_bad_group_values_are_named_by_their_path(group, path):
  key = {clair_jax.SolverOptions: "solver", clair_jax.DetectionOptions: "detection",
         clair_jax.WeightOptions: "weights", clair_jax.RefineOptions: "refine"}[type(group)]
  with pytest.raises(ValueError, match=path):
    clair_jax.clair(PROBLEM.updates, 3, options=group)
  with pytest.raises(ValueError, match=path):
    clair_jax.clair(PROBLEM.updates, 3, **{key: group})
  with pytest.raises(ValueError, match=path):
    clair_jax.ClairOptions.grouped(**{key: group})


def test_flat_keywords_keep_their_flat_names():
  with pytest.raises(ValueError, match=r"^tol must be"):
    clair_jax.clair(PROBLEM.updates, 3, tol=-1.0)
  with pytest.raises(ValueError, match=r"^refine_strength must be"):
    clair_jax.clair(PROBLEM.updates, 3, refine_strength=2.0)


@pytest.mark.parametrize("call, given", [
    (dict(options={"tol": 1e-3}), "dict"),
    (dict(options=[clair_jax.SolverOptions(), {"tol": 1e-3}]), r"options\[1\].*dict"),
    (dict(options=[clair_jax.ClairOptions()]), "ClairOptions"),
    (dict(options=clair_jax.ClairResult(*[None] * len(clair_jax.ClairResult._fields))), "ClairResult"),
    (dict(solver=clair_jax.WeightOptions()), "solver must be a clair_jax.SolverOptions.*"
                                             "WeightOptions"),
    (dict(refine=clair_jax.SolverOptions()), "refine must be a clair_jax.RefineOptions"),
    (dict(detection={"threshold_ratio": 2.0}), "dict"),
])
def test_wrong_types_raise_naming_what_was_given(call, given):
  with pytest.raises(TypeError, match=given):
    clair_jax.clair(PROBLEM.updates, 3, **call)
  if "options" not in call:
    with pytest.raises(TypeError, match=given):
      clair_jax.ClairOptions.grouped(**call)


def test_grouped_takes_groups_only():
  """``clair(refine="projection")`` is the flat method name; ``grouped`` takes groups."""
  with pytest.raises(TypeError, match="refine must be a clair_jax.RefineOptions.*str"):
    clair_jax.ClairOptions.grouped(refine="projection")
