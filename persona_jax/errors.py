"""Errors persona_jax raises on bad input. Each message names the file or field and what to do."""


class PersonaError(Exception):
  """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(PersonaError):
  """A config file or config field that persona_jax cannot honour."""


class ModelFileError(PersonaError):
  """A model folder or weights file that is missing, malformed or does not match its config."""


class PickleRefusedError(ModelFileError):
  """A pickle file (.bin, .ckpt, .pt) that was not explicitly allowed."""


class WriteFailed(PersonaError):
  """An OS error (a full disk, a read-only folder, a quota) while writing one of our files."""


def write_failure(path, error: OSError) -> WriteFailed:
  """One line: the file, the OS's reason and the free space where it was being written."""
  import shutil
  from pathlib import Path
  folder = Path(path).parent
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  try:
    free = shutil.disk_usage(folder).free
    space = f"{free / 2**20:.1f} MB free in {folder}"
  except OSError:
    space = f"free space in {folder} unknown"
  reason = error.strerror or str(error) or type(error).__name__
  return WriteFailed(f"{path}: cannot write it ({reason}; {space}); nothing of it was kept")
