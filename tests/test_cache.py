"""The user cache folder's remembered shapes: read back as computed, computed anew when the key
or the code they depend on changes."""

import jax
import jax.numpy as jnp

from persona_jax.cache import remembered_shapes


def test_shapes_are_remembered_per_key_and_source(tmp_path, monkeypatch):
  monkeypatch.setenv("PERSONA_JAX_CACHE", str(tmp_path / "cache"))
  source = tmp_path / "net.py"
  source.write_text("layers = 2")
  calls = []

  def compute():
    calls.append(1)
    return {"block": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.bfloat16)},
            "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}

  first = remembered_shapes("net", "config A", [source], compute)
  again = remembered_shapes("net", "config A", [source], compute)
  assert len(calls) == 1 and again == first == compute()
  assert again["block"]["kernel"].dtype == jnp.bfloat16
  remembered_shapes("net", "config B", [source], compute)
  assert len(calls) == 3                                   # (compute() above counted once)
  source.write_text("layers = 3")                          # the code changed: traced again
  remembered_shapes("net", "config A", [source], compute)
  assert len(calls) == 4
