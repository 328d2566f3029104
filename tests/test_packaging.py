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
