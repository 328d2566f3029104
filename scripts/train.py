"""Same as `persona-jax train ...`: --config configs/NAME.py[:tiny] --workdir DIR [--config.k=v]."""

import sys

from persona_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["train", *sys.argv[1:]]))
