"""The project files keep their promises: README commands, CI, packaged subpackages."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
  readme = (ROOT / "README.md").read_text()
  assert ci in readme, "the README's test command and .ci/run must be the same line"


def test_every_subpackage_is_packaged():
  listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
  found = {"persona_jax.configs"}
  for d in (ROOT / "persona_jax").rglob("*"):
    if d.is_dir() and d.name != "__pycache__":
      found.add(".".join(d.relative_to(ROOT).parts))
  found.add("persona_jax")
  assert found == listed


def test_torch_is_pinned_through_constraints_only():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert not any(d.startswith("torch") for d in project["dependencies"])
  assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_console_script_reexecutes_itself_not_the_working_directory(monkeypatch):
  """The huge-page re-exec runs the console script again (its folder on sys.path), never
  `python -m persona_jax` from a source checkout's root, whose tree lacks persona_jax.configs."""
  import os
  import platform
  import sys

  from persona_jax import runtime
  calls = []
  monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("PERSONA_JAX_NO_REEXEC", raising=False)
  monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.39"))
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(sys, "argv", [__file__, "sample", "--prompt", "x"])
  runtime.reexec_with_malloc_tunable()
  exe, args, env = calls[-1]
  assert args == [sys.executable, __file__, "sample", "--prompt", "x"]
  assert env["GLIBC_TUNABLES"] == runtime.MALLOC_TUNABLE and env["PERSONA_JAX_NO_REEXEC"] == "1"
  monkeypatch.setattr(sys, "argv", ["/somewhere/persona_jax/__main__.py", "verify"])
  runtime.reexec_with_malloc_tunable()
  assert calls[-1][1] == [sys.executable, "-m", "persona_jax", "verify"]
