"""Same as `persona-jax sample ...` (see `persona-jax sample --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["sample", *sys.argv[1:]]))
