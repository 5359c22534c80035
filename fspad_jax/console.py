"""Plain console output for the command-line jobs (decode.py, train.py, the pipeline).

  console.quiet_imports()   # first, before transformers / jax are imported
  console.setup_logging()   # in main(): our log lines plain, other libraries' INFO hidden
  bar = console.progress(total=n, desc="decode[fspad]", unit="rec")

On a terminal `progress` is a tqdm bar; otherwise (a log file, a pipe) it writes a plain
line now and then, so that logs hold no escape codes. `write` prints a line above an
active bar instead of gluing it onto the bar's line. Imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys
import time

PLAIN_EVERY_S = 30.0  # seconds between plain progress lines in a log
# Loggers whose INFO lines are none of the user's concern (jax: "Unable to initialize
# backend 'tpu'"; absl: Orbax's checkpointing chatter).
QUIET_LOGGERS = ("jax", "absl", "orbax", "tensorflow_datasets", "grain", "transformers")


def quiet_imports() -> None:
  """Silences start-up advice printed at import time (call before importing transformers):
  transformers' "PyTorch was not found" concerns its own models, which we do not use."""
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def one_line(error: BaseException) -> str:
  """An exception's message as one line (whitespace runs collapsed)."""
  return " ".join(str(error).split()) or type(error).__name__


def is_terminal(stream=None) -> bool:
  stream = stream or sys.stderr
  return bool(getattr(stream, "isatty", lambda: False)())


def write(msg: str) -> None:
  """One line to stderr, printed above an active progress bar (never glued onto it)."""
  from tqdm import tqdm
  tqdm.write(msg, file=sys.stderr)


class _PlainFormatter(logging.Formatter):
  """`message` for INFO, `warning: message` (`error: ...`) above it; no timestamps."""

  def format(self, record: logging.LogRecord) -> str:
    msg = record.getMessage()
    if record.exc_info:
      msg += "\n" + self.formatException(record.exc_info)
    if record.levelno >= logging.WARNING:
      return f"{record.levelname.lower()}: {msg}"
    return msg


class _WriteHandler(logging.Handler):
  """Emits through `write`, so that log lines and progress bars do not collide."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      write(self.format(record))
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
  """fspad_jax's log lines in plain text at `level`; other libraries' below WARNING hidden.
  Replaces absl's handler (installed by absl.app.run) on the root logger."""
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass
  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
  handler = _WriteHandler()
  handler.setFormatter(_PlainFormatter())
  root.addHandler(handler)
  root.setLevel(logging.WARNING)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  logging.getLogger("fspad_jax").setLevel(level)


class PlainProgress:
  """The part of tqdm's interface the jobs use, as a plain line every `every_s` seconds and
  one when closed: `desc: n/total unit (postfix)`."""

  def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
               every_s: float = PLAIN_EVERY_S, log=None):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self.every_s, self.log = every_s, log or write
    self.postfix, self.closed = "", False
    self.start = self.last = time.monotonic()

  def _line(self) -> str:
    done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
    elapsed = time.monotonic() - self.start
    return (f"  {self.desc}: {done} {self.unit} ({elapsed:.0f}s"
            + (f", {self.postfix}" if self.postfix else "") + ")")

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.monotonic()
    if now - self.last >= self.every_s:
      self.last = now
      self.log(self._line())

  def set_postfix(self, **kwargs) -> None:
    self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

  def set_postfix_str(self, s: str) -> None:
    self.postfix = s

  def close(self) -> None:
    if not self.closed:
      self.closed = True
      self.log(self._line())


class _Disabled(PlainProgress):
  def __init__(self):
    super().__init__(None, "", "")
    self.closed = True

  def update(self, n: int = 1) -> None:
    self.n += n


def progress(total: int | None, desc: str, unit: str, enabled: bool = True,
             initial: int = 0, stream=None):
  """A progress reporter: a tqdm bar on a terminal, plain periodic lines elsewhere,
  nothing when not enabled."""
  if not enabled:
    return _Disabled()
  if is_terminal(stream):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr,
                dynamic_ncols=True, leave=False)
  return PlainProgress(total, desc, unit, initial=initial)


# Output that must not reach a user's log (checked by .ci/run on the main job's log, and by
# the tests): start-up advice, absl-format lines, tfds' download banner, escape codes.
NOISE_PATTERNS = {
    "transformers' PyTorch advice": r"PyTorch was not found",
    "jax backend probing": r"Unable to initialize backend",
    "tfds download banner": r"Downloading and preparing dataset",
    "absl-format log line": r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]",
    "terminal escape code": r"\x1b\[",
    "carriage return (a progress bar)": r"\r",
}


def find_noise(text: str) -> list[str]:
  """`what: line` for every line of `text` that matches a NOISE_PATTERNS entry."""
  import re
  found = []
  for line in text.split("\n"):
    for what, pattern in NOISE_PATTERNS.items():
      if re.search(pattern, line):
        found.append(f"{what}: {line[:160]!r}")
  return found


def main(argv: list[str]) -> int:
  """python -m fspad_jax.console LOG...: exit 1, listing them, if the logs hold noise."""
  found = []
  for path in argv:
    with open(path, errors="replace", newline="") as f:
      found += [f"{path}: {n}" for n in find_noise(f.read())]
  for n in found:
    print(n)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
