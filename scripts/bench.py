"""Same as `persona-jax bench ...` (see `persona-jax bench --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["bench", *sys.argv[1:]]))
