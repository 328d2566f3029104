"""Same as `persona-jax verify ...` (see `persona-jax verify --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["verify", *sys.argv[1:]]))
