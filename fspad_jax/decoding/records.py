"""Job input and output files: JSONL input records (parse_record, load_records) and the
append-only, fsync'ed output (scan_output, JsonlWriter)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

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


def _is_str_list(x) -> bool:
  return isinstance(x, list) and len(x) > 0 and all(isinstance(s, str) for s in x)


def parse_record(text: str, line: int, engine: DecodeEngine) -> Record:
  """One input line -> Record; ValueError with the reason when it is malformed."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  rid = _check_id(obj)
  kinds = [k for k in PROMPT_KEYS if k in obj]
  if len(kinds) != 1:
    raise ValueError(f"needs exactly one of {', '.join(PROMPT_KEYS)}; got "
                     f"{', '.join(kinds) if kinds else 'none'}")
  kind, value = kinds[0], obj[kinds[0]]
  turns = []
  if kind == "prompt":
    if not isinstance(value, str):
      raise ValueError(f"'prompt' must be a string, got {type(value).__name__}")
    if not value:
      raise ValueError("empty prompt")
    ids = engine.encode_text(value)
  elif kind == "messages":
    if not isinstance(value, list) or not value:
      raise ValueError("'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(value):
      if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
          or not isinstance(m.get("content"), str)):
        raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    ids = engine.encode_chat(value)
  elif kind == "turns":
    if not _is_str_list(value):
      raise ValueError("'turns' must be a non-empty list of strings")
    if not all(value):
      raise ValueError("'turns' holds an empty string")
    turns = list(value)
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


def load_records(path: str, engine: DecodeEngine
                 ) -> tuple[list[Record], list[Problem], int]:
  """Parses a JSONL input file. Returns (records, problems, blank lines); a duplicate id is
  a problem on its later line."""
  records, problems, blank = [], [], 0
  first_line: dict[str, int] = {}
  with open(path, encoding="utf-8-sig", errors="replace") as f:
    for line, text in enumerate(f, 1):
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


def scan_output(path: str, truncate: bool = True) -> tuple[set[str], bool]:
  """Ids (as id_key) already in an output file, and whether a partial last line (left by a
  killed job) was found; with truncate, that line is cut off so appends stay well-formed."""
  if not os.path.exists(path):
    return set(), False
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1  # bytes up to the last complete line
  done = set()
  for i, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
    if not raw.strip():
      continue
    try:
      done.add(id_key(json.loads(raw)["id"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
      raise DecodeError(f"{path}:{i}: corrupt output line (not a JSON record with an 'id'); "
                        f"fix or remove it before resuming") from None
  partial = end < len(data)
  if partial and truncate:
    os.truncate(path, end)
  return done, partial


class JsonlWriter:
  """Appends one whole JSON line per record, flushed and fsync'ed."""

  def __init__(self, path: str):
    self.f = open(path, "a", encoding="utf-8")

  def write(self, obj: dict) -> None:
    self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    self.f.flush()
    os.fsync(self.f.fileno())

  def close(self) -> None:
    self.f.close()
