"""Same as `persona-jax make-toy-model ...` (see `persona-jax make-toy-model --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["make-toy-model", *sys.argv[1:]]))
