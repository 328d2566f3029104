"""Same as `persona-jax merge ...` (see `persona-jax merge --help`)."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["merge", *sys.argv[1:]]))
