"""`clair-jax heterogeneity --quick` end to end: table, report, plot; the refine's acceptance."""

import argparse
import json

import pytest

from clair_jax.studies import heterogeneity_study


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, capsys):
  out = tmp_path / "heterogeneity"
  status = heterogeneity_study.main(["--quick", "--out", str(out), "--no-progress"])
  assert status == 0
  printed = capsys.readouterr().out
  assert printed.startswith("| benign set | shape |") and "Worst cell:" in printed
  report = json.loads((out / "report.json").read_text())
  config = heterogeneity_study.QUICK
  expected = (len(config.benign_sets) * len(config.shapes) * len(config.noises)
              * len(config.fractions) * len(config.heterogeneities))
  assert len(report["cells"]) == expected
  for cell in report["cells"]:
    assert set(cell["errors"]) == set(heterogeneity_study.METHODS)
    assert cell["best_reference"] in heterogeneity_study.REFERENCES
  # With the true benign set the default is within 1.1x of the best reference everywhere.
  true_cells = [c for c in report["cells"] if c["benign_set"] == "true"]
  assert max(c["ratio"] for c in true_cells) <= heterogeneity_study.TARGET_RATIO
  assert (out / "heterogeneity_error.png").stat().st_size > 10_000
  assert (out / "table.md").read_text().startswith("| benign set |")
  # the shared environment (reporting.environment), with the keys this report always had
  assert {"jax", "backend", "python", "cpus", "machine", "device_kind"} <= set(
      report["environment"])


def test_bad_arguments_return_2(tmp_path, capsys):
  parser = argparse.ArgumentParser()
  heterogeneity_study.add_arguments(parser)
  args = parser.parse_args(["--out", str(tmp_path), "--quick", "--benign-sets", "oracle"])
  assert heterogeneity_study.run(args) == 2
  assert "benign sets" in capsys.readouterr().err
