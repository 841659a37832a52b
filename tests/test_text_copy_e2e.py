"""Tiny end-to-end runs of ``clair-jax text-copy`` (both tasks) into temporary directories.

Also checks the pieces the runs rely on: the checkpoint round trip (the reloaded base
model and adapters reproduce the report's numbers), the joint verdict rule, and that
CLAIR's factored refine through the core, served as LoRA adapters, equals the core's dense
refine of the same updates.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clair_jax
from clair_jax import cli as main_cli
from clair_jax.text_copy import checkpoint as ckpt
from clair_jax.text_copy import data as data_lib
from clair_jax.text_copy import evaluate as eval_lib
from clair_jax.text_copy import experiment
from clair_jax.text_copy import federation as fed_lib
from clair_jax.text_copy import model as model_lib
from clair_jax.text_copy import trainer as trainer_lib
from clair_jax.text_copy import cli as text_copy_cli
from clair_jax.text_copy.cli import BEGIN, END


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("text_copy")
  readme = out / "README.md"
  readme.write_text(f"# title\n\n{BEGIN}\nold numbers\n{END}\n\nafter\n")
  code = main_cli.main(["text-copy", "--preset", "tiny", "--out", str(out), "--seed", "3",
                        "--no-progress", "--readme", str(readme)])
  assert code == 0
  return out, readme


@pytest.fixture(scope="module")
def tiny_skills_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("text_copy_skills")
  code = main_cli.main(["text-copy", "--preset", "tiny", "--task", "skills", "--out", str(out),
                        "--seed", "1", "--no-progress"])
  assert code == 0
  return out


def _check_methods(report):
  assert set(report["methods"]) >= set(eval_lib.METHODS)
  for name, vals in report["methods"].items():
    assert set(vals) >= {"token_acc", "seq_acc", "loss", "token_acc_per_seed"}, name
    assert 0.0 <= vals["token_acc"] <= 1.0 and 0.0 <= vals["seq_acc"] <= vals["token_acc"] + 1e-9
    assert vals["token_acc_per_seed"] == [r["methods"][name]["token_acc"] for r in report["runs"]]
    assert np.isfinite(vals["loss"]) or name == "fedavg"
  assert set(report["paired"]) == set(report["methods"]) - {"clair"}
  refine = report["runs"][0]["refine"]
  assert refine["strength_evaluation_round"] in refine["candidates"]
  assert refine["strength_true_benign"] in refine["candidates"]
  assert set(refine["rank"]) == set(report["runs"][0]["module_scores"]["modules"])


@pytest.mark.slow   # a whole text-copy study run (module fixture)
def test_skills_report_contents(tiny_skills_run):
  report = json.loads((tiny_skills_run / "report.json").read_text())
  assert report["task"] == "skills" and report["config"]["task"]["name"] == "skills"
  _check_methods(report)
  assert sum(total for _, total in report["flag_rates"].values()) == 8
  run = report["runs"][0]
  assert "task `skills`" in text_copy_cli.markdown_table(report)
  assert (tiny_skills_run / "per_client.png").stat().st_size > 1000
  assert run["per_client"]["token_acc"]["local_large_data"][-1] is None  # attackers: none


@pytest.mark.slow   # a whole text-copy study run (module fixture)
def test_report_contents(tiny_run):
  out, _ = tiny_run
  report = json.loads((out / "report.json").read_text())
  _check_methods(report)
  assert set(report["detection"]) >= {"precision", "recall", "f1"}
  assert all(0.0 <= report["detection"][k] <= 1.0 for k in ("precision", "recall", "f1"))
  assert report["config"]["federation"]["num_clients"] == 8
  assert report["timing"]["total_s"] > 0
  run = report["runs"][0]
  modules = run["module_scores"]["modules"]
  assert len(modules) == 7 and len(run["module_scores"]["scores"]) == 7
  # The reported verdict is the joint rule applied to the reported module scores, and the
  # detection metrics are those of that verdict against the ground truth.
  scores = np.array([[np.inf if s is None else s for s in row]
                     for row in run["module_scores"]["scores"]])
  verdict = fed_lib.joint_verdict(scores, np.array(run["module_scores"]["thresholds"]))
  np.testing.assert_array_equal(verdict.contaminated, run["per_client"]["flagged"])
  expected = eval_lib.detection_metrics(verdict.contaminated,
                                        np.array(run["per_client"]["benign"]))
  assert run["detection"] == expected
  # The update attacker (huge random adapters) is flagged.
  kinds = run["per_client"]["kinds"]
  assert run["per_client"]["flagged"][kinds.index("scaled_random")]
  for png in ("accuracy.png", "per_client.png", "detection.png", "scores.png", "curves.png"):
    assert (out / png).stat().st_size > 1000


@pytest.mark.slow   # a whole text-copy study run (module fixture)
def test_readme_table_regenerated(tiny_run):
  out, readme = tiny_run
  text = readme.read_text()
  assert "old numbers" not in text
  assert text.startswith("# title\n") and text.rstrip().endswith("after")
  block = text[text.index(BEGIN):text.index(END)]
  report = json.loads((out / "report.json").read_text())
  assert f"{report['methods']['clair']['token_acc']:.3f}" in block
  assert block.count("\n|") == 2 + len(report["methods"])
  assert "<!-- text-copy-preset: tiny task: copy -->" in block
  assert "| **clair** |" in block and "wins" in block


@pytest.mark.slow   # a whole text-copy study run (module fixture)
def test_checkpoints_reproduce_report(tiny_run):
  """Reloaded base model + adapters give the report's base and local accuracies."""
  out, _ = tiny_run
  report = json.loads((out / "report.json").read_text())
  run = report["runs"][0]
  config = experiment.tiny_config()
  base_pure, meta = ckpt.load_state(str(out / "seed_3" / "base_model.npz"))
  lora_pure, _ = ckpt.load_state(str(out / "seed_3" / "client_adapters.npz"))
  assert meta["seed"] == 3 and meta["model"]["embed_dim"] == config.model.embed_dim
  model = model_lib.Transformer(config.model, rngs=nnx.Rngs(123))
  graphdef, lora0, params = trainer_lib.split_model(model)
  params = ckpt.restore_into(params, base_pure)
  fed = data_lib.make_federation(3, config.task, config.federation)
  test = jnp.asarray(fed.test)
  base = jax.vmap(lambda s: trainer_lib.copy_metrics(graphdef, lora0, params, s))(test)
  np.testing.assert_allclose(base["token_acc"], run["per_client"]["token_acc"]["base"],
                             atol=1e-6)
  benign = fed.benign
  stacked = jax.tree.map(jnp.asarray, lora_pure)
  state = jax.tree.map(lambda x: jnp.zeros((len(benign),) + x.shape, x.dtype), lora0)
  state = ckpt.restore_into(state, stacked)
  local = jax.vmap(lambda lora, s: trainer_lib.copy_metrics(graphdef, lora, params, s))(
      state, test)
  # LoRA path x W + x A B vs merged x (W + A B): equal up to rounding (one token at most).
  one_token = 1.0 / (config.federation.num_test * config.task.seq_len)
  np.testing.assert_allclose(np.asarray(local["token_acc"])[benign],
                             np.asarray(run["per_client"]["token_acc"]["local"])[benign],
                             atol=one_token + 1e-6)
  with pytest.raises(ValueError, match="do not match"):
    ckpt.restore_into(lora0, stacked)


def test_joint_verdict_rule():
  rng = np.random.default_rng(0)
  num_modules, thresholds = 6, np.full(6, 2.0)
  benign = rng.uniform(0.9, 1.5, size=(num_modules, 10))  # s/t in [0.45, 0.75]
  # a mild attacker: over the threshold in no module, but higher in every module
  mild = np.full((num_modules, 1), 1.9)
  loud = np.array([[50.0], [0.5], [40.0], [60.0], [30.0], [45.0]])
  nonfinite = np.array([[np.nan], [1.0], [1.0], [1.0], [1.0], [1.0]])
  scores = np.concatenate([benign, mild, loud, nonfinite], axis=1)
  verdict = fed_lib.joint_verdict(scores, thresholds)
  np.testing.assert_array_equal(verdict.contaminated, [False] * 10 + [True] * 3)
  np.testing.assert_allclose(verdict.joint_scores[10], 0.95)
  assert np.isinf(verdict.joint_scores[12])
  assert verdict.cut < 0.95 and verdict.module_flags.shape == (6, 13)
  assert not verdict.module_flags[:, 10].any()  # no single module flags the mild one
  # a benign-only federation: nobody flagged
  assert not fed_lib.joint_verdict(benign, thresholds).contaminated.any()
  with pytest.raises(ValueError, match="scores"):
    fed_lib.joint_verdict(scores, np.array([1.0, 2.0]))


def _module(num_clients=7, m=12, q=2, n=5, seed=0):
  """Oriented factors of one module: a shared 2-dim column space plus noise; the last client
  sends NaN factors (the ``nan`` attack)."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(m, 2)))[0]
  left = np.einsum("mr,krq->kmq", basis, rng.normal(size=(num_clients, 2, q)))
  left = left + 0.05 * rng.normal(size=left.shape)
  right = rng.normal(size=(num_clients, q, n))
  left[-1] = np.nan
  return jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32)


PATH = ("layers", 0, "attn", "q")
STRENGTHS = ("auto", 0.0, 0.5, 1.0)


@pytest.mark.slow   # the dense core refine compiled beside the factored one
def test_refined_adapters_match_the_core_dense_refine():
  """The factored refine (core ``joint.refine_modules``) as LoRA adapters equals the core's
  dense ``refine_updates`` on ``left_k right_k`` for every finite client, flagged or not; a
  non-finite client gets the consensus."""
  left, right = _module()
  factors = {PATH: (left, right)}
  keep = np.array([True] * 5 + [False] * 2)   # client 5 flagged, client 6 non-finite
  dense = jnp.einsum("kmq,kqn->kmn", left, right)
  for strength in STRENGTHS:
    refinements = fed_lib.refine(factors, keep, 2, strength)
    (a, b), = fed_lib.refined_adapters(refinements, factors, "out").values()
    width = refinements[PATH].shared.shape[-1]
    # side="out": the weight delta is the transposed oriented update, (in, out) = (5, 12).
    assert a.shape == (7, 5, width) and b.shape == (7, width, 12)
    np.testing.assert_allclose(b[0], b[5], atol=1e-6)  # the shared subspace side
    got = np.asarray(jnp.einsum("kir,kro->kio", a, b))
    want = clair_jax.refine_updates(dense, jnp.asarray(keep), strength=strength)
    want_left, want_right = clair_jax.refined_factors(want)
    want = np.asarray(fed_lib.orient(jnp.einsum("kmw,kwn->kmn", want_left, want_right), "out"))
    np.testing.assert_allclose(got[:6], want[:6], atol=2e-4)
    consensus = fed_lib.consensus_adapters(refinements, 7, "out")[PATH]
    np.testing.assert_allclose(got[6], np.asarray(consensus[0][0] @ consensus[1][0]),
                               atol=1e-6)
    assert np.all(np.isfinite(got))


def test_with_strength_equals_a_refit_at_that_strength():
  left, right = _module(seed=1)
  factors = {PATH: (left, right)}
  keep = np.array([True] * 6 + [False])
  once = fed_lib.refine(factors, keep, 2, 1.0)
  for s in STRENGTHS[1:]:
    refit = fed_lib.refine(factors, keep, 2, s)
    got = fed_lib.refined_adapters({PATH: fed_lib.with_strength(once[PATH], s)}, factors, "in")
    want = fed_lib.refined_adapters(refit, factors, "in")
    for x, y in zip(got[PATH], want[PATH]):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_client_noise_is_the_benign_median_of_the_reports():
  """Per-client reported noise enters the core refine as its benign median."""
  left, right = _module(seed=2)
  factors = {PATH: (left, right)}
  keep = np.array([True] * 5 + [False] * 2)
  reports = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.0, 0.0], np.float32)  # median over kept: 0.3
  got = fed_lib.refine(factors, keep, 2, "auto", subspace_noise={PATH: reports})[PATH]
  want = fed_lib.refine(factors, keep, 2, "auto",
                        clair_options={"subspace_noise": 0.3})[PATH]
  np.testing.assert_allclose(got.strength, want.strength, atol=1e-5)
  np.testing.assert_allclose(got.centre, want.centre, atol=1e-5)


def test_detect_leaves_out_non_finite_clients():
  """A client with NaN factors is flagged (joint score +inf) and changes no other score."""
  rng = np.random.default_rng(3)
  factors = {}
  for j in range(2):
    left, right = _module(num_clients=9, seed=10 + j)
    left = left.at[7].set(10.0 * jnp.asarray(rng.normal(size=left.shape[1:]), jnp.float32))
    factors[("layers", 0, "attn", "qk"[j])] = (left, right)
  verdict = fed_lib.detect(factors, 2)
  assert verdict.contaminated[7] and verdict.contaminated[8]
  assert not verdict.contaminated[:7].any()
  assert np.isinf(verdict.joint_scores[8]) and np.isinf(verdict.module_scores[:, 8]).all()
  finite = {p: (left[:8], right[:8]) for p, (left, right) in factors.items()}
  alone = fed_lib.detect(finite, 2)
  np.testing.assert_allclose(verdict.module_scores[:, :8], alone.module_scores, rtol=1e-6)
  np.testing.assert_array_equal(verdict.contaminated[:8], alone.contaminated)


def test_split_half_noise_recovers_the_full_data_noise():
  # Half-data updates carry twice the variance of a full-data one: A, B = D + e, e with
  # std sqrt(2) sigma, so ||U^T (A - B)|| / sqrt(4 r n) estimates sigma.
  rng = np.random.default_rng(0)
  num_clients, m, n, sigma = 40, 16, 6, 0.05
  basis = np.linalg.qr(rng.normal(size=(m, 3)))[0]
  left = np.broadcast_to(basis, (num_clients, m, 3))
  coefficients = rng.normal(size=(num_clients, 3, n))
  full = np.einsum("kmr,krn->kmn", left, coefficients)
  path = ("layers", 0, "mlp", "up")
  factors = {path: (jnp.asarray(left, jnp.float32), jnp.asarray(coefficients, jnp.float32))}
  refinements = fed_lib.refine(factors, np.ones(num_clients, bool), 3, "auto")
  # a dense half-data update D as factors: left = D, right = I
  eye = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (num_clients, n, n))
  halves = [{path: (jnp.asarray(full + np.sqrt(2) * sigma * rng.normal(size=full.shape),
                                jnp.float32), eye)} for _ in range(2)]
  noise = fed_lib.split_half_noise(refinements, *halves)[path]
  assert noise.shape == (num_clients,)
  np.testing.assert_allclose(np.median(np.asarray(noise)), sigma, rtol=0.15)
