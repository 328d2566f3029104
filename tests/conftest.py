"""Shared fixtures: random pipelines written once per session, and JAX settings for tests.

JAX options must be set before any other JAX use, so they live at the top of this file.
"""

import os

# The suite is compile-bound (tiny models, a few steps each): LLVM's -O0 makes XLA:CPU compile
# about 30% faster. Set before JAX starts; subprocesses inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax

jax.config.update("jax_num_cpu_devices", 8)            # sharding tests on simulated devices
jax.config.update("jax_numpy_rank_promotion", "raise")
# Persistent compilation cache: a second run of the suite skips most XLA compilation.
_CACHE = os.environ.get("PERSONA_JAX_TEST_CACHE",
                        os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402

# The end-to-end files run the CLI in subprocesses for minutes. Collected first (and xdist told
# to keep the collection order: pyproject's --no-loadscope-reorder; by default it sends files
# with the most tests first, so one-test files came last), they start at once beside the rest of
# the suite instead of running as a lone tail at the end.
RUN_FIRST = ("tests/world/test_personalization_works.py",
             "tests/world/test_efficacy_image_methods.py")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.nodeid.split("::")[0] not in RUN_FIRST)

from persona_jax.pipeline import load_pipeline  # noqa: E402
from persona_jax.random_model import make_random_model  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
  """{"sd1": folder, "sd2": folder} written by make-random-model (read-only for tests)."""
  root = tmp_path_factory.mktemp("models")
  return {p: make_random_model(root / p, p, seed=i) for i, p in enumerate(("sd1", "sd2"))}


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
  """The tiny SDXL pipeline of `make-random-model --preset sdxl` (read-only for tests)."""
  return make_random_model(tmp_path_factory.mktemp("models") / "sdxl", "sdxl", seed=5)


@pytest.fixture(scope="session")
def sdxl_pipe(sdxl_dir):
  """The tiny SDXL pipeline loaded in persona_jax (float32)."""
  return load_pipeline(sdxl_dir)


@pytest.fixture(scope="session")
def pipes(model_dirs):
  """The two random pipelines loaded in persona_jax (float32)."""
  return {p: load_pipeline(d) for p, d in model_dirs.items()}
