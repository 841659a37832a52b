"""`clair-jax synthetic --quick` end to end: report keys, plots, README regeneration."""

import json
import os

import pytest

from clair_jax import cli
from clair_jax.studies import synthetic_study

EXPECTED_METHODS = {
    "local", "fedavg", "median", "trimmed_mean", "krum", "geometric_median", "oracle", "clair"
}
PLOTS = ("benign_error_vs_contamination.png", "detection_phase_diagram.png", "client_scores.png")


def test_quick_run_end_to_end(tmp_path, capsys):
  """One CLI run (the expensive part) checked three ways; one test so xdist runs it once."""
  status, out, readme = _quick_run(tmp_path)
  assert status == 0
  _check_report(out)
  _check_plots_and_table(out)
  _check_readme(out, readme)
  printed = capsys.readouterr().out
  assert printed.startswith("| attack |") and "updated the table in" in printed


def _quick_run(tmp_path):
  out = tmp_path / "synthetic"
  readme = tmp_path / "README.md"
  readme.write_text(
      "# Title\nbefore\n"
      f"{synthetic_study.TABLE_BEGIN}\nold numbers typed by hand\n{synthetic_study.TABLE_END}\n"
      "after\n"
  )
  status = cli.main(
      ["synthetic", "--quick", "--out", str(out), "--readme", str(readme), "--no-progress"]
  )
  return status, out, readme


def _check_report(out):
  report = json.loads((out / "report.json").read_text())
  assert set(report["methods"]) == EXPECTED_METHODS
  for name, entry in report["methods"].items():
    assert "benign_error_geomean" in entry, name
  assert {"precision", "recall", "f1", "exact", "subspace_error_mean"} <= set(
      report["methods"]["clair"]
  )
  grid = report["grid"]
  config = synthetic_study.QUICK
  assert len(grid) == len(config.attacks) * len(config.fractions) * len(config.noises)
  for cell in grid:
    assert set(cell["methods"]) == EXPECTED_METHODS
    assert {"attack", "fraction", "noise"} <= set(cell)
  phase = report["phase_diagram"]
  assert len(phase["clair_exact"]) == len(config.fractions)
  assert len(phase["clair_exact"][0]) == len(config.separations)
  assert set(report["checks"]) == {
      "clair_within_oracle_factor_when_exact", "clair_below_baselines_under_coherent_attacks"
  }
  # the oracle knows the benign set: perfect detection, never worse than local on benign
  oracle = report["methods"]["oracle"]
  assert oracle["exact"] == 1.0
  assert oracle["benign_error_geomean"] < report["methods"]["local"]["benign_error_geomean"]
  # FedAvg propagates the NaN attack: its error there is non-finite (null in strict JSON)
  nonfinite = [c for c in grid if c["attack"] == "nonfinite"]
  assert nonfinite and all(c["methods"]["fedavg"]["benign_error"] is None for c in nonfinite)


def _check_plots_and_table(out):
  for name in PLOTS:
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
  table = (out / "table.md").read_text()
  assert table.startswith("| attack | local | fedavg |")
  for attack in synthetic_study.QUICK.attacks:
    assert f"| {attack} |" in table


def _check_readme(out, readme):
  text = readme.read_text()
  assert "old numbers typed by hand" not in text
  assert text.startswith("# Title\nbefore\n")
  assert text.endswith(f"{synthetic_study.TABLE_END}\nafter\n")
  inside = text.split(synthetic_study.TABLE_BEGIN)[1].split(synthetic_study.TABLE_END)[0]
  assert inside.strip() == (out / "table.md").read_text().strip()


def test_readme_without_markers_is_an_error(tmp_path):
  path = tmp_path / "README.md"
  path.write_text("no markers\n")
  with pytest.raises(ValueError, match="synthetic-table:begin"):
    synthetic_study.replace_between_markers(str(path), "table")
  assert path.read_text() == "no markers\n"


def test_bad_grid_option_is_rejected(tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main(["synthetic", "--out", str(tmp_path), "--attacks", "random,nope"])
  assert "unknown attack" in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_regression_setting_runs_through_the_grid():
  config = synthetic_study.QUICK._replace(
      attacks=("coherent",), noises=(1.0,), setting="regression", num_samples=40
  )
  (cell,) = synthetic_study.run_grid(config)
  assert set(cell["methods"]) == EXPECTED_METHODS
  errors = {k: v["benign_error"] for k, v in cell["methods"].items()}
  # OLS noise is removed off the subspace: the oracle beats every client's own estimate
  assert errors["oracle"] < errors["local"]
  assert cell["methods"]["oracle"]["exact"] == 1.0
