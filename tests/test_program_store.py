"""The program store (persona_jax/program_store.py): its key changes with whatever the program is a
function of, non-plain static arguments take the plain jitted call, entries are read back, a corrupt
one is rewritten, and the stored program gives the plain path's bits."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import program_store
from persona_jax.program_store import NotPlain, StoredProgram, describe_static, program_key
from tests.markers import slow


@dataclasses.dataclass(frozen=True)
class Config:
  scale: float = 2.0
  dtype: type = jnp.float32
  layers: tuple = (1, 2)


@functools.partial(jax.jit, static_argnames=("config",))
def scaled(x, *, config):
  return (x * config.scale).astype(config.dtype).sum(axis=-1)


@pytest.fixture
def store(tmp_path, monkeypatch):
  """An empty store in tmp_path (on: the suite runs with the persistent compilation cache)."""
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path))
  monkeypatch.delenv("PERSONA_JAX_PROGRAM_STORE", raising=False)
  assert program_store.enabled()
  program_store.counts.clear()
  return tmp_path / "programs"


def test_key_changes_with_static_fields_shapes_and_sources(tmp_path, monkeypatch):
  x = np.zeros((2, 3), np.float32)
  key = program_key("f", {"config": Config()}, (x,))
  assert key == program_key("f", {"config": Config()}, (np.ones((2, 3), np.float32),))
  assert key != program_key("f", {"config": Config(scale=3.0)}, (x,))
  assert key != program_key("f", {"config": Config(dtype=jnp.bfloat16)}, (x,))
  assert key != program_key("f", {"config": Config()}, (np.zeros((2, 4), np.float32),))
  assert key != program_key("f", {"config": Config()}, (np.zeros((2, 3), np.int32),))
  assert key != program_key("f", {"config": Config()}, ({"x": x},))
  assert key != program_key("g", {"config": Config()}, (x,))
  # A source edit: another digest of the package's files.
  (tmp_path / "module.py").write_text("A = 1\n")
  monkeypatch.setattr(program_store, "PACKAGE", tmp_path)
  program_store.environment.cache_clear()
  try:
    before = program_key("f", {"config": Config()}, (x,))
    (tmp_path / "module.py").write_text("A = 2\n")
    program_store.environment.cache_clear()
    assert program_key("f", {"config": Config()}, (x,)) != before
  finally:
    program_store.environment.cache_clear()


def test_only_plain_static_arguments_are_described():
  assert "scale=builtins.float:2.0" in describe_static(Config())
  for value in (lambda: 0, np.zeros(2), object(), Config(layers=(np.ones(1),))):
    with pytest.raises(NotPlain):
      describe_static(value)


def test_entries_written_read_back_and_rewritten_when_corrupt(store):
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  expected = scaled(x, config=Config())
  got = StoredProgram(scaled, "test.scaled")(x, config=Config())
  assert program_store.counts == {"stored": 1}
  (entry,) = store.iterdir()
  np.testing.assert_array_equal(got, expected)
  got = StoredProgram(scaled, "test.scaled")(x, config=Config())         # another process
  assert program_store.counts == {"stored": 1, "loaded": 1}
  np.testing.assert_array_equal(got, expected)
  entry.write_bytes(b"not an exported program")
  StoredProgram(scaled, "test.scaled")(x, config=Config())
  assert program_store.counts == {"stored": 2, "loaded": 1}
  assert [p.name for p in store.iterdir()] == [entry.name]


def test_non_plain_static_argument_takes_the_plain_call(store):
  @functools.partial(jax.jit, static_argnames=("fn",))
  def apply(x, *, fn):
    return fn(x)

  program = StoredProgram(apply, "test.apply")
  np.testing.assert_array_equal(program(np.ones(3), fn=jnp.sin), apply(np.ones(3), fn=jnp.sin))
  assert program_store.counts == {"plain": 1} and not store.exists()


class Unregistered(NamedTuple):
  y: jax.Array


def test_a_program_that_cannot_be_serialized_takes_the_plain_call(store):
  @jax.jit
  def wrap(x):
    return Unregistered(x + 1)

  for _ in range(2):                                     # the second: a process that knows it
    np.testing.assert_array_equal(StoredProgram(wrap, "test.wrap")(np.ones(2)).y, 2 * np.ones(2))
  assert program_store.counts == {"plain": 2}
  assert [p.suffix for p in store.iterdir()] == [".not-exportable"]


def test_off_switch(store, monkeypatch):
  monkeypatch.setenv("PERSONA_JAX_PROGRAM_STORE", "0")
  StoredProgram(scaled, "test.scaled")(np.ones((1, 2), np.float32), config=Config())
  assert not program_store.counts and not store.exists()


@slow
def test_sampler_from_the_store_gives_the_plain_bits(pipes, monkeypatch):
  """`generate` through stored programs (read back as a new process would; in the user cache
  folder as for the rest of the suite, so a warm run traces once) and through the plain jitted
  functions: the same bits (latents and decoded images). Slow: by default the sampling parity
  tests against diffusers run through the store, and test_compile_once's second process remakes
  the first's images from stored programs."""
  from persona_jax.diffusion import sampling
  from persona_jax.tokenizer import tokenize
  pipe = pipes["sd1"]
  inputs = {"ids": tokenize(pipe.tokenizer, ["a red ball"]),
            "negative_ids": tokenize(pipe.tokenizer, [""])}

  def run():
    return sampling.generate(pipe.params, inputs, 3, np.arange(1), 7.5, 0.0, 0.5,
                             models=pipe.models(pipe.unet), scheduler=pipe.scheduler_config,
                             num_steps=2, latent_shape=(4, 4, 4), sampler="ddim")

  def run_as_a_new_process():
    program_store.counts.clear()
    for program in (sampling._prepare, sampling._denoise_chunk, sampling._decode):
      monkeypatch.setattr(program, "_calls", {})
    return run()

  images = run_as_a_new_process()
  if program_store.counts["stored"]:               # an empty store: written, now read back
    np.testing.assert_array_equal(np.asarray(run_as_a_new_process()), np.asarray(images))
  assert program_store.counts == {"loaded": 3}
  monkeypatch.setenv("PERSONA_JAX_PROGRAM_STORE", "0")
  np.testing.assert_array_equal(np.asarray(images), np.asarray(run()))


def test_off_without_flatbuffers(monkeypatch):
  """JAX serializes programs with flatbuffers; where it is missing the store is off (a plain
  install once failed here with an ImportError from `serialize`), not an error."""
  import importlib.util
  find_spec = importlib.util.find_spec
  assert jax.config.jax_compilation_cache_dir               # the suite runs with the cache on
  assert program_store.enabled()
  program_store._can_serialize.cache_clear()
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "flatbuffers" else find_spec(name, *a))
  try:
    assert not program_store.enabled()
  finally:
    monkeypatch.undo()
    program_store._can_serialize.cache_clear()
  assert program_store.enabled()
