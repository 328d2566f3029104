"""`python -m tests.process_main ARGS`: `persona-jax ARGS` as one process of a multi-process run
in the tests. With PERSONA_JAX_AUDIT=FILE it records, one per line, every file and folder this
process creates or renames into (Python's audit hooks: `open` for writing, `os.mkdir`,
`os.rename`/`os.replace`), so a test can check that only process 0 writes outputs (files written
from native code, such as orbax's tensorstore checkpoints, are not seen)."""

import os
import sys


def _audit(path: str) -> None:
  log = open(path, "a", buffering=1)            # opened before the hook: not recorded itself

  def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
      mode = args[1] or "r"
      if isinstance(mode, str) and any(m in mode for m in "wax+"):
        log.write(f"open {os.path.abspath(os.fsdecode(args[0]))}\n")
      elif isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        log.write(f"open {os.path.abspath(os.fsdecode(args[0]))}\n")
    elif event == "os.mkdir":
      log.write(f"mkdir {os.path.abspath(os.fsdecode(args[0]))}\n")
    elif event == "os.rename":
      log.write(f"rename {os.path.abspath(os.fsdecode(args[1]))}\n")
  sys.addaudithook(hook)


if __name__ == "__main__":
  if os.environ.get("PERSONA_JAX_AUDIT"):
    _audit(os.environ["PERSONA_JAX_AUDIT"])
  from persona_jax.cli import main
  sys.exit(main(sys.argv[1:]))
