"""`clair-jax synthetic --quick` end to end: report keys, plots, README regeneration."""

import argparse
import json
import os

import pytest

from clair_jax import baselines
from clair_jax import cli
from clair_jax import synthetic
from clair_jax.studies import synthetic_study

EXPECTED_METHODS = {
    "local", "fedavg", "median", "trimmed_mean", "krum", "geometric_median", "oracle", "clair"
}
PLOTS = ("benign_error_vs_contamination.png", "detection_phase_diagram.png", "client_scores.png")


@pytest.mark.slow
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
  # the oracle is handed the benign set: no detection figures (they would be perfect by
  # construction), only its error, a reference that must stay below local's
  oracle = report["methods"]["oracle"]
  assert not {"precision", "recall", "f1", "exact"} & set(oracle)
  assert oracle["benign_error_geomean"] < report["methods"]["local"]["benign_error_geomean"]
  env = report["environment"]
  assert {"jax", "jaxlib", "numpy", "backend", "device_kind", "python", "machine",
          "cpus", "clair_jax"} <= set(env)
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
    synthetic_study.update_readme(str(path), "table")
  assert path.read_text() == "no markers\n"


def test_bad_grid_option_is_rejected(tmp_path, capsys):
  with pytest.raises(SystemExit):
    cli.main(["synthetic", "--out", str(tmp_path), "--attacks", "random,nope"])
  assert "unknown attack" in capsys.readouterr().err
  assert not os.listdir(tmp_path)


@pytest.mark.slow   # a grid cell end to end (CLAIR compiled at the regression shape); the
# regression problems themselves are tested fast in test_synthetic.py
def test_regression_setting_runs_through_the_grid():
  config = synthetic_study.QUICK._replace(
      attacks=("coherent",), noises=(1.0,), setting="regression", num_samples=40
  )
  (cell,) = synthetic_study.run_grid(config)
  assert set(cell["methods"]) == EXPECTED_METHODS
  errors = {k: v["benign_error"] for k, v in cell["methods"].items()}
  # OLS noise is removed off the subspace: the oracle beats every client's own estimate
  assert errors["oracle"] < errors["local"]
  assert "exact" not in cell["methods"]["oracle"] and "exact" in cell["methods"]["clair"]


@pytest.mark.slow
def test_attacks_grid_end_to_end(tmp_path, capsys):
  """A tiny `--grid attacks` run: report, table, plot and the README block (< 30 s).

  At the quick synthetic grid's 12 x 16 x 4, rank 2 (``--shapes``): CLAIR's program is
  the one the quick run above compiles.
  """
  from clair_jax.studies import attacks_study

  out = tmp_path / "attacks"
  readme = tmp_path / "README.md"
  readme.write_text(
      f"top\n{attacks_study.TABLE_BEGIN}\nstale numbers\n{attacks_study.TABLE_END}\nbottom\n"
      f"{synthetic_study.TABLE_BEGIN}\nother table\n{synthetic_study.TABLE_END}\n"
  )
  status = cli.main([
      "synthetic", "--grid", "attacks", "--quick", "--attacks", "alie", "adaptive_tilt",
      "--shapes", "12x16x4x2", "--out", str(out), "--readme", str(readme), "--no-progress",
  ])
  assert status == 0
  report = json.loads((out / "report.json").read_text())
  assert set(report["attacks"]) == {"alie", "adaptive_tilt", "all"}
  assert len(report["trials"]) == 2 and len(report["cells"]) == 2
  assert all(t["shape"] == [12, 16, 4, 2] for t in report["trials"])
  trial = report["trials"][0]
  peers = attacks_study.available_peers()
  references = {"oracle"} | ({"clair_given_benign"}
                             if hasattr(baselines, "clair_given_benign") else set())
  assert set(trial["errors"]) == set(peers) | {"clair"} | references
  assert {"precision", "recall", "noise_ratio"} <= set(trial["clair"])
  adaptive = [t for t in report["trials"] if t["attack"] == "adaptive_tilt"][0]
  assert adaptive["strength"] in synthetic.ADAPTIVE_SPECS["adaptive_tilt"][1]
  for cell in report["cells"]:
    assert cell["passed"] == (cell["within_oracle"] and cell["at_most_best_peer"])
    assert cell["errors"]["oracle"] < cell["errors"]["local"]
  check = report["checks"]["clair_within_oracle_and_best_peer"]
  assert check["cells"] == 2 and check["passed"] == (not check["failures"])
  data = (out / "attacks_vs_contamination.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  table = (out / "table.md").read_text()
  assert table.startswith("| attack | CLAIR/oracle | worst |")
  assert "| precision | recall | local |" in table.splitlines()[0]
  assert "| alie |" in table and "| adaptive_tilt |" in table
  text = readme.read_text()
  assert "stale numbers" not in text and "other table" in text and text.startswith("top\n")
  inside = text.split(attacks_study.TABLE_BEGIN)[1].split(attacks_study.TABLE_END)[0]
  assert "| alie |" in inside
  assert "updated the attacks table" in capsys.readouterr().out


def test_attacks_grid_options():
  from clair_jax.studies import attacks_study

  parser = argparse.ArgumentParser()
  synthetic_study.add_arguments(parser)
  args = parser.parse_args(["--out", "x", "--attacks", "alie,tilt", "mimic", "--shapes",
                            "20x32x8x2,10x16x4x2", "--seeds", "3,4"])
  assert synthetic_study.uses_attacks_grid(args)
  config = attacks_study.config_from_args(args)
  assert config.attacks == ("alie", "tilt", "mimic")
  assert config.shapes == ((20, 32, 8, 2), (10, 16, 4, 2)) and config.seeds == (3, 4)
  assert config.fractions == attacks_study.AttacksConfig().fractions
  default = parser.parse_args(["--out", "x"])
  assert not synthetic_study.uses_attacks_grid(default)
  assert synthetic_study.config_from_args(default).attacks == synthetic.MODEL_ATTACKS
  with pytest.raises(ValueError, match="KxMxNxR"):
    attacks_study.config_from_args(parser.parse_args(["--out", "x", "--grid", "attacks",
                                                      "--shapes", "20x32x8"]))
  with pytest.raises(ValueError, match="fractions"):
    attacks_study.config_from_args(parser.parse_args(["--out", "x", "--grid", "attacks",
                                                      "--fractions", "0.6"]))
