"""Errors persona_jax raises on bad input. Each message names the file or field and what to do."""


class PersonaError(Exception):
  """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(PersonaError):
  """A config file or config field that persona_jax cannot honour."""


class ModelFileError(PersonaError):
  """A model folder or weights file that is missing, malformed or does not match its config."""


class PickleRefusedError(ModelFileError):
  """A pickle file (.bin, .ckpt, .pt) that was not explicitly allowed."""
