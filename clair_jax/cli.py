"""Command-line entry point: ``clair-jax {demo,aggregate,synthetic,text-copy,heterogeneity}``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``clair-jax --help`` stays fast and
the experiment code is loaded only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys

# name -> (module, one-line help)
_SUBCOMMANDS = {
    "demo": ("clair_jax.demo", "CPU demo: CLAIR on generated data, prints what it found"),
    "synthetic": ("clair_jax.studies.synthetic_study", "synthetic study vs robust baselines"),
    "text-copy": ("clair_jax.text_copy.cli", "federated LoRA text-copy experiment"),
    "heterogeneity": ("clair_jax.studies.heterogeneity_study",
                      "refine vs projection, pooled mean and global rules across heterogeneity"),
    "aggregate": ("clair_jax.aggregate_cli", "CLAIR over K clients' PEFT adapter directories"),
}


def package_version() -> str:
  """The installed version (from the package metadata: no JAX import, so it is instant)."""
  try:
    return importlib.metadata.version("clair_jax")
  except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    return "unknown"


def compilation_cache_dir() -> str:
  """Where CLI runs keep JAX's persistent compilation cache.

  ``$CLAIR_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/clair_jax/jax`` (default
  ``~/.cache/clair_jax/jax``); an empty ``CLAIR_JAX_CACHE_DIR`` turns the cache off.
  """
  explicit = os.environ.get("CLAIR_JAX_CACHE_DIR")
  if explicit is not None:
    return explicit
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "clair_jax", "jax")


def use_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache for this process (see
  :func:`compilation_cache_dir`): a second run of the same command loads its compiled
  programs instead of compiling them again (compilation dominates short runs on CPU)."""
  path = compilation_cache_dir()
  if path:
    import jax  # pylint: disable=import-outside-toplevel  (keeps --help / --version fast)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="clair-jax", description="CLAIR: robust federated low-rank update aggregation."
  )
  parser.add_argument("--version", action="version",
                      version=f"%(prog)s {package_version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module_name, help_text) in _SUBCOMMANDS.items():
    sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub_parser.set_defaults(_module=module_name, _parser=sub_parser)
    if argv and argv[0] == name:  # import only the module whose options are needed
      importlib.import_module(module_name).add_arguments(sub_parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser(argv)
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  use_compilation_cache()
  try:
    return int(importlib.import_module(args._module).run(args) or 0)
  except ValueError as error:
    # Bad values (a shape the method cannot take, an out-of-range option) are the
    # caller's to fix: report them as usage errors (exit status 2), not as tracebacks.
    args._parser.error(str(error))
    raise  # unreachable: ArgumentParser.error exits


if __name__ == "__main__":
  raise SystemExit(main())
