"""The console script's argparse classes: `--help` that shows every flag's default (`(default:
X)` after a flag's help unless the help already says its default in words: argparse's
ArgumentDefaultsHelpFormatter without its "default: None"), and usage errors in one line."""

from __future__ import annotations

import argparse

# Actions whose default is not a value the user would pass: switches, repeatable flags, --help.
_NO_DEFAULT_SHOWN = (argparse._StoreTrueAction, argparse._StoreFalseAction,
                     argparse._AppendAction, argparse._HelpAction, argparse._VersionAction,
                     argparse._CountAction)


def shown_default(action: argparse.Action) -> str | None:
  """The "(default: X)" text argparse's help appends to `action`'s help, or None."""
  if (not action.option_strings or action.required or action.help is argparse.SUPPRESS
      or isinstance(action, _NO_DEFAULT_SHOWN) or "default" in (action.help or "").lower()):
    return None
  value = action.default
  if value is None:
    return "(default: none)"
  if isinstance(value, (list, tuple)):
    value = " ".join(str(v) for v in value)
  return f"(default: {value})".replace("%", "%%")


class DefaultsHelpFormatter(argparse.HelpFormatter):
  """Every option's help ends with its default (see `shown_default`)."""

  def _get_help_string(self, action):
    text = action.help or ""
    default = shown_default(action)
    return f"{text} {default}".strip() if default else text


class OneLineErrorParser(argparse.ArgumentParser):
  """A usage error (an unknown choice, a missing flag, a value of the wrong type) is one line
  naming the flag, and where to read the usage, instead of the whole usage block."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
