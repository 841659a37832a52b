"""The ``clair-jax`` entry point: version, help with defaults, usage errors, compile cache."""

import pytest

from clair_jax import cli


def test_version_is_printed_without_running_a_command(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f"clair-jax {cli.package_version()}"


def test_subcommand_help_shows_defaults(capsys):
  with pytest.raises(SystemExit):
    cli.main(["demo", "--help"])
  assert "(default: 40)" in capsys.readouterr().out


def test_bad_values_are_usage_errors_not_tracebacks(capsys, monkeypatch):
  monkeypatch.setenv("CLAIR_JAX_CACHE_DIR", "")
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["demo", "--clients", "2", "--rows", "8", "--cols", "4", "--rank", "1"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "clair-jax demo: error:" in err and "K=2" in err
  assert "Traceback" not in err


def test_compilation_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("CLAIR_JAX_CACHE_DIR", str(tmp_path / "c"))
  assert cli.compilation_cache_dir() == str(tmp_path / "c")
  monkeypatch.delenv("CLAIR_JAX_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cli.compilation_cache_dir() == str(tmp_path / "clair_jax" / "jax")
  monkeypatch.setenv("CLAIR_JAX_CACHE_DIR", "")
  assert cli.use_compilation_cache() == ""  # empty: off, and nothing configured
