"""One run per workdir: an OS file lock on WORKDIR/.lock, held for the run's lifetime.

The lock is `flock(2)` on an open file: the kernel drops it when the process dies (a SIGKILLed or
preempted run never leaves a stale lock, whatever the file still says). The holder writes
"PID HOST STARTED" into the file so a refused second run can name it. A multi-host run takes it
on its first process only (`hold=False` elsewhere): the run is one holder however many hosts it
spans. Readers (`export`, `sample --run`) ask `holder(workdir)` and refuse a run in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from persona_jax.errors import PersonaError

LOCK_FILE = ".lock"


class WorkdirInUse(PersonaError):
  """Another process is training in this workdir."""


def _describe(path: Path) -> str:
  try:
    pid, host, started = path.read_text().split(maxsplit=2)
  except (OSError, ValueError):
    return "another process"
  return f"process {pid} on {host} (since {started.strip()})"


def holder(workdir) -> str | None:
  """Who holds WORKDIR's lock ("process PID on HOST (since ...)"), or None when no run holds it."""
  path = Path(workdir) / LOCK_FILE
  try:
    with open(path, "rb") as f:           # read-only: a reader of the run folder may not write
      try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except BlockingIOError:
        return _describe(path)
      fcntl.flock(f, fcntl.LOCK_UN)
  except OSError:                         # no lock file (never trained), or unreadable
    return None
  return None


def check_not_running(workdir, what: str) -> None:
  """Raises WorkdirInUse when a run holds WORKDIR (`what`: the refused action, e.g. "export")."""
  who = holder(workdir)
  if who is not None:
    raise WorkdirInUse(f"{workdir}: the run is in progress ({who}); {what} it when it has "
                       "finished")


@contextlib.contextmanager
def workdir_lock(workdir, hold: bool = True):
  """Holds WORKDIR/.lock for the `with` body; a second holder is refused within a second (one line
  naming the workdir and the process). `hold=False`: a no-op (the non-first processes of a
  multi-host run)."""
  if not hold:
    yield
    return
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  f = open(path, "a+")
  try:
    for attempt in range(20):             # a reader's brief shared probe is not a run: retry ~1 s
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if attempt < 19:
          time.sleep(0.05)
    else:
      raise WorkdirInUse(f"{workdir}: another run is training in this workdir ({_describe(path)}); "
                         "wait for it to finish, stop it, or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    yield
  finally:
    f.close()                          # closing the file releases the lock
