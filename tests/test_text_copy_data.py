"""Text-copy data and reporting pieces that need no model: the skills task, the validation
split, the lying clients of the evaluation round, paired differences, README sections."""

import numpy as np
import pytest

from clair_jax.text_copy import cli as text_copy_cli
from clair_jax.text_copy import data as data_lib
from clair_jax.text_copy import evaluate as eval_lib
from clair_jax.text_copy.cli import BEGIN, END

TASK = data_lib.TaskConfig(num_base=6, num_new=8, seq_len=5, name="skills", num_skills=3)
FED = data_lib.FederationConfig(
    num_clients=10, num_train=4, num_test=6, num_val=3, contamination=0.4,
    attacks=("random_targets", "permutation", "reversed", "scaled_random"))


def test_skills_maps_are_built_from_shared_skills():
  fed = data_lib.make_federation(2, TASK, FED)
  first = 1 + TASK.num_base
  maps = fed.token_maps
  assert maps.shape == (FED.num_clients, TASK.vocab_size)
  # SEP and base tokens are copied; new tokens go to new tokens.
  np.testing.assert_array_equal(maps[:, :first], np.tile(np.arange(first), (10, 1)))
  assert np.all((maps[:, first:] >= first) & (maps[:, first:] < TASK.vocab_size))
  # Every client's image of a new token is one of the skills' images of that token.
  skills = data_lib.make_skills(np.random.default_rng([2, 1]), TASK)
  images = first + skills  # (S, num_new)
  for k in range(FED.num_clients):
    assert all(maps[k, first + t] in images[:, t] for t in range(TASK.num_new))
  # Clients differ (heterogeneous task), mixtures are distributions.
  assert len({tuple(m) for m in maps}) > 1
  np.testing.assert_allclose(fed.skill_mix.sum(axis=1), 1.0, rtol=1e-6)


def test_skills_targets_validation_split_and_shared_inputs():
  fed = data_lib.make_federation(4, TASK, FED)
  t = TASK.seq_len
  assert fed.val.shape == (FED.num_clients, FED.num_val, TASK.total_len)
  kinds = np.array(fed.kinds)
  for k in np.flatnonzero(kinds == "benign"):
    for split in (fed.train, fed.val, fed.test):
      np.testing.assert_array_equal(split[k, :, t + 1:], fed.token_maps[k][split[k, :, :t]])
  # Held-out data are clean for everybody; the data attackers' validation split is corrupted
  # like their training data.
  for k in range(FED.num_clients):
    np.testing.assert_array_equal(fed.test[k, :, t + 1:], fed.token_maps[k][fed.test[k, :, :t]])
  rev = fed.kinds.index("reversed")
  np.testing.assert_array_equal(fed.val[rev, :, t + 1:], fed.val[rev, :, :t][:, ::-1])
  # copy and skills share the inputs (same seed), and copy's targets are the inputs.
  copy = data_lib.make_federation(4, TASK._replace(name="copy"), FED)
  np.testing.assert_array_equal(copy.train[:, :, :t], fed.train[:, :, :t])
  np.testing.assert_array_equal(copy.test[:, :, t + 1:], copy.test[:, :, :t])
  with pytest.raises(ValueError, match="unknown task"):
    data_lib.make_federation(0, TASK._replace(name="sort"), FED)


def test_client_sequences_follow_the_client_task():
  fed = data_lib.make_federation(0, TASK, FED)
  seqs = data_lib.client_sequences(np.random.default_rng(0), TASK, fed, 1, 0.1, 7)
  t = TASK.seq_len
  assert seqs.shape == (7, TASK.total_len)
  np.testing.assert_array_equal(seqs[:, t + 1:], fed.token_maps[1][seqs[:, :t]])


def test_contaminated_clients_lie_in_the_evaluation_round():
  candidates = np.array([0.0, 0.5, 1.0])
  honest = np.array([[0.3, 0.2, 0.4], [0.5, 0.1, 0.2], [0.3, 0.3, 0.3]])
  reported = eval_lib.lie(honest, candidates, np.array([False, False, True]))
  np.testing.assert_array_equal(reported[:2], honest[:2])
  np.testing.assert_array_equal(reported[2], [eval_lib.LIE_LOSS, eval_lib.LIE_LOSS, 0.0])


def test_flag_rates_and_paired_differences():
  rates = eval_lib.flag_rates(np.array([True, False, True, True]),
                              ("benign", "benign", "permutation", "nan"))
  assert rates == {"benign": [1, 2], "permutation": [1, 1], "nan": [1, 1]}
  runs = [{"methods": {"clair": {"token_acc": a}, "local": {"token_acc": b}}}
          for a, b in ((0.9, 0.8), (0.7, 0.75), (0.95, 0.9))]
  paired = text_copy_cli.paired_differences(runs)
  assert set(paired) == {"local"}
  np.testing.assert_allclose(paired["local"]["diff_per_seed"], [0.1, -0.05, 0.05])
  assert paired["local"]["wins"] == 2 and paired["local"]["n"] == 3
  np.testing.assert_allclose(paired["local"]["mean_diff"], 0.1 / 3)


def test_replace_table_keeps_other_presets_and_tasks(tmp_path):
  readme = tmp_path / "README.md"
  old = "<!-- text-copy-preset: smoke -->"  # a section written before tasks existed
  readme.write_text(f"intro\n{BEGIN}\n{old}\nold smoke copy\n{END}\nend\n")
  text_copy_cli.replace_table(str(readme), "cpu skills", "cpu", "skills")
  text = readme.read_text()
  assert "old smoke copy" in text  # the old marker reads as (smoke, copy) and is kept
  text_copy_cli.replace_table(str(readme), "smoke skills", "smoke", "skills")
  text_copy_cli.replace_table(str(readme), "smoke copy v2", "smoke", "copy")
  text_copy_cli.replace_table(str(readme), "cpu copy", "cpu")
  text = readme.read_text()
  assert "old smoke copy" not in text and old not in text
  order = ["smoke copy v2", "smoke skills", "cpu copy", "cpu skills"]
  positions = [text.index(x) for x in order]
  assert positions == sorted(positions) and positions[-1] < text.index(END)
  assert "<!-- text-copy-preset: cpu task: skills -->" in text
  assert text.startswith("intro\n") and text.endswith("end\n")
  with pytest.raises(ValueError, match="markers"):
    (tmp_path / "other.md").write_text("no markers\n")
    text_copy_cli.replace_table(str(tmp_path / "other.md"), "t", "cpu")
