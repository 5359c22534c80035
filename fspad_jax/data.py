"""Training data: ShareGPT conversations -> tokenized, loss-masked, fixed-length examples.

Pipeline:
  1. `load_conversations` parses a JSON list or JSONL file in either ShareGPT layout
     ({"conversations": [{"from", "value"}]} or {"messages": [{"role", "content"}]}) and
     normalizes roles to system / user / assistant.
  2. `tokenize_conversation` renders one conversation with the target tokenizer's chat
     template and builds a per-token loss mask, truncated and padded to max_len.
  3. `prepare_dataset` does both once for a whole file (holding the unpadded token ids in
     memory, ~5 bytes a token) and stores the result as a tensorflow-datasets dataset in
     array_record files (no TensorFlow needed), in a directory keyed by (data file
     content, tokenizer, max_len, val_fraction). A split with no example is not written.
  4. `TrainBatches` reads it back with grain: sharded per process, shuffled by seed
     (differently each epoch), batched, repeated, with an exactly resumable position.

Roles. user: "human", "user". assistant: "gpt", "assistant", and the ShareGPT variants
"chatgpt", "bing", "bard", "model" (replies of other chat assistants, still the answer
side of the dialogue). system: "system". Anything else (e.g. "tool", "function") makes
the record bad ("unknown_role"): we do not guess how a template would render it.

Loss mask. loss_mask[t] = 1 iff token t is part of an assistant reply: the reply's content
tokens plus the end-of-turn special token that closes it (<|eot_id|>, <|im_end|>, </s>,
...), as EAGLE does, so the draft learns to predict the end of an answer. Template glue
(BOS, role headers, "\n\n" after a header) and system/user tokens are 0. A trainer that
predicts token t from position t-1 uses loss_mask[1:] as the target mask.

Finding the assistant tokens. The conversation is rendered to text once; for assistant
turn i the template's own prompt for messages[:i] (add_generation_prompt=True) is rendered
too, and, when it is a prefix of the full text (true for the usual templates), the reply is
searched after it, so reply text that also occurs in a header cannot be mistaken for it.
The text is tokenized with offsets (add_special_tokens=False, as apply_chat_template does),
and a token is masked when its character span overlaps a reply's span. Templates that
rewrite replies beyond trimming whitespace (e.g. dropping reasoning blocks) make the
record a "render_error" instead of silently mis-masking it.

Bad records never stop a run and never vanish: each is counted by kind with the first few
line numbers (JSONL: the line; JSON list: the line on which the record starts). Kinds:
invalid_json, malformed (not an object / no turn list / turn without role or text),
empty (no turns), unknown_role, non_text (a value that is not a string), no_assistant
(no non-blank assistant reply), render_error (the chat template raised, or a reply could
not be located in its output), over_long (every assistant token lies beyond max_len).
A file that is neither a JSON list nor JSONL (e.g. a truncated JSON list) raises DataError.

Not done: packing several conversations into one row (it would need per-document
attention masks and position ids); rows are one conversation, right-padded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, NamedTuple, Sequence

import numpy as np

from fspad_jax.hot_vocab import TOKEN_COUNTS_FILE, count_assistant_tokens

logger = logging.getLogger(__name__)

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard", "model"})
SYSTEM_ROLES = frozenset({"system"})

BAD_KINDS = ("invalid_json", "malformed", "empty", "unknown_role", "non_text", "no_assistant",
             "render_error", "over_long")
MAX_EXAMPLE_LINES = 5  # line numbers kept per bad kind

DATASET_VERSION = "1.0.0"
# Bump when tokenization / masking / splitting changes, so old prepared dirs are not reused.
# 2: token_counts.npy (hot_vocab) is written with the data. 3: examples are keyed, and
# records without an id split, by record index instead of line (unique in one-line lists).
PIPELINE_VERSION = 3
REPORT_FILE = "prepare_report.json"
SPLITS = ("train", "validation")


class DataError(ValueError):
  """The data file as a whole is unusable (unreadable, or not one good record)."""


@dataclasses.dataclass
class Conversation:
  """One parsed record; roles normalized to "system" / "user" / "assistant"."""

  messages: list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
  line: int  # 1-based line of the record in the data file (for messages)
  record_id: str | None = None
  # 0-based position of the record among all records of the file (bad ones included):
  # unique, unlike the line (a JSON list written without indentation is one line).
  index: int = 0

  @property
  def split_key(self) -> str:
    """What the train/validation assignment hashes: the record id, else its index."""
    return f"id:{self.record_id}" if self.record_id is not None else f"record:{self.index}"


class Example(NamedTuple):
  """One tokenized conversation, truncated and right-padded to max_len."""

  input_ids: np.ndarray  # [max_len] int32
  loss_mask: np.ndarray  # [max_len] int32, 1 on assistant tokens
  length: int  # number of real (non-pad) tokens
  truncated: bool


class Rejected(NamedTuple):
  """Why a record was dropped: one of BAD_KINDS plus a human-readable detail."""

  kind: str
  detail: str = ""


@dataclasses.dataclass
class BadRecordReport:
  """Counts of dropped records by kind, with the first few line numbers of each."""

  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  details: dict[str, str] = dataclasses.field(default_factory=dict)  # first detail per kind
  # 1-based record numbers beside the lines (the line alone is ambiguous in a JSON list
  # written on one line).
  records: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  def add(self, kind: str, line: int, detail: str = "", index: int | None = None):
    if kind not in BAD_KINDS:
      raise ValueError(f"unknown bad-record kind {kind!r}")
    self.counts[kind] = self.counts.get(kind, 0) + 1
    examples = self.lines.setdefault(kind, [])
    if len(examples) < MAX_EXAMPLE_LINES:
      examples.append(line)
      if index is not None:
        self.records.setdefault(kind, []).append(index + 1)
    if detail and kind not in self.details:
      where = f"line {line}" + (f" (record {index + 1})" if index is not None else "")
      self.details[kind] = f"{where}: {detail}"

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict[str, dict[str, Any]]:
    """{kind: {"count": n, "lines": [first line numbers], "detail": first message}}."""
    out = {}
    for kind in BAD_KINDS:
      if kind in self.counts:
        out[kind] = {"count": self.counts[kind], "lines": list(self.lines[kind])}
        if kind in self.records:
          out[kind]["records"] = list(self.records[kind])
        if kind in self.details:
          out[kind]["detail"] = self.details[kind]
    return out

  @classmethod
  def from_dict(cls, d: dict) -> BadRecordReport:
    report = cls()
    for kind, entry in d.items():
      report.counts[kind] = entry["count"]
      report.lines[kind] = list(entry["lines"])
      if "records" in entry:
        report.records[kind] = list(entry["records"])
      if "detail" in entry:
        report.details[kind] = entry["detail"]
    return report

  def log(self, source: str):
    if not self.counts:
      logger.info("%s: no bad records", source)
    for kind, entry in self.to_dict().items():
      records = f", records {entry['records']}" if "records" in entry else ""
      logger.warning("%s: dropped %d %s record(s), e.g. lines %s%s%s", source, entry["count"],
                     kind, entry["lines"], records,
                     f" ({entry['detail']})" if "detail" in entry else "")


# ----------------------------------------------------------------------------- parsing


def _iter_jsonl(raw: bytes):
  """Yields (line_number, record | Rejected) for each non-blank line."""
  for line_number, line in enumerate(raw.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      yield line_number, json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      yield line_number, Rejected("invalid_json", str(e))


_SPACE_RE = re.compile(r"\s*")


def _iter_json_list(text: str, path: str):
  """Yields (line_number, record) for the elements of a JSON list, element by element."""
  decoder = json.JSONDecoder()
  pos = _SPACE_RE.match(text, text.index("[") + 1).end()
  line, line_pos = 1, 0
  if pos < len(text) and text[pos] == "]":
    return
  while True:
    try:
      record, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: invalid JSON list element ({e.msg}); a JSON list "
                      "cannot be resynchronized after a broken element") from None
    line += text.count("\n", line_pos, pos)
    line_pos = pos
    yield line, record
    pos = _SPACE_RE.match(text, end).end()
    if pos < len(text) and text[pos] == "]":
      return
    if pos >= len(text) or text[pos] != ",":
      line += text.count("\n", line_pos, pos)
      raise DataError(f"{path}:{line}: expected ',' or ']' in the JSON list (truncated file?)")
    pos = _SPACE_RE.match(text, pos + 1).end()


def normalize_role(role: str) -> str | None:
  """A turn's role as "user" / "assistant" / "system" (see Roles above); None when unknown.
  decode.py applies the same rule to its `messages`."""
  key = role.strip().lower()
  for name, names in (("user", USER_ROLES), ("assistant", ASSISTANT_ROLES),
                      ("system", SYSTEM_ROLES)):
    if key in names:
      return name
  return None


def _parse_record(record: Any, line: int, index: int = 0, require_assistant: bool = True
                  ) -> Conversation | Rejected:
  """A decoded JSON value -> Conversation, or the reason it is bad."""
  if not isinstance(record, dict):
    return Rejected("malformed", f"record is a {type(record).__name__}, not an object")
  turns = record.get("conversations", record.get("messages"))
  if turns is None:
    return Rejected("malformed", "no 'conversations' or 'messages' key")
  if not isinstance(turns, list):
    return Rejected("malformed", "the turn list is not a list")
  if not turns:
    return Rejected("empty", "no turns")
  messages = []
  for i, turn in enumerate(turns):
    if not isinstance(turn, dict):
      return Rejected("malformed", f"turn {i} is not an object")
    role = turn.get("from", turn.get("role"))
    if "value" in turn:
      content = turn["value"]
    elif "content" in turn:
      content = turn["content"]
    else:
      return Rejected("malformed", f"turn {i} has no 'value' or 'content'")
    if not isinstance(role, str):
      return Rejected("unknown_role", f"turn {i} has no role")
    known = normalize_role(role)
    if known is None:
      return Rejected("unknown_role", f"turn {i} has role {role!r}")
    role = known
    if not isinstance(content, str):
      return Rejected("non_text", f"turn {i} value is a {type(content).__name__}")
    messages.append({"role": role, "content": content})
  if require_assistant and not any(m["role"] == "assistant" and m["content"].strip()
                                   for m in messages):
    return Rejected("no_assistant", "no non-blank assistant turn")
  record_id = record.get("id")
  record_id = str(record_id) if isinstance(record_id, (str, int)) else None
  return Conversation(messages=messages, line=line, record_id=record_id, index=index)


def load_conversations(path: str, require_assistant: bool = True
                       ) -> tuple[list[Conversation], BadRecordReport]:
  """Parses a JSON-list or JSONL ShareGPT file; bad records are counted, not raised
  (require_assistant=False keeps records without an assistant reply, e.g. prompts to
  answer).

  The format is sniffed from the content: a file whose first non-blank character is '['
  is a JSON list, anything else is JSONL (one record per line, blank lines skipped)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
    raw = raw[3:]
  if raw.lstrip()[:1] == b"[":
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 ({e})") from None
    records = _iter_json_list(text, path)
  else:
    records = _iter_jsonl(raw)
  conversations, report = [], BadRecordReport()
  for index, (line, record) in enumerate(records):
    parsed = record if isinstance(record, Rejected) else _parse_record(
        record, line, index, require_assistant)
    if isinstance(parsed, Rejected):
      report.add(parsed.kind, line, parsed.detail, index)
    else:
      conversations.append(parsed)
  return conversations, report


# ----------------------------------------------------------------------------- tokenizing


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def _assistant_char_spans(tokenizer, messages, text: str) -> list[tuple[int, int]]:
  """[start, end) character spans of the (stripped) assistant replies inside `text`."""
  spans, cursor = [], 0
  for i, message in enumerate(messages):
    content = message["content"].strip()
    if not content:
      continue
    start = cursor
    is_assistant = message["role"] == "assistant"
    if is_assistant and i > 0:
      prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
      if text.startswith(prompt) and len(prompt) >= cursor:
        start = len(prompt)
    pos = text.find(content, start)
    if pos < 0:
      if is_assistant:
        raise LookupError(f"assistant turn {i} does not appear verbatim in the rendered "
                          "chat template")
      continue  # a system/user text the template rewrote: nothing to mask, keep the cursor
    cursor = pos + len(content)
    if is_assistant:
      spans.append((pos, cursor))
  return spans


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer) -> frozenset[int]:
  """Ids of special tokens: named ones plus added tokens flagged special (e.g. <|eot_id|>)."""
  ids = set(tokenizer.all_special_ids)
  for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
    if getattr(added, "special", False):
      ids.add(int(token_id))
  return frozenset(ids)


def pad_token_id(tokenizer) -> int:
  """The id written into padding (masked out everywhere, so any valid id works)."""
  for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if isinstance(token_id, int):
      return token_id
  return 0


def tokenize_conversation(tokenizer, conv: Conversation, max_len: int) -> Example | Rejected:
  """Renders `conv` with the chat template; ids + assistant loss mask, padded to max_len."""
  try:
    text = _render(tokenizer, conv.messages, add_generation_prompt=False)
    spans = _assistant_char_spans(tokenizer, conv.messages, text)
  except Exception as e:  # noqa: BLE001  (templates raise anything: jinja errors, asserts)
    return Rejected("render_error", f"{type(e).__name__}: {e}")
  encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(encoding["input_ids"], np.int32)  # [n]
  offsets = np.asarray(encoding["offset_mapping"], np.int64).reshape(-1, 2)  # [n, 2]
  starts, ends = offsets[:, 0], offsets[:, 1]
  special = _special_ids(tokenizer)
  mask = np.zeros(len(ids), np.int32)  # [n]
  for span_start, span_end in spans:
    mask[(starts < span_end) & (ends > span_start)] = 1
    # The end-of-turn token: first token after the reply that is not bare whitespace.
    for j in np.flatnonzero(starts >= span_end):
      if int(ids[j]) in special:
        mask[j] = 1
        break
      if text[starts[j]:ends[j]].strip():
        break
  if not mask.any():
    return Rejected("render_error", "no token overlaps an assistant reply")
  truncated = len(ids) > max_len
  ids, mask = ids[:max_len], mask[:max_len]
  if not mask.any():
    return Rejected("over_long", f"first assistant token beyond max_len={max_len}")
  length = len(ids)
  input_ids = np.full(max_len, pad_token_id(tokenizer), np.int32)  # [max_len]
  input_ids[:length] = ids
  loss_mask = np.zeros(max_len, np.int32)  # [max_len]
  loss_mask[:length] = mask
  return Example(input_ids, loss_mask, length, truncated)


# ----------------------------------------------------------------------------- preparing


def split_of(conv: Conversation, val_fraction: float) -> str:
  """"train" or "validation", by a hash of the record id (else line): stable across runs."""
  digest = hashlib.sha256(conv.split_key.encode("utf-8")).digest()
  return "validation" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes, computed once per (path, size, mtime) in a process."""
  st = os.stat(path)
  return _cached_sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # cache key only
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of everything about the tokenizer that changes the prepared data."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  state = {
      "vocab": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
      "chat_template": tokenizer.chat_template,
      "special": tokenizer.special_tokens_map,
      "pad": pad_token_id(tokenizer),
  }
  return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


class _StoredExample(NamedTuple):
  """An example held in memory between tokenizing and writing: unpadded, mask as uint8."""

  index: int  # the record's index in the file: the tfds key (unique, unlike its line)
  input_ids: np.ndarray  # [length] int32
  loss_mask: np.ndarray  # [length] uint8


PARALLEL_MIN_CONVERSATIONS = 4096  # below this, worker start-up costs more than it saves


def resolve_num_workers(num_workers: int, num_conversations: int) -> int:
  """Tokenizing processes: num_workers if > 0; 0 = all CPU cores (at most 16) for files of
  >= PARALLEL_MIN_CONVERSATIONS conversations, else 1 (in-process)."""
  if num_workers > 0:
    return num_workers
  if num_conversations < PARALLEL_MIN_CONVERSATIONS:
    return 1
  return max(1, min(os.cpu_count() or 1, 16))


def _compact(example: Example | Rejected) -> Example | Rejected:
  """The example without its padding, mask as uint8: what _tokenize_all keeps (and what
  workers send back)."""
  if isinstance(example, Rejected):
    return example
  n = example.length
  return Example(example.input_ids[:n].copy(), example.loss_mask[:n].astype(np.uint8), n,
                 example.truncated)


def _tokenize_worker(task_path: str, result_path: str) -> None:
  """Worker process body (`python -m fspad_jax.data TASK RESULT`): tokenizes the pickled
  conversations of TASK and pickles the compact results to RESULT."""
  import pickle
  from fspad_jax.hf_checkpoint import load_tokenizer
  with open(task_path, "rb") as f:
    (tokenizer_dir, chat_template), max_len, conversations = pickle.load(f)
  tokenizer = load_tokenizer(tokenizer_dir, chat_template)
  results = [_compact(tokenize_conversation(tokenizer, c, max_len)) for c in conversations]
  with open(result_path + ".tmp", "wb") as f:
    pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)
  os.replace(result_path + ".tmp", result_path)


def _tokenize_in_workers(conversations: Sequence[Conversation], max_len: int,
                         num_workers: int, tokenizer_source: tuple[str, str]) -> list | None:
  """tokenize_conversation for every conversation, in order, split over `num_workers` fresh
  Python processes (`python -m fspad_jax.data`; plain subprocesses, so a caller's script is
  never re-imported, and JAX's threads are never forked). None if a worker failed."""
  import pickle
  import subprocess
  import sys
  import tempfile
  bounds = np.linspace(0, len(conversations), num_workers + 1).astype(int)
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
      JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
  with tempfile.TemporaryDirectory(prefix="fspad-tokenize-") as tmp:
    procs = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      task, result, log = (os.path.join(tmp, f"{name}{k}") for name in ("task", "result", "log"))
      with open(task, "wb") as f:
        pickle.dump((tokenizer_source, max_len, list(conversations[lo:hi])), f,
                    protocol=pickle.HIGHEST_PROTOCOL)
      try:
        with open(log, "wb") as err:
          procs.append((subprocess.Popen([sys.executable, "-m", "fspad_jax.data", task,
                                          result], env=env, stdout=err,
                                         stderr=subprocess.STDOUT), result, log))
      except OSError as e:  # no usable interpreter to start (embedded Python, limits)
        for other, _, _ in procs:
          other.kill()
        logger.warning("could not start a tokenizing worker (%s); tokenizing in-process", e)
        return None
    outputs = []
    for proc, result, log in procs:
      if proc.wait() != 0 or not os.path.exists(result):
        with open(log, errors="replace") as f:
          tail = f.read()[-1500:]
        for other, _, _ in procs:
          other.kill()
        logger.warning("a tokenizing worker failed (exit %s); tokenizing in-process instead. "
                       "Its output ends:\n%s", proc.returncode, tail)
        return None
      with open(result, "rb") as f:
        outputs.extend(pickle.load(f))
  return outputs


def _tokenized(tokenizer, conversations: Sequence[Conversation], max_len: int,
               num_workers: int, tokenizer_source: tuple[str, str]):
  """tokenize_conversation's result for every conversation, in order, compacted (_compact);
  with several workers, each loads the tokenizer from tokenizer_source = (directory,
  chat_template). The results are the same either way."""
  if num_workers > 1:
    outputs = _tokenize_in_workers(conversations, max_len, num_workers, tokenizer_source)
    if outputs is not None:
      return outputs
  return (_compact(tokenize_conversation(tokenizer, conv, max_len)) for conv in conversations)


def _tokenize_all(tokenizer, conversations: Sequence[Conversation], max_len: int,
                  val_fraction: float, report: BadRecordReport, num_workers: int,
                  tokenizer_source: tuple[str, str]
                  ) -> tuple[dict[str, list[_StoredExample]], int]:
  """Tokenizes every conversation into its split; returns (examples by split, #truncated)."""
  examples = {split: [] for split in SPLITS}
  truncated = 0
  results = _tokenized(tokenizer, conversations, max_len, num_workers, tokenizer_source)
  for conv, example in zip(conversations, results, strict=True):
    if isinstance(example, Rejected):
      report.add(example.kind, conv.line, example.detail, conv.index)
      continue
    truncated += int(example.truncated)
    examples[split_of(conv, val_fraction)].append(
        _StoredExample(conv.index, example.input_ids, example.loss_mask))
  return examples, truncated


@functools.cache
def _builder_class():
  """The tfds builder, defined on first use so tensorflow_datasets is imported lazily."""
  import tensorflow_datasets as tfds

  class FspadConversations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tokenized conversations; one builder instance prepares one (file, tokenizer, len)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    # No source code directory: tfds would look for a checksums file beside it (and, for a
    # class inside a package, needs the `importlib_resources` backport to do so).
    code_path = None

    # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared"; nothing is downloaded here, and prepare_dataset logs its own summary.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

    def __init__(self, *, examples: dict[str, list[_StoredExample]], max_len: int,
                 pad_id: int, **kwargs):
      self._examples = examples
      self._max_len = max_len
      self._pad_id = pad_id
      super().__init__(**kwargs)

    def _info(self):
      int_row = tfds.features.Tensor(shape=(self._max_len,), dtype=np.int32)
      return tfds.core.DatasetInfo(
          builder=self,
          description="ShareGPT conversations tokenized with a chat template (fspad_jax).",
          features=tfds.features.FeaturesDict({
              "input_ids": int_row, "loss_mask": int_row,
              "length": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager  # tfds cannot write a split without examples: leave those out
      return {split: self._generate_examples(split) for split, examples in
              self._examples.items() if examples}

    def _generate_examples(self, split):
      for stored in self._examples[split]:
        length = len(stored.input_ids)
        input_ids = np.full(self._max_len, self._pad_id, np.int32)  # [max_len]
        input_ids[:length] = stored.input_ids
        loss_mask = np.zeros(self._max_len, np.int32)  # [max_len]
        loss_mask[:length] = stored.loss_mask
        yield stored.index, {"input_ids": input_ids, "loss_mask": loss_mask,
                            "length": np.int32(length)}

  return FspadConversations


@contextlib.contextmanager
def _tfds_bars_off():
  """tensorflow-datasets' progress bars disabled inside the block (restored after)."""
  from tensorflow_datasets.core.utils import tqdm_utils
  previous = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  try:
    yield
  finally:
    tqdm_utils.display_progress_bar(previous)


def root_cause(error: BaseException) -> str:
  """"Type: message" of the innermost exception of a chain (__cause__ / __context__).

  tensorflow-datasets re-raises failures wrapped, and may fail again while describing them
  (e.g. importing TensorFlow to print a feature spec), so the last message is rarely the
  cause; a message that cannot be turned into text falls back to the type name."""
  seen = set()
  while id(error) not in seen:
    seen.add(id(error))
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  try:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
  except Exception:  # noqa: BLE001
    message = ""
  return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _main_reason(bad: BadRecordReport) -> str:
  """": most (N) dropped as KIND (first detail)" for the commonest bad kind, or ""."""
  if not bad.counts:
    return ""
  kind = max(bad.counts, key=bad.counts.get)
  detail = bad.details.get(kind)
  return (f": {bad.counts[kind]} dropped as {kind}" + (f" ({detail})" if detail else "")
          + (f", {bad.total - bad.counts[kind]} for other reasons"
             if bad.total > bad.counts[kind] else ""))


BUILDER_NAME = "fspad_conversations"  # tfds' snake_case of the class name


def prepared_dir_for(data_path: str, tokenizer, max_len: int, out_dir: str,
                     val_fraction: float) -> str:
  """The builder directory that a preparation with these inputs writes (and reuses)."""
  key = json.dumps({"pipeline": PIPELINE_VERSION, "data": file_sha256(data_path),
                    "tokenizer": tokenizer_fingerprint(tokenizer), "max_len": max_len,
                    "val_fraction": val_fraction}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(data_path))[0]
  return os.path.join(out_dir, f"{stem}-len{max_len}-{digest}", BUILDER_NAME, DATASET_VERSION)


def read_report(builder_dir: str) -> dict:
  with open(os.path.join(builder_dir, REPORT_FILE)) as f:
    return json.load(f)


def _check_template_renders(tokenizer, tokenizer_dir: str) -> None:
  """A missing package (transformers renders chat templates with jinja2) fails here, in one
  line, instead of as a render error of every record."""
  try:
    _render(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
  except ImportError as e:
    raise DataError(f"cannot render the chat template of {tokenizer_dir}: {e}") from None
  except Exception:  # noqa: BLE001 - template-specific refusals are judged per record
    pass


def prepare_dataset(data_path: str, tokenizer_dir: str, max_len: int, out_dir: str,
                    val_fraction: float = 0.02, chat_template: str = "",
                    num_workers: int = 0) -> tuple[str, dict]:
  """Tokenizes a ShareGPT file once into array_record files; returns (builder_dir, report).

  The report: {"records": conversations parsed, "train"/"validation": examples written,
  "truncated": examples cut to max_len, "bad": {kind: {"count", "lines", "detail"}},
  "reused": whether an existing preparation was returned}. It is logged and stored as
  prepare_report.json beside the data, with token_counts.npy (assistant-token frequencies of
  the training split, fspad_jax.hot_vocab). Run it on one process; readers then open
  builder_dir from any process. chat_template: see hf_checkpoint.load_tokenizer.
  num_workers: tokenizing processes (resolve_num_workers; 0 = automatic); the prepared data
  does not depend on it."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  from fspad_jax.hf_checkpoint import load_tokenizer
  tokenizer = load_tokenizer(tokenizer_dir, chat_template)
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(f"the tokenizer in {tokenizer_dir} has no chat template: set "
                    "target.chat_template (e.g. 'vicuna_v1.1', a .jinja file or a template)")
  _check_template_renders(tokenizer, tokenizer_dir)
  builder_dir = prepared_dir_for(data_path, tokenizer, max_len, out_dir, val_fraction)
  if os.path.exists(os.path.join(builder_dir, REPORT_FILE)):
    report = {**read_report(builder_dir), "reused": True}
    logger.info("reusing prepared data %s (%d train, %d validation)", builder_dir,
                report["train"], report["validation"])
    return builder_dir, report
  if os.path.exists(builder_dir):  # a preparation that died before writing its report
    shutil.rmtree(builder_dir)

  conversations, bad = load_conversations(data_path)
  num_records = len(conversations) + bad.total
  workers = resolve_num_workers(num_workers, len(conversations))
  logger.info("tokenizing %d conversations from %s with %d process(es)", len(conversations),
              data_path, workers)
  examples, truncated = _tokenize_all(tokenizer, conversations, max_len, val_fraction, bad,
                                      workers, (tokenizer_dir, chat_template))
  del conversations
  report = {"records": num_records, **{split: len(examples[split]) for split in SPLITS},
            "truncated": truncated, "bad": bad.to_dict()}
  if not examples["train"]:
    bad.log(data_path)
    raise DataError(f"{data_path}: no usable training conversation of {num_records} records"
                    f"{_main_reason(bad)}")
  if not examples["validation"]:
    logger.warning("%s: the validation split is empty (val_fraction=%s); it is not written",
                   data_path, val_fraction)
  data_root = os.path.dirname(os.path.dirname(builder_dir))
  builder = _builder_class()(examples=examples, max_len=max_len,
                             pad_id=pad_token_id(tokenizer), data_dir=data_root,
                             file_format="array_record")
  try:
    with _tfds_bars_off():  # nested bars that leave escape codes in logs
      builder.download_and_prepare(download_dir=os.path.join(data_root, "downloads"))
  except Exception as e:  # noqa: BLE001 - tfds wraps (and re-describes) whatever failed
    raise DataError(f"{data_path}: tensorflow-datasets could not write {builder_dir}: "
                    f"{root_cause(e)}") from e
  # Assistant-token frequencies of the training split, for a hot draft vocabulary.
  counts = count_assistant_tokens(examples["train"], len(tokenizer))
  np.save(os.path.join(builder_dir, TOKEN_COUNTS_FILE), counts)
  tmp_path = os.path.join(builder_dir, REPORT_FILE + ".tmp")
  with open(tmp_path, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp_path, os.path.join(builder_dir, REPORT_FILE))
  logger.info("prepared %s: %d train, %d validation, %d truncated, %d bad of %d records",
              builder_dir, report["train"], report["validation"], report["truncated"],
              bad.total, report["records"])
  bad.log(data_path)
  return builder_dir, {**report, "reused": False}


# ----------------------------------------------------------------------------- reading


def _stack_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  """Stacks decoded examples into a batch, adding the attention (valid-token) mask."""
  input_ids = np.stack([e["input_ids"] for e in examples]).astype(np.int32)  # [batch, max_len]
  loss_mask = np.stack([e["loss_mask"] for e in examples]).astype(np.int32)  # [batch, max_len]
  length = np.asarray([e["length"] for e in examples], np.int32)  # [batch]
  positions = np.arange(input_ids.shape[1], dtype=np.int32)  # [max_len]
  attention_mask = (positions[None, :] < length[:, None]).astype(np.int32)  # [batch, max_len]
  return {"input_ids": input_ids, "loss_mask": loss_mask, "length": length,
          "attention_mask": attention_mask}


class TrainBatches:
  """Batches of one split of a prepared dataset, for this process's shard.

  Pipeline (grain MapDataset): source[shard_index::shard_count] -> shuffle(seed) (reshuffled
  each epoch) -> repeat(num_epochs; None = forever) -> batch(batch_size) -> prefetch threads.
  Each process gets a disjoint slice; together the slices cover the split. Batches are dicts
  of numpy arrays: input_ids, loss_mask, attention_mask [batch, max_len] int32 and
  length [batch] int32. get_state() is a small JSON-able dict; set_state() on a fresh
  instance with the same arguments continues with exactly the batches that would have come.
  For evaluation use shuffle=False, num_epochs=1, drop_remainder=False."""

  def __init__(self, prepared_dir: str, split: str = "train", batch_size: int = 8,
               seed: int = 0, shard_index: int | None = None, shard_count: int | None = None,
               *, shuffle: bool = True, num_epochs: int | None = None,
               drop_remainder: bool = True, num_threads: int = 2, prefetch_batches: int = 4):
    import grain
    import tensorflow_datasets as tfds
    if (shard_index is None) != (shard_count is None):
      raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
      import jax
      shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    builder = tfds.builder_from_directory(prepared_dir)
    if split not in builder.info.splits:
      raise ValueError(f"{prepared_dir} has no {split!r} split (it had no example); "
                       f"splits: {sorted(builder.info.splits)}")
    source = builder.as_data_source(split)
    shard = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(shard) == 0:
      raise ValueError(f"{prepared_dir} split {split!r} shard {shard_index}/{shard_count} "
                       "is empty")
    self.examples_per_epoch = len(shard)
    self.batch_size = batch_size
    self._config = {"split": split, "batch_size": batch_size, "seed": seed,
                    "shard": [shard_index, shard_count], "shuffle": shuffle,
                    "num_epochs": num_epochs, "drop_remainder": drop_remainder}
    dataset = shard.shuffle(seed) if shuffle else shard
    dataset = dataset.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder,
                                               batch_fn=_stack_examples)
    read_options = grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=prefetch_batches)
    self._iterator = iter(dataset.to_iter_dataset(read_options))

  @property
  def steps_per_epoch(self) -> int:
    """Full batches in one pass over this shard (batches may straddle epochs when repeating)."""
    return self.examples_per_epoch // self.batch_size

  @property
  def epoch(self) -> int:
    """The epoch that the next batch starts in."""
    return self._iterator.get_state()["next_index"] * self.batch_size // self.examples_per_epoch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {"next_batch": int(self._iterator.get_state()["next_index"]), **self._config}

  def set_state(self, state: dict):
    mismatched = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
    if mismatched:
      raise ValueError(f"iterator state is for another pipeline: {mismatched} (saved, current)")
    self._iterator.set_state({"next_index": int(state["next_batch"])})


if __name__ == "__main__":  # a tokenizing worker of prepare_dataset (_tokenize_in_workers)
  import sys
  from fspad_jax import data  # the importable module: pickled results name its classes
  data._tokenize_worker(sys.argv[1], sys.argv[2])
