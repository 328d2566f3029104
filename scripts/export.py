"""Same as `persona-jax export ...` (see `persona-jax export --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["export", *sys.argv[1:]]))
