"""Same as `persona-jax make-random-model ...` (see `persona-jax make-random-model --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["make-random-model", *sys.argv[1:]]))
