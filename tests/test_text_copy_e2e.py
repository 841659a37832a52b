"""Tiny end-to-end run of ``clair-jax text-copy`` into a temporary directory.

Also checks the pieces the run relies on: the checkpoint round trip (the reloaded base
model and adapters reproduce the report's numbers), the joint verdict rule, and that
CLAIR's refined LoRA adapters equal the dense refined update.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_report_contents(tiny_run):
  out, _ = tiny_run
  report = json.loads((out / "report.json").read_text())
  assert set(report["methods"]) == set(eval_lib.METHODS)
  for name, vals in report["methods"].items():
    assert set(vals) >= {"token_acc", "seq_acc", "loss"}, name
    assert 0.0 <= vals["token_acc"] <= 1.0 and 0.0 <= vals["seq_acc"] <= vals["token_acc"] + 1e-9
    assert np.isfinite(vals["loss"]) or name == "fedavg"
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
  for png in ("accuracy.png", "scores.png", "curves.png"):
    assert (out / png).stat().st_size > 1000


def test_readme_table_regenerated(tiny_run):
  out, readme = tiny_run
  text = readme.read_text()
  assert "old numbers" not in text
  assert text.startswith("# title\n") and text.rstrip().endswith("after")
  block = text[text.index(BEGIN):text.index(END)]
  report = json.loads((out / "report.json").read_text())
  assert f"{report['methods']['clair']['token_acc']:.3f}" in block
  assert block.count("\n|") == 2 + len(eval_lib.METHODS)
  assert "<!-- text-copy-preset: tiny -->" in block


def test_replace_table_keeps_other_presets(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{BEGIN}\nplaceholder\n{END}\nend\n")
  text_copy_cli.replace_table(str(readme), "cpu table v1", "cpu")
  text_copy_cli.replace_table(str(readme), "smoke table", "smoke")
  text_copy_cli.replace_table(str(readme), "cpu table v2", "cpu")
  text = readme.read_text()
  assert "placeholder" not in text and "v1" not in text
  assert text.index("smoke table") < text.index("cpu table v2") < text.index(END)
  assert text.startswith("intro\n") and text.endswith("end\n")
  with pytest.raises(ValueError, match="markers"):
    (tmp_path / "other.md").write_text("no markers\n")
    text_copy_cli.replace_table(str(tmp_path / "other.md"), "t", "cpu")


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
  local = jax.vmap(lambda l, s: trainer_lib.copy_metrics(graphdef, l, params, s))(state, test)
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


def test_refined_adapters_are_low_rank_and_match_dense():
  key = jax.random.key(0)
  basis = jnp.linalg.qr(jax.random.normal(key, (12, 2)))[0]
  updates = jnp.einsum("ir,kro->kio", basis, jax.random.normal(jax.random.key(1), (6, 2, 5)))
  updates = updates + 0.01 * jax.random.normal(jax.random.key(2), updates.shape)
  mask = jnp.array([True] * 5 + [False])
  (a, b), dense = fed_lib.refine_to_adapters(updates, mask, 2)
  assert a.shape == (6, 12, 2) and b.shape == (6, 2, 5)
  np.testing.assert_allclose(jnp.einsum("kir,kro->kio", a, b)[:5], dense[:5], atol=1e-5)
  np.testing.assert_array_equal(dense[5], updates[5])
  assert float(jnp.abs(dense[:5] - updates[:5]).max()) < 0.05
  np.testing.assert_allclose(a[0], a[3])  # the A side is the shared subspace
