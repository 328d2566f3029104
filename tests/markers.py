"""Test markers shared by several files."""

import os

import pytest

# Checks that overlap cheaper ones and cost minutes of compilation on 2 cores run only with
# PERSONA_JAX_SLOW_TESTS=1 (keeps the default suite under the 15-minute CI bar).
slow = pytest.mark.skipif(not os.environ.get("PERSONA_JAX_SLOW_TESTS"),
                          reason="slow check: set PERSONA_JAX_SLOW_TESTS=1")
