"""Compile once: a second process sampling with the same shapes loads every program from JAX's
persistent compilation cache and compiles nothing (no host callbacks, no per-call constants)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One fresh process: the sampler as the `sample` command runs it (progress bar ticking), counting
# the programs that asked the persistent cache and those it had.
CHILD = """
import json, sys
from pathlib import Path
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
from persona_jax.pipeline import load_pipeline
from persona_jax.text_to_image import SampleOptions, text_to_image
pipe = load_pipeline(sys.argv[2])
options = SampleOptions(steps=3, height=16, width=16, seed=int(sys.argv[4]), batch_size=1)
images = text_to_image(pipe, [sys.argv[3]], options=options)
assert images.shape == (1, 16, 16, 3)
print(json.dumps(counts))
"""


def sample_in_fresh_process(cache: Path, model: Path, prompt: str, seed: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, "-c", CHILD, str(cache), str(model), prompt, str(seed)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_sampling_process_compiles_nothing(model_dirs):
  # The suite's cache folder: the first process compiles only what earlier runs did not store.
  import jax
  cache = Path(jax.config.jax_compilation_cache_dir)
  first = sample_in_fresh_process(cache, model_dirs["sd1"], "a red ball", 0)
  assert first["requests"] > 0
  # Another prompt and seed: the same programs, every one loaded.
  second = sample_in_fresh_process(cache, model_dirs["sd1"], "a blue box on grass", 5)
  assert second["requests"] > 0
  assert second["hits"] == second["requests"], f"recompiled: {second}"
