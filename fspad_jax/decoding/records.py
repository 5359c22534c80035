"""Job input and output files: JSONL input records (parse_record, load_records) and the
append-only, fsync'ed output (scan_output, JsonlWriter); check_input_path and
check_output_path refuse paths that cannot be one (a directory, a missing file).

Every piece of text a record gives (prompt, messages contents, turns) must be valid UTF-8
and not blank; `messages` roles follow train.py's rule (fspad_jax.data.normalize_role)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

from fspad_jax.data import ASSISTANT_ROLES, SYSTEM_ROLES, USER_ROLES, normalize_role
from fspad_jax.decoding.engine import DecodeEngine
from fspad_jax.decoding.settings import DecodeError

PROMPT_KEYS = ("prompt", "messages", "turns", "input_ids")


@dataclasses.dataclass
class Record:
  """One valid input line."""

  id: Any  # str or int, as given
  line: int  # 1-based line number in the input file
  kind: str  # one of PROMPT_KEYS
  input_ids: list[int]  # the (first) prompt, tokenized
  turns: list[str] = dataclasses.field(default_factory=list)  # user messages (kind turns)


@dataclasses.dataclass
class Problem:
  """An input line that was not decoded."""

  line: int
  reason: str

  def where(self, path: str) -> str:
    return f"{path}:{self.line}: {self.reason}"


def id_key(record_id) -> str:
  """Identity of an id across input and output files (1 and "1" differ)."""
  return json.dumps(record_id)


def _check_id(obj) -> Any:
  if "id" not in obj:
    raise ValueError("missing 'id'")
  rid = obj["id"]
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
    raise ValueError(f"'id' must be a non-empty string or an integer, got {rid!r}")
  return rid


KNOWN_ROLES = ", ".join(sorted(USER_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES))


def _check_text(value: str, what: str) -> str:
  """A non-blank string that is valid Unicode (JSON escapes can give lone surrogates)."""
  if not value.strip():
    raise ValueError(f"empty {what} (blank or whitespace only)")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError(f"{what} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                     f"which is not text") from None
  return value


def _chat(value) -> list[dict]:
  """`messages` -> [{role, content}] with roles normalized as train.py does."""
  if not isinstance(value, list) or not value:
    raise ValueError("'messages' must be a non-empty list of {role, content}")
  chat = []
  for i, m in enumerate(value):
    if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
        or not isinstance(m.get("content"), str)):
      raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    role = normalize_role(m["role"])
    if role is None:
      raise ValueError(f"messages[{i}] has role {m['role']!r}, which train.py rejects too "
                       f"(known: {KNOWN_ROLES})")
    chat.append({"role": role, "content": _check_text(m["content"],
                                                      f"messages[{i}] content")})
  return chat


def parse_record(text: str, line: int, engine: DecodeEngine) -> Record:
  """One input line -> Record; ValueError with the reason when it is malformed."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  rid = _check_id(obj)
  if isinstance(rid, str):
    _check_text(rid, "'id'")
  kinds = [k for k in PROMPT_KEYS if k in obj]
  if len(kinds) != 1:
    raise ValueError(f"needs exactly one of {', '.join(PROMPT_KEYS)}; got "
                     f"{', '.join(kinds) if kinds else 'none'}")
  kind, value = kinds[0], obj[kinds[0]]
  turns = []
  if kind == "prompt":
    if not isinstance(value, str):
      raise ValueError(f"'prompt' must be a string, got {type(value).__name__}")
    ids = engine.encode_text(_check_text(value, "prompt"))
  elif kind == "messages":
    ids = engine.encode_chat(_chat(value))
  elif kind == "turns":
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
      raise ValueError("'turns' must be a non-empty list of strings")
    turns = [_check_text(t, f"turns[{i}]") for i, t in enumerate(value)]
    ids = engine.encode_chat([{"role": "user", "content": turns[0]}])
  else:
    if (not isinstance(value, list)
        or any(isinstance(t, bool) or not isinstance(t, int) for t in value)):
      raise ValueError("'input_ids' must be a list of integers")
    ids = list(value)
  if not ids:
    raise ValueError("empty prompt (no tokens)")
  vocab = engine.cfg.vocab_size
  bad = [t for t in ids if not 0 <= t < vocab]
  if bad:
    raise ValueError(f"token id {bad[0]} out of the target's vocabulary (size {vocab})")
  if len(ids) > engine.max_prompt_len:
    raise ValueError(too_long_reason(len(ids), engine))
  return Record(id=rid, line=line, kind=kind, input_ids=ids, turns=turns)


def too_long_reason(n: int, engine: DecodeEngine) -> str:
  s = engine.settings
  room = (f"decode.cache_len={s.cache_len}" if s.cache_len else
          f"max_position_embeddings={engine.cfg.max_position_embeddings}")
  tree = (f" and {s.tree_reserve} slots for the draft tree"
          if s.tree_reserve and not s.cache_len else "")
  return (f"prompt of {n} tokens is too long: at most {engine.max_prompt_len} fit "
          f"({room} minus decode.max_new_tokens={s.max_new_tokens}{tree})")


def check_input_path(path: str | None) -> None:
  """Refuses an input path that is not a readable, non-empty file, naming it."""
  if not path:
    raise DecodeError("no input file given (--input)")
  if os.path.isdir(path):
    raise DecodeError(f"input path {path!r} is a directory, not a JSONL file")
  if not os.path.exists(path):
    raise DecodeError(f"input file {path!r} does not exist")
  if not os.access(path, os.R_OK):
    raise DecodeError(f"input file {path!r} is not readable (permission denied)")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise DecodeError(f"input file {path!r} is empty: no record to decode")


def check_output_path(path: str | None, input_path: str | None = None) -> None:
  """Refuses an output path that cannot be an appendable JSONL file, naming it."""
  if not path:
    raise DecodeError("no output file given (--output)")
  if os.path.isdir(path):
    raise DecodeError(f"output path {path!r} is a directory; give a file path, e.g. "
                      f"{os.path.join(path, 'out.jsonl')!r}")
  if os.path.exists(path) and not os.path.isfile(path):
    raise DecodeError(f"output path {path!r} is not a regular file")
  out_dir = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(out_dir):
    raise DecodeError(f"output directory {out_dir!r} does not exist")
  if input_path and os.path.exists(path) and os.path.samefile(path, input_path):
    raise DecodeError(f"output path {path!r} is the input file")


def _utf8_problem(raw: bytes, error: UnicodeDecodeError) -> str:
  return (f"invalid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the "
          f"line); fix the file's encoding")


def load_records(path: str, engine: DecodeEngine
                 ) -> tuple[list[Record], list[Problem], int]:
  """Parses a JSONL input file. Returns (records, problems, blank lines); a duplicate id is
  a problem on its later line, and so is a line that is not valid UTF-8 (never altered)."""
  records, problems, blank = [], [], 0
  first_line: dict[str, int] = {}
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DecodeError(f"input file {path!r}: cannot open it ({e.strerror})") from None
  with f:
    for line, raw in enumerate(f, 1):
      if line == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        raw = raw[3:]
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        problems.append(Problem(line, _utf8_problem(raw, e)))
        continue
      if not text.strip():
        blank += 1
        continue
      try:
        rec = parse_record(text, line, engine)
      except ValueError as e:
        problems.append(Problem(line, str(e)))
        continue
      key = id_key(rec.id)
      if key in first_line:
        problems.append(Problem(line, f"duplicate id {rec.id!r} (first on line "
                                      f"{first_line[key]})"))
        continue
      first_line[key] = line
      records.append(rec)
  return records, problems, blank


class OutputScan(NamedTuple):
  """What an existing output file holds."""

  done: set[str]  # ids (id_key) with a record
  partial: bool  # a partial last line (a killed write) was found
  duplicates: dict[str, list[int]]  # id_key -> its line numbers, for ids on several lines


def scan_output(path: str, truncate: bool = True) -> OutputScan:
  """Ids already in an output file, whether a partial last line (left by a killed job) was
  found, and ids written more than once; with truncate, the partial line is cut off so that
  appends stay well formed."""
  if not os.path.exists(path):
    return OutputScan(set(), False, {})
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1  # bytes up to the last complete line
  lines: dict[str, list[int]] = {}
  for i, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
    if not raw.strip():
      continue
    try:
      key = id_key(json.loads(raw)["id"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
      raise DecodeError(f"{path}:{i}: corrupt output line (not a JSON record with an 'id'); "
                        f"fix or remove it before resuming") from None
    lines.setdefault(key, []).append(i)
  partial = end < len(data)
  if partial and truncate:
    os.truncate(path, end)
  return OutputScan(set(lines), partial, {k: v for k, v in lines.items() if len(v) > 1})


class JsonlWriter:
  """Appends one whole JSON line per record, fsync'ed. A write that fails or is interrupted
  (Ctrl-C, a full disk) is cut back off, so the file always ends with a whole line."""

  def __init__(self, path: str):
    self.path = path
    try:
      self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
      raise DecodeError(f"output file {path!r}: cannot open it for writing "
                        f"({e.strerror})") from None

  def write(self, obj: dict) -> None:
    data = memoryview((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
    start = os.lseek(self.fd, 0, os.SEEK_END)
    try:
      while data:
        data = data[os.write(self.fd, data):]
      os.fsync(self.fd)
    except KeyboardInterrupt:
      if data:  # cut mid-line: drop the partial line
        os.ftruncate(self.fd, start)
      else:  # the line is whole: keep it, and finish making it durable
        os.fsync(self.fd)
      raise
    except BaseException as e:
      os.ftruncate(self.fd, start)
      if isinstance(e, OSError):
        raise DecodeError(f"output file {self.path!r}: cannot write ({e.strerror}); it holds "
                          f"every record written before, and a rerun resumes") from None
      raise

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None
