"""Command-line entry point: ``clair-jax {demo,synthetic,text-copy,heterogeneity}``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``clair-jax --help`` stays fast and
the experiment code is loaded only when asked for.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
_SUBCOMMANDS = {
    "demo": ("clair_jax.demo", "CPU demo: CLAIR on generated data, prints what it found"),
    "synthetic": ("clair_jax.studies.synthetic_study", "synthetic study vs robust baselines"),
    "text-copy": ("clair_jax.text_copy.cli", "federated LoRA text-copy experiment"),
    "heterogeneity": ("clair_jax.studies.heterogeneity_study",
                      "refine vs projection, pooled mean and global rules across heterogeneity"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="clair-jax", description="CLAIR: robust federated low-rank update aggregation."
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module_name, help_text) in _SUBCOMMANDS.items():
    sub_parser = sub.add_parser(name, help=help_text, description=help_text)
    sub_parser.set_defaults(_module=module_name)
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
  return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
  raise SystemExit(main())
