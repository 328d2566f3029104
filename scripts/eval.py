"""Same as `persona-jax eval ...` (see `persona-jax eval --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["eval", *sys.argv[1:]]))
