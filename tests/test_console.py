"""fspad_jax.console: plain progress in logs, plain log lines, quiet imports, the noise
check."""

import io
import logging
import os
import subprocess
import sys

from fspad_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_progress_in_a_log_is_plain_periodic_lines():
  lines = []
  bar = console.PlainProgress(10, "decode[fs_only]", "rec", every_s=0.0, log=lines.append)
  bar.update(3)
  bar.set_postfix_str("12.5 tok/s")
  bar.update(7)
  bar.close()
  bar.close()  # once only
  assert lines == ["  decode[fs_only]: 3/10 rec (0s)",
                   "  decode[fs_only]: 10/10 rec (0s, 12.5 tok/s)",
                   "  decode[fs_only]: 10/10 rec (0s, 12.5 tok/s)"]
  quiet = []
  bar = console.PlainProgress(10, "x", "step", every_s=3600.0, log=quiet.append)
  for _ in range(10):
    bar.update(1)
  bar.close()
  assert quiet == ["  x: 10/10 step (0s)"]  # between reports: silent


def test_progress_kind_follows_the_stream():
  log_file = io.StringIO()  # not a terminal
  assert isinstance(console.progress(5, "d", "u", stream=log_file), console.PlainProgress)
  disabled = console.progress(5, "d", "u", enabled=False)
  disabled.update(5)
  disabled.close()  # prints nothing (checked below through capsys in the next test)

  class Tty(io.StringIO):
    def isatty(self):
      return True
  from tqdm import tqdm
  bar = console.progress(5, "d", "u", stream=Tty())
  assert isinstance(bar, tqdm)
  bar.close()


def test_setup_logging_plain_lines(capsys):
  root = logging.getLogger()
  saved = root.handlers[:], root.level, logging.getLogger("fspad_jax").level
  try:
    console.setup_logging()
    logging.getLogger("fspad_jax.data").info("prepared %d rows", 3)
    logging.getLogger("fspad_jax.data").warning("dropped %d", 2)
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.getLogger("absl").info("orbax chatter")
    logging.getLogger("orbax.checkpoint").warning("a warning that matters")
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("fspad_jax").setLevel(saved[2])
  err = capsys.readouterr().err
  assert err.splitlines() == ["prepared 3 rows", "warning: dropped 2",
                              "warning: a warning that matters"]


def test_find_noise():
  clean = "[run] pretrain\n  pretrain: 40/120 step (30s, loss=6.1)\n[done] pretrain in 90s\n"
  assert console.find_noise(clean) == []
  noisy = ("[transformers] PyTorch was not found. Models won't be available\n"
           "I1201 20:19:00.738653 140563941350272 data.py:608] tokenizing\n"
           "Downloading and preparing dataset Unknown size (download: Unknown size)\n"
           "\x1b[A\n"
           "train eagle:  10%|#         | 5/50\r[run] drafts/fspad\n"
           "Unable to initialize backend 'tpu': not found\n")
  kinds = [n.split(":")[0] for n in console.find_noise(noisy)]
  assert kinds == ["transformers' PyTorch advice", "absl-format log line",
                   "tfds download banner", "terminal escape code",
                   "carriage return (a progress bar)", "jax backend probing"]


def test_quiet_imports_silences_transformers_advice():
  """transformers prints its advice (e.g. "PyTorch was not found", when torch is absent)
  through warning_advice, which quiet_imports turns off."""
  code = ("import sys; from fspad_jax import console; {} import transformers; "
          "from transformers.utils import logging as tl; "
          "tl.get_logger('transformers').warning_advice('PyTorch was not found.')")
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  loud = subprocess.run([sys.executable, "-c", code.format("")], env=env,
                        capture_output=True, text=True, timeout=120)
  quiet = subprocess.run([sys.executable, "-c", code.format("console.quiet_imports();")],
                         env=env, capture_output=True, text=True, timeout=120)
  assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
  assert "PyTorch was not found" in loud.stderr
  assert "PyTorch was not found" not in quiet.stderr


def test_noise_check_cli(tmp_path):
  (tmp_path / "ok.log").write_text("[run] data\n[done] data in 1.0s\n")
  (tmp_path / "bad.log").write_text("[run] data\nDownloading and preparing dataset x\n")
  assert console.main([str(tmp_path / "ok.log")]) == 0
  assert console.main([str(tmp_path / "ok.log"), str(tmp_path / "bad.log")]) == 1
