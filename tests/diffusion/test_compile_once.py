"""Compile once: a second process sampling (slow: training, making class images) with the same
shapes loads every program from JAX's persistent compilation cache and compiles nothing (no host
callbacks, no per-call constants); the sampler's traced programs come from the program store."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.markers import slow

ROOT = Path(__file__).resolve().parents[2]

# One fresh process: the sampler as the `sample` command runs it (progress bar ticking), counting
# the programs that asked the persistent cache and those it had.
CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from jax._src import monitoring
from persona_jax.cache import enable_compilation_cache
enable_compilation_cache(Path(sys.argv[1]))
counts = {"requests": 0, "hits": 0}
EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
          "/jax/compilation_cache/cache_hits": "hits"}
def count(event, **kw):
  if event in EVENTS:
    counts[EVENTS[event]] += 1
monitoring.register_event_listener(count)
from persona_jax import program_store
from persona_jax.pipeline import load_pipeline
from persona_jax.text_to_image import SampleOptions, text_to_image
pipe = load_pipeline(sys.argv[2])
images = []
for prompt, seed in zip(sys.argv[4::2], sys.argv[5::2]):
  options = SampleOptions(steps=3, height=16, width=16, seed=int(seed), batch_size=1)
  images.append(text_to_image(pipe, [prompt], options=options))
  assert images[-1].shape == (1, 16, 16, 3)
np.save(sys.argv[3], np.concatenate(images))
print(json.dumps(dict(counts, programs=dict(program_store.counts))))
"""


def sample_in_fresh_process(cache: Path, model: Path, out: Path, *prompt_seeds) -> dict:
  """Runs CHILD: the images of each (prompt, seed) in `out` (.npy), its cache counts returned."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("PERSONA_JAX_PROGRAM_STORE", None)
  proc = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(model), str(out),
                         *map(str, prompt_seeds)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_sampling_process_compiles_nothing(model_dirs, tmp_path):
  """...and traces nothing either: it loads the sampler's programs from the program store
  (program_store.py), and they make the same images."""
  # The suite's cache folder: the first process compiles only what earlier runs did not store.
  import jax
  cache = Path(jax.config.jax_compilation_cache_dir)
  first = sample_in_fresh_process(cache, model_dirs["sd1"], tmp_path / "1.npy", "a red ball", 0)
  assert first["requests"] > 0
  # Another prompt and seed: the same programs, every one loaded; then the first's images again.
  second = sample_in_fresh_process(cache, model_dirs["sd1"], tmp_path / "2.npy",
                                   "a blue box on grass", 5, "a red ball", 0)
  assert second["requests"] > 0
  assert second["hits"] == second["requests"], f"recompiled: {second}"
  assert second["programs"] == {"loaded": 3}, f"traced again: {second}"
  images = np.load(tmp_path / "2.npy")
  np.testing.assert_array_equal(images[1:], np.load(tmp_path / "1.npy"))
  assert not np.array_equal(images[0], images[1])


def cli_misses(cache: Path, *argv: str) -> list[str]:
  """The programs a fresh `persona-jax ARGV` process compiled instead of loading them from the
  persistent cache of the user cache folder `cache` (JAX's miss explanations)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), PERSONA_JAX_CACHE=str(cache),
             JAX_EXPLAIN_CACHE_MISSES="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-m", "persona_jax", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return re.findall(r"PERSISTENT COMPILATION CACHE MISS for '([^']+)'", proc.stderr)


@slow
def test_second_training_run_compiles_nothing(tmp_path):
  """`train` into a new workdir (the train step, the state, the sample grid) and
  `make-class-images`, each run twice in fresh processes: the second compiles nothing."""
  train = ["train", "--config", "lora:tiny", "--config.steps=2", "--config.checkpoint_every=1",
           "--config.sample_every=2", "--config.sample_steps=2", "--noprogress"]
  cli_misses(tmp_path / "cache", *train, "--workdir", str(tmp_path / "run1"))
  assert cli_misses(tmp_path / "cache", *train, "--workdir", str(tmp_path / "run2")) == []
  classes = ["make-class-images", "--prompt", "a photo of a ball", "--num", "2", "--steps", "2"]
  cli_misses(tmp_path / "cache", *classes, "--out", str(tmp_path / "c1"))
  assert cli_misses(tmp_path / "cache", *classes, "--seed", "4", "--out", str(tmp_path / "c2")) == []
