"""`benchmarks/run_all.py --quick` end to end: the NumPy port agrees with clair_jax, and
the report renders every table (a smoke run; the sizes are not the targets)."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_quick_benchmark_run(tmp_path, capsys):
  sys.path.insert(0, str(BENCHMARKS))
  import run_all  # pylint: disable=import-outside-toplevel
  out = tmp_path / "RESULTS.md"
  run_all.main(["--quick", "--out", str(out)])
  capsys.readouterr()
  report = json.loads(out.with_suffix(".json").read_text())
  # The port runs the same algorithm: same verdicts and subspace at every size.
  rows = report["jax_vs_numpy_sizes"]
  assert [row["m"] for row in rows] == sorted(row["m"] for row in rows) and len(rows) == 2
  assert report["target"] in rows
  for row in rows:
    assert row["same_detection"] and row["exact_detection"], row
    assert row["subspace_sin_theta_jax_vs_numpy"] < 1e-4, row
    assert row["solver_steps_jax"] == row["solver_steps_numpy"], row
    assert row["jax_steady_s"] > 0 and row["numpy_s"] > 0
  text = out.read_text()
  for heading in ("## Target", "## Dense per-iteration time", "## Dense vs Gram vs factored",
                  "## Robust baselines", "## Scaling"):
    assert heading in text
  assert (tmp_path / "scaling_quick.png").stat().st_size > 0
