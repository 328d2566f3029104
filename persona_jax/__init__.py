"""persona_jax: personalize Stable Diffusion in JAX/Flax.

The public API is imported lazily so that `import persona_jax.models` stays light.
"""

__version__ = "0.1.0"

from persona_jax.errors import ConfigError, ModelFileError, PersonaError, PickleRefusedError

_LAZY = {
    "Pipeline": "persona_jax.pipeline",
    "load_pipeline": "persona_jax.pipeline",
    "save_pipeline": "persona_jax.pipeline",
    # Training: a config (a shipped one by name, or a file) to a typed RunConfig (then
    # persona_jax.train.loop.train(config, workdir)).
    "load_config": "persona_jax.train.config",
    "run_config": "persona_jax.train.config",
    # Methods and their results: the registry, a run folder or result file to (spec, result).
    "METHODS": "persona_jax.methods.registry",
    "find_run": "persona_jax.methods.registry",
    "SampleRequest": "persona_jax.methods.spec",
    # Sampling.
    "SampleOptions": "persona_jax.text_to_image",
    "Sampling": "persona_jax.text_to_image",
    "text_to_image": "persona_jax.text_to_image",
}

__all__ = ["ConfigError", "ModelFileError", "PersonaError", "PickleRefusedError", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'persona_jax' has no attribute '{name}'")
