"""persona_jax: personalize Stable Diffusion in JAX/Flax.

The public API is imported lazily so that `import persona_jax.models` stays light.
"""

__version__ = "0.1.0"

from persona_jax.errors import ConfigError, ModelFileError, PersonaError, PickleRefusedError

_LAZY = {
    "Pipeline": "persona_jax.pipeline",
    "load_pipeline": "persona_jax.pipeline",
    "save_pipeline": "persona_jax.pipeline",
}

__all__ = ["ConfigError", "ModelFileError", "PersonaError", "PickleRefusedError", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'persona_jax' has no attribute '{name}'")
