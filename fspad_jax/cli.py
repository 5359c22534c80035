"""The command-line shell shared by decode.py and train.py: flag parsing whose every mistake
is one line (a config-key typo names the key and the closest existing one), and Ctrl-C as
one line with exit status 130.

  cli.run(main, "decode.py", required=("config", "input", "output"))

`main(argv)` receives no positional arguments (extra ones are refused here). Imports
nothing heavy.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable, Sequence

EXIT_USAGE = 1  # a user error (bad flag, config key, input): one line on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


def fail(tool: str, message: str, status: int = EXIT_USAGE):
  """Exits with `tool: error: message` as one line."""
  sys.stderr.write(f"{tool}: error: {' '.join(str(message).split())}\n")
  sys.exit(status)


def _config_overrides(argv: Sequence[str], flag: str) -> list[str]:
  """The dotted keys of `--<flag>.a.b=value` (or `--<flag>.a.b value`) arguments."""
  pattern = re.compile(rf"^--?{re.escape(flag)}\.([^=]+)")
  return [m.group(1) for m in map(pattern.match, argv) if m]


def _config_file_arg(argv: Sequence[str], flag: str) -> str | None:
  for i, arg in enumerate(argv):
    m = re.match(rf"^--?{re.escape(flag)}(=(.*))?$", arg)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _suggest(node, parts: list[str]) -> list[str] | None:
  """The existing key closest to `parts` below `node`, part by part (difflib); None when
  some part has no close match."""
  out = []
  for part in parts:
    if not hasattr(node, "keys"):
      return out or None
    fields = [str(f) for f in node.keys()]
    name = part if part in fields else next(
        iter(difflib.get_close_matches(part, fields, n=1, cutoff=0.6)), None)
    if name is None:
      return None
    out.append(name)
    node = node[name]
  return out


def unknown_key_message(config, key: str, flag: str = "config") -> str | None:
  """`--config.<key>` names no field of `config`: the message naming it and the closest
  existing key (difflib); None when the key exists."""
  node, done = config, []
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys"):  # `a.b` where a is a value
      return (f"--{flag}.{key}: {'.'.join([flag, *done])} is a value, not a section with "
              f"a key {part!r}")
    if part not in node.keys():
      close = _suggest(node, parts[i:])
      if close:
        hint = f"did you mean --{'.'.join([flag, *done, *close])}?"
      else:
        hint = f"{'.'.join([flag, *done])} has: {', '.join(sorted(map(str, node.keys())))}"
      return f"--{flag}.{key}: no such config key ({hint})"
    node = node[part]
    done.append(part)
  return None


def _diagnose(argv: Sequence[str], flag: str, error: Exception) -> str:
  """What went wrong with `--<flag>=FILE` or one of its `--<flag>.KEY` overrides (the
  config file is loaded again to find out)."""
  spec = _config_file_arg(argv, flag)
  if spec:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
      return f"--{flag}={spec}: no such file"
    try:
      from fspad_jax.config import load_config_module
      module = load_config_module(path)
      config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - whatever the config file raises is its error
      return f"--{flag}={spec}: the config file fails to load ({type(e).__name__}: {e})"
    for key in _config_overrides(argv, flag):
      message = unknown_key_message(config, key, flag)
      if message:
        return message
  return f"--{flag}: {type(error).__name__}: {error}"


def flags_parser(tool: str, config_flag: str = "config") -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` that reports every parsing mistake as one line and refuses
  positional arguments."""

  def parse(argv: list[str]) -> list[str]:
    from absl import flags
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      fail(tool, e)
    except Exception as e:  # noqa: BLE001 - ml_collections raises plain errors for overrides
      fail(tool, _diagnose(argv, config_flag, e))
    if len(rest) > 1:
      fail(tool, f"unexpected arguments: {' '.join(rest[1:])} (flags take --name=value)")
    return rest

  return parse


def run(main: Callable[[list[str]], object], tool: str, required: Sequence[str] = (),
        config_flag: str = "config") -> None:
  """absl.app.run(main) with one-line flag errors, and Ctrl-C (KeyboardInterrupt) as one
  line (its message, e.g. what was saved) and exit status 130."""
  from absl import app, flags
  for name in required:
    flags.mark_flag_as_required(name)
  try:
    app.run(main, flags_parser=flags_parser(tool, config_flag))
  except KeyboardInterrupt as e:
    message = " ".join(str(e).split()) or "interrupted (Ctrl-C)"
    sys.stderr.write(f"{tool}: {message}\n")
    sys.exit(EXIT_INTERRUPTED)
