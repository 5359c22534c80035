"""Who may write a decode output, and what it holds.

  OutputLock    one job at a time per output: an exclusive flock on `<output>.lock`, taken
                before the output is read and held until the job ends. The kernel drops it
                when its process dies, so a lock file left by a killed job blocks nothing.
  job_settings  the settings that decide what an output record holds (method, sampling,
                length limits, stop ids, tree, target and draft, with their files' sizes and
                modification times), stored as `<output>.settings.json` when the output is
                created; check_settings refuses to add records made with other ones.

Settings that change neither a record's distribution nor its content are left out: the
seed (each record is an independent draw either way; a resumed sampled run never repeats
an uninterrupted one's batches anyway), batch_size, min_prompt_bucket, timing_repeats,
mesh, --strict and --compare_vanilla.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Callable

from fspad_jax.decoding.settings import DecodeError, DecodeSettings, config_value

SETTINGS_VERSION = 1
# Files of a model directory whose change changes the model (weights, config, tokenizer).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".tiktoken",
                       ".txt")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class OutputLock:
  """An exclusive lock on `<output>.lock` (fcntl.flock, non-blocking) for one job's life.

  On a file system without locks (flock fails with ENOLCK / EOPNOTSUPP) the job runs
  unlocked after one warning line."""

  def __init__(self, output_path: str, log: Callable[[str], None] | None = None):
    self.output_path = output_path
    self.path = output_path + ".lock"
    self.log = log or (lambda msg: None)
    self.fd: int | None = None

  def acquire(self) -> "OutputLock":
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise DecodeError(f"{self.path}: cannot create the output's lock file ({e.strerror}); "
                          f"is {os.path.dirname(os.path.abspath(self.path))!r} "
                          f"writable?") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        raise DecodeError(f"output {self.output_path!r} is being written by another decode.py "
                          f"job ({owner}); wait for it to end, or give another --output"
                          ) from None
      except OSError as e:  # no locks on this file system
        os.close(fd)
        self.log(f"warning: {self.path}: cannot lock ({e.strerror}); a second job writing "
                 f"{self.output_path} at the same time would not be refused")
        return self
      # The previous owner may have unlinked the file we opened before we locked it: then
      # our lock guards nothing, and we try again on the path's current file.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(owner).encode())
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.unlink(self.path)  # while still holding it (see acquire)
    except FileNotFoundError:
      pass
    os.close(self.fd)
    self.fd = None

  def __enter__(self) -> "OutputLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_owner(fd: int) -> str:
  try:
    owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "owner unknown"


# --------------------------------------------------------------------------- settings


def files_fingerprint(directory: str) -> dict[str, str]:
  """`name: "size:mtime_ns"` of a model directory's weight, config and tokenizer files."""
  out = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.endswith(MODEL_FILE_SUFFIXES) and os.path.isfile(path):
      st = os.stat(path)
      out[name] = f"{st.st_size}:{st.st_mtime_ns}"
  return out


def _draft_fingerprint(path: str) -> dict:
  """The checkpoint that decoding `path` loads: a train.py run's latest complete step (its
  path and commit time), or an EAGLE-layout directory's files."""
  from fspad_jax.draft_source import _orbax_step_dir  # the loader's own resolution
  orbax = _orbax_step_dir(path)
  if orbax is None:
    return files_fingerprint(path)
  step_dir = orbax[0]
  commit = os.stat(os.path.join(step_dir, "commit_success.txt")).st_mtime_ns
  return {"checkpoint": step_dir, "committed": str(commit)}


def job_settings(config, settings: DecodeSettings, model_dir: str) -> dict:
  """The settings that decide an output's records, as flat `section.key: value` JSON data."""
  s = settings
  greedy = s.sampling.greedy  # top_p and top_k do not act: stored as their defaults
  out = {"decode.method": s.method, "decode.temperature": s.sampling.temperature,
         "decode.top_p": 1.0 if greedy else s.sampling.top_p,
         "decode.top_k": 0 if greedy else s.sampling.top_k}
  out.update({"decode.max_new_tokens": s.max_new_tokens, "decode.cache_len": s.cache_len,
              "decode.stop_token_ids": list(s.stop_token_ids)})
  if s.speculative:
    out.update({"decode.tree_depth": s.tree_depth, "decode.tree_top_k": s.tree_top_k,
                "decode.total_tokens": s.total_tokens})
    if s.tree:  # "auto[:pins]": the tree is chosen at load time from measured costs
      out["decode.tree"] = config_value(config, "decode.tree", "")
  model_dir = os.path.abspath(model_dir)
  out.update({"target.path": model_dir, "target.files": files_fingerprint(model_dir),
              "target.dtype": config_value(config, "target.dtype", ""),
              "target.chat_template": config_value(config, "target.chat_template", "")})
  if s.speculative:
    draft = config_value(config, "draft.path", "")
    if draft and os.path.isdir(draft):
      out.update({"draft.path": os.path.abspath(draft),
                  "draft.checkpoint": _draft_fingerprint(draft),
                  "draft.weight_dtype": config_value(config, "draft.weight_dtype", "")})
  return json.loads(json.dumps(out))  # tuples -> lists, as read back from the file


def _differences(old: dict, new: dict) -> list[str]:
  """`key old -> new` for each differing key (`key (a, b changed)` for file lists); keys
  that only one side has are named together."""
  out, added, removed = [], [], []
  for key in list(new) + [k for k in old if k not in new]:
    if key not in old:
      added.append(key)
    elif key not in new:
      removed.append(key)
    elif old[key] != new[key]:
      a, b = old[key], new[key]
      if isinstance(a, dict) and isinstance(b, dict):
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        out.append(f"{key} ({', '.join(changed)} changed)")
      else:
        out.append(f"{key} {json.dumps(a)} -> {json.dumps(b)}")
  if added:
    out.append(f"{', '.join(added)} set now")
  if removed:
    out.append(f"{', '.join(removed)} no longer set")
  return out


def check_settings(output_path: str, current: dict, has_records: bool, *,
                   allow_changed: bool = False, write: bool = True,
                   log: Callable[[str], None] | None = None) -> list[str]:
  """Compares this job's settings with those stored for `output_path` (when it holds
  records); refuses a difference (DecodeError naming the keys) unless `allow_changed`.
  Stores them when the output is new (or has none stored). Returns the differing keys."""
  log = log or (lambda msg: None)
  path = output_path + ".settings.json"
  stored = None
  if has_records and os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)["settings"]
      if not isinstance(stored, dict):
        raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
      raise DecodeError(f"{path}: not a settings record of decode.py; restore it, or delete it "
                        f"to store this job's settings for {output_path}") from None
  if stored is not None:
    diff = _differences(stored, current)
    if diff and not allow_changed:
      raise DecodeError(
          f"{output_path} holds records decoded with other settings: {'; '.join(diff)} (see "
          f"{path}); give another --output, or pass --allow_changed_settings to add to it "
          f"anyway")
    if diff:
      log(f"warning: adding to {output_path}, whose records were decoded with other settings "
          f"(--allow_changed_settings): {'; '.join(diff)}")
    return [k for k in current if stored.get(k) != current[k]] + [
        k for k in stored if k not in current]
  if has_records:
    log(f"warning: {output_path} holds records but no {os.path.basename(path)} (written by "
        f"an older decode.py?): its settings cannot be checked; this job's are stored now")
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"version": SETTINGS_VERSION, "created": _now(), "settings": current}, f,
                indent=2)
    os.replace(tmp, path)
  return []
