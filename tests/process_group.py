"""Local multi-process jobs for the tests (jax.distributed over gloo on localhost).

On a loaded machine gloo's connection between the processes can time out ("Connect
timeout") before the slower process reaches its first collective. That says nothing about
the code under test, so a ProcessGroup restarts the whole job, on a fresh port and with
fresh outputs, when (and only when) a process failed that way.
"""

import os
import re
import socket
import subprocess
import time
from typing import Callable, Sequence

# Start-up failures of the processes' rendezvous, not of the code under test.
TRANSIENT = re.compile(r"Connect timeout|Gloo connectFullMesh failed|"
                       r"Barrier timed out|DEADLINE_EXCEEDED: .*(?:connect|barrier)", re.I)
GRACE_S = 60.0  # how long the others may run on after one process failed


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def is_transient(logs: Sequence[str]) -> bool:
  return any(TRANSIENT.search(log) for log in logs)


class ProcessGroup:
  """Processes started together from `make_commands(port, attempt)`; each writes its output
  to `<log_dir>/<name><i>-<attempt>.log`. wait() returns the logs of the first attempt in
  which none failed transiently (it does not judge other failures: the caller does)."""

  def __init__(self, make_commands: Callable[[int, int], list[list[str]]], log_dir,
               name: str, env: dict, attempts: int = 3):
    self.make_commands, self.log_dir, self.name = make_commands, str(log_dir), name
    self.env, self.attempts = env, attempts
    self.attempt, self.procs, self.paths = 0, [], []

  def start(self) -> "ProcessGroup":
    commands = self.make_commands(free_port(), self.attempt)
    self.paths = [os.path.join(self.log_dir, f"{self.name}{i}-{self.attempt}.log")
                  for i in range(len(commands))]
    self.procs = []
    for cmd, path in zip(commands, self.paths):
      with open(path, "w") as log:  # a file: no pipe to fill up
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT))
    return self

  def _wait_once(self, timeout: float) -> list[str]:
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
      if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
        failed_at = time.monotonic()
      if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
        break
      time.sleep(0.5)
    self.kill()
    logs = []
    for path in self.paths:
      with open(path, errors="replace") as f:
        logs.append(f.read())
    return logs

  def wait(self, timeout: float = 600.0) -> list[str]:
    """Waits for every process (killing the rest `GRACE_S` after one failed); restarts
    after a transient failure, up to `attempts` attempts in all."""
    while True:
      logs = self._wait_once(timeout)
      failed = any(p.returncode != 0 for p in self.procs)
      if not (failed and is_transient(logs)) or self.attempt + 1 >= self.attempts:
        return logs
      self.attempt += 1
      self.start()

  @property
  def returncodes(self) -> list[int | None]:
    return [p.returncode for p in self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
