"""`python -m persona_jax ...` is the `persona-jax` console script."""

import sys

from persona_jax.cli import main

sys.exit(main())
