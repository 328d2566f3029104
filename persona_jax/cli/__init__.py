"""The `persona-jax` console script: one small module per subcommand over library functions.

Each command module has NAME, HELP, `add_arguments(parser)` and `run(args) -> exit code`
(`train` parses its own absl/ml_collections flags: `train.main(argv)`); methods add their own
subcommands through the registry (`registry.commands()`, e.g. importing an official release). A
`PersonaError` (bad input) is printed as one line without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from persona_jax.cli.parsers import DefaultsHelpFormatter, OneLineErrorParser
from persona_jax.errors import PersonaError
from persona_jax.runtime import reexec_with_malloc_tunable, setup_logging

COMMANDS = ("make_random_model", "sample", "make_class_images", "bench", "make_toy_model", "plot",
            "export", "eval", "verify")


def build_parser() -> argparse.ArgumentParser:
  import importlib

  from persona_jax.cli import train
  from persona_jax.methods.registry import commands
  parser = OneLineErrorParser(prog="persona-jax", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  sub.add_parser(train.NAME, help=train.HELP, add_help=False)
  for name in COMMANDS:
    module = importlib.import_module(f"persona_jax.cli.{name}")
    p = sub.add_parser(module.NAME, help=module.HELP, formatter_class=DefaultsHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(func=module.run)
  for command in commands():
    p = sub.add_parser(command.name, help=command.help, formatter_class=DefaultsHelpFormatter)
    command.add_arguments(p)
    p.set_defaults(func=command.run)
  return parser


def _toy_face_analysis():
  """The toy world's face analysis, imported when asked for (not at every start)."""
  from persona_jax.world.toy_face_detector import toy_face_analysis
  return toy_face_analysis()


def main(argv=None) -> int:
  if argv is None:
    reexec_with_malloc_tunable()
  argv = sys.argv[1:] if argv is None else list(argv)
  from persona_jax.face.analysis import register_named_analysis
  register_named_analysis("toy", _toy_face_analysis)      # --face-analysis toy
  if argv and argv[0] == "train":
    from persona_jax.cli import train
    setup_logging(verbose=False)
    try:
      return train.main(argv[1:])
    except PersonaError as e:
      print(f"persona-jax train: error: {e}", file=sys.stderr)
      return 2
  args = build_parser().parse_args(argv)
  setup_logging(args.verbose)
  try:
    if hasattr(args, "coordinator_address"):         # a computing command: several processes?
      from persona_jax.cli import process_flags
      process_flags.start(args)
    return args.func(args)
  except PersonaError as e:
    print(f"persona-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
