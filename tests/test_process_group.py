"""tests/process_group.py: a multi-process job restarts after a transient gloo failure, and
only then."""

import os
import sys

import pytest

from process_group import ProcessGroup


@pytest.mark.parametrize("first_failure,expected_attempts", [
    ("gloo: Connect timeout [127.0.0.1]:4242", 2),
    ("AssertionError: a real failure", 1)])
def test_process_group_restarts_only_after_a_transient_failure(tmp_path, first_failure,
                                                               expected_attempts):
  script = ("import sys; attempt = int(sys.argv[1]); "
            f"print({first_failure!r} if attempt == 0 else 'ok', flush=True); "
            "sys.exit(1 if attempt == 0 else 0)")

  def commands(port, attempt):
    assert port > 0
    return [[sys.executable, "-c", script, str(attempt)] for _ in range(2)]

  group = ProcessGroup(commands, tmp_path, "job", dict(os.environ), attempts=3).start()
  logs = group.wait(timeout=60)
  assert group.attempt + 1 == expected_attempts
  if expected_attempts == 2:
    assert group.returncodes == [0, 0] and all("ok" in log for log in logs)
  else:
    assert group.returncodes == [1, 1] and all("a real failure" in log for log in logs)
