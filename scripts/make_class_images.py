"""Same as `persona-jax make-class-images ...` (see `persona-jax make-class-images --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["make-class-images", *sys.argv[1:]]))
