"""Batch decoding jobs: JSONL prompts in, JSONL completions out, resumable.

The library behind `decode.py`, usable from a notebook:

  >>> config = get_config()  # e.g. configs/tiny.py, with config.target.path set
  >>> engine = DecodeEngine(config)  # loads the target once, keeps compiled functions
  >>> summary = run_decode(config, "prompts.jsonl", "out.jsonl", engine=engine)
  >>> engine.generate([[0, 17, 42], [0, 5]])  # or decode token ids directly

Each input line holds an `id` and exactly one of `prompt` (raw text), `messages` (a chat),
`turns` (user messages answered in sequence, MT-bench style) or `input_ids`. Prompts are
decoded in batches of a static shape: `decode.batch_size` rows (a short batch is filled with
copies of its first row, discarded), right-padded to a bucketed length (at least
`decode.min_prompt_bucket`), so that one compiled function serves every batch of a bucket.
Each output line is written whole, then flushed and fsync'ed; a rerun skips the ids already
written and drops a partial last line.

Decoding methods are looked up in `METHODS` by `decode.method`: "vanilla" (target only), and
"eagle" / "fspad", lossless tree speculative decoding (fspad_jax.speculative) with the draft
at `draft.path` (a train.py workdir, one step's Orbax checkpoint or an EAGLE-layout
directory; it must match the target's hidden size and vocabulary, and its kind the method)
and the tree `decode.tree_depth` (D), `decode.tree_top_k` (K), `decode.total_tokens`. With
`decode.cache_len` 0 the target cache leaves room for a tree (speculative.cache_len_for);
a smaller fixed cache ends rows early with finish_reason "cache_full".

Output records add `mean_accept_len` (tokens committed per target forward after the
prefill: the mean of accepted + 1 over its verify steps; null without any step),
`target_forwards` (verify steps + 1 for the prefill) and, for speculative methods,
`accept_lengths` (accepted draft tokens of each verify step). Vanilla records count one
forward per token: target_forwards = new_tokens and mean_accept_len 1.0. `turns` records
hold them per turn, and pooled over the turns at the top level.

`run_decode(..., compare_vanilla=True)` (decode.py --compare_vanilla) also decodes every
batch with vanilla decoding (a second engine sharing the loaded target weights) and reports
the speedup, the ratio of tokens/s, from warm calls only: both engines decode each batch
`decode.timing_repeats` times without compiling, alternating, and each batch contributes
the median time of each (_PairedTimer). Greedy runs also check that the outputs are identical
(`vanilla_match` per record, mismatches listed in the summary with the id, the first
differing position and, for `turns`, the turn; each later turn's prompt is built from the
speculative answers and decoded by both). Sampled runs report only the speed.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from fspad_jax import console
from fspad_jax.config import ConfigError
from fspad_jax.draft_source import METHOD_KINDS, load_draft_for_decode, load_draft_hot_ids
from fspad_jax.quant import check_weight_dtype, quantize_draft
from fspad_jax.generate import (FINISH_REASONS, GenerateOptions, GenerateOutput,
                                VanillaGenerator)
from fspad_jax.hf_checkpoint import CheckpointError, load_target, load_tokenizer, resolve_model_dir
from fspad_jax.sampling import SamplingParams
from fspad_jax.sharding import ShardingError, ShardingRules, make_mesh
from fspad_jax.speculative import (SpecOptions, SpecOutput, SpeculativeGenerator,
                                   cache_len_for)
from fspad_jax.tree import num_buffer_nodes

PROMPT_KEYS = ("prompt", "messages", "turns", "input_ids")
DTYPES = ("float32", "bfloat16", "float16")
MIN_BUCKET = 64  # smallest padded prompt length
CACHE_ROUND = 64  # derived cache lengths are multiples of this
MAX_REPORTED_PROBLEMS = 100  # malformed lines listed in the summary (all are counted)
TIMING_REPEATS = 3  # --compare_vanilla: interleaved warm calls per batch (median is used)


class DecodeError(ValueError):
  """A user error (config, input file, output file), as one line naming the culprit."""


# Errors that decode.py reports as one line instead of a traceback.
USER_ERRORS = (DecodeError, ConfigError, CheckpointError, ShardingError, FileNotFoundError)


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """The validated `decode` section of a config."""

  method: str
  sampling: SamplingParams
  max_new_tokens: int
  batch_size: int
  cache_len: int  # 0: derived per batch from the padded prompt length
  stop_token_ids: tuple[int, ...]  # extra stop ids, on top of the checkpoint's eos ids
  seed: int
  tree_depth: int = 6  # D (speculative methods)
  tree_top_k: int = 10  # K
  total_tokens: int = 60  # draft nodes verified per step
  min_prompt_bucket: int = MIN_BUCKET  # smallest padded prompt length (one compile per
  #                                      bucket: raise it to serve every prompt with one shape)
  timing_repeats: int = TIMING_REPEATS  # --compare_vanilla: warm timed calls per batch each

  @property
  def speculative(self) -> bool:
    return self.method in METHOD_KINDS

  def spec_options(self, options: GenerateOptions) -> SpecOptions:
    """The speculative counterpart of one batch's GenerateOptions."""
    return SpecOptions(max_new_tokens=options.max_new_tokens, sampling=options.sampling,
                       stop_token_ids=options.stop_token_ids, cache_len=options.cache_len,
                       depth=self.tree_depth, top_k=self.tree_top_k,
                       total_tokens=self.total_tokens)

  @property
  def tree_reserve(self) -> int:
    """Cache slots a speculative method needs beyond prompt + max_new_tokens (0: vanilla)."""
    if not self.speculative:
      return 0
    opts = self.spec_options(GenerateOptions(max_new_tokens=self.max_new_tokens))
    return cache_len_for(0, opts) - self.max_new_tokens

  def tree_dict(self) -> dict | None:
    if not self.speculative:
      return None
    return {"depth": self.tree_depth, "top_k": self.tree_top_k,
            "total_tokens": self.total_tokens}


_REQUIRED = object()


def _get(config, key: str, default=_REQUIRED):
  """config['a.b'] (or `default` when absent) with an error that names a missing key."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      if default is _REQUIRED:
        raise DecodeError(f"config key {key} is missing") from None
      return default
  return node


def _int(config, key: str, minimum: int, default=_REQUIRED) -> int:
  value = _get(config, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DecodeError(f"config key {key}={value!r}: expected an integer >= {minimum}")
  return int(value)


def _float(config, key: str, default=_REQUIRED) -> float:
  value = _get(config, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DecodeError(f"config key {key}={value!r}: expected a number")
  return float(value)


def decode_settings(config) -> DecodeSettings:
  """Validates config.decode; errors name the key. Optional keys: top_p (1.0), top_k (0),
  cache_len (0), stop_token_ids (()), seed (0), tree_depth (6), tree_top_k (10),
  total_tokens (60), min_prompt_bucket (64), timing_repeats (3)."""
  method = _get(config, "decode.method")
  if method not in METHODS:
    raise DecodeError(f"config key decode.method={method!r} is not supported "
                      f"(supported: {', '.join(sorted(METHODS))})")
  depth = _int(config, "decode.tree_depth", 1, 6)
  tree_k = _int(config, "decode.tree_top_k", 1, 10)
  total = _int(config, "decode.total_tokens", 1, 60)
  if method in METHOD_KINDS and total > num_buffer_nodes(tree_k, depth):
    raise DecodeError(f"config key decode.total_tokens={total} exceeds the "
                      f"{num_buffer_nodes(tree_k, depth)} nodes that decode.tree_depth={depth} "
                      f"and decode.tree_top_k={tree_k} draft")
  temperature = _float(config, "decode.temperature")
  top_p = _float(config, "decode.top_p", 1.0)
  top_k = _int(config, "decode.top_k", 0, 0)
  try:
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
  except ValueError as e:
    raise DecodeError(f"config keys decode.temperature/top_p/top_k: {e}") from None
  max_new = _int(config, "decode.max_new_tokens", 1)
  cache_len = _int(config, "decode.cache_len", 0, 0)
  if cache_len and cache_len <= max_new:
    raise DecodeError(f"config key decode.cache_len={cache_len} leaves no room for a prompt "
                      f"with decode.max_new_tokens={max_new} (use 0 to derive it)")
  stops = _get(config, "decode.stop_token_ids", ())
  if isinstance(stops, (int, np.integer)) and not isinstance(stops, bool):
    stops = (stops,)
  if (not isinstance(stops, Sequence) or isinstance(stops, str)
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
             for s in stops)):
    raise DecodeError(f"config key decode.stop_token_ids={stops!r}: expected a list of "
                      f"non-negative token ids")
  return DecodeSettings(
      method=method, sampling=sampling, max_new_tokens=max_new,
      batch_size=_int(config, "decode.batch_size", 1), cache_len=cache_len,
      stop_token_ids=tuple(int(s) for s in stops), seed=_int(config, "decode.seed", 0, 0),
      tree_depth=depth, tree_top_k=tree_k, total_tokens=total,
      min_prompt_bucket=_int(config, "decode.min_prompt_bucket", 1, MIN_BUCKET),
      timing_repeats=_int(config, "decode.timing_repeats", 1, TIMING_REPEATS))


def resolve_target_path(path: str) -> str:
  """target.path as a local directory: a directory, or a repo id in the local HF cache."""
  try:
    return resolve_model_dir(path, "target.path")
  except ConfigError as e:
    raise DecodeError(str(e)) from None


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
  """Smallest length >= n of the form 2^k or 3 * 2^k (at least `minimum`): few shapes,
  at most 1/3 of a padded prompt wasted."""
  n = max(int(n), minimum)
  b = 1
  while b < n:
    if b >= 2 and b * 3 // 2 >= n:
      return b * 3 // 2
    b *= 2
  return b


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# --------------------------------------------------------------------------- methods


# (engine, graphdef, params) -> fn(prompt [batch, seq], lengths [batch], options, seed)
#   -> GenerateOutput or SpecOutput (numpy). Speculative methods read their extra config
# sections (`draft`) from engine.config.
MethodBuilder = Callable[..., Callable[[np.ndarray, np.ndarray, GenerateOptions, int],
                                       GenerateOutput | SpecOutput]]


def _build_vanilla(engine: "DecodeEngine", graphdef, params):
  return VanillaGenerator(graphdef, params, engine.mesh, engine.rules)


class _Speculative:
  """A SpeculativeGenerator called with GenerateOptions (the tree comes from settings)."""

  def __init__(self, generator: SpeculativeGenerator, settings: DecodeSettings):
    self.generator, self.settings = generator, settings

  def __call__(self, prompt, lengths, options: GenerateOptions, seed: int = 0) -> SpecOutput:
    return self.generator(prompt, lengths, self.settings.spec_options(options), seed)


def _build_speculative(engine: "DecodeEngine", graphdef, params):
  """Loads draft.path (refused unless it fits the target and the method)."""
  method = engine.settings.method
  path = _get(engine.config, "draft.path", "")
  if not path:
    raise DecodeError(f"config key draft.path is not set: decode.method={method!r} needs a "
                      f"draft (a train.py workdir, a checkpoint step or an EAGLE-layout "
                      f"directory)")
  cfg, draft_graphdef, draft_params = load_draft_for_decode(
      path, engine.cfg, method, engine.mesh, engine.rules)
  hot_ids = load_draft_hot_ids(path, cfg, engine.cfg)
  weight_dtype = check_weight_dtype(_get(engine.config, "draft.weight_dtype", ""))
  if weight_dtype == "int8":
    draft_graphdef, draft_params = quantize_draft(draft_graphdef, draft_params, engine.mesh)
  engine.draft_info = {"path": os.path.abspath(path), "kind": cfg.kind, "dtype": cfg.dtype,
                       "weight_dtype": weight_dtype or cfg.dtype,
                       "vocab_size": cfg.hot_vocab_size or engine.cfg.vocab_size}
  generator = SpeculativeGenerator(graphdef, params, draft_graphdef, draft_params,
                                   engine.mesh, engine.rules, hot_ids=hot_ids,
                                   weight_dtype=weight_dtype)
  return _Speculative(generator, engine.settings)


METHODS: dict[str, MethodBuilder] = {
    "vanilla": _build_vanilla, "eagle": _build_speculative, "fspad": _build_speculative}


# --------------------------------------------------------------------------- engine


@dataclasses.dataclass
class Completion:
  """One decoded prompt."""

  output_ids: list[int]  # generated tokens, including the stop token when one was generated
  finish_reason: str  # "stop" | "length" | "cache_full"
  prompt_tokens: int
  decode_time_s: float  # wall time of the batch call that decoded it (shared by its rows)
  accept_lengths: list[int] | None = None  # speculative: accepted draft tokens per step

  @property
  def new_tokens(self) -> int:
    return len(self.output_ids)

  @property
  def steps(self) -> int:
    """Target forwards after the prefill (verify steps; vanilla: one per later token)."""
    if self.accept_lengths is None:
      return max(self.new_tokens - 1, 0)
    return len(self.accept_lengths)

  @property
  def committed(self) -> int:
    """Tokens those steps committed (accepted + 1 each; stop/length may cut the last)."""
    if self.accept_lengths is None:
      return self.steps
    return sum(self.accept_lengths) + len(self.accept_lengths)

  @property
  def target_forwards(self) -> int:
    return self.steps + 1


def default_stop_token_ids(model_dir: str, eos_ids: Sequence[int], tokenizer) -> set[int]:
  """eos ids from config.json, generation_config.json (if present) and the tokenizer."""
  ids = set(int(i) for i in eos_ids)
  path = os.path.join(model_dir, "generation_config.json")
  if os.path.isfile(path):
    try:
      with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
      raise DecodeError(f"{path}: not a JSON object ({e})") from None
    ids.update(int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return ids


class DecodeEngine:
  """A loaded target + tokenizer (+ draft) + compiled decoding method; decodes token-id
  prompts.

  Built from a config with `target`, `mesh` and `decode` sections (and `draft` for
  eagle/fspad). Reuse one engine across `run_decode` calls to keep the weights and the
  compiled functions."""

  def __init__(self, config):
    self.config = config
    self.settings = decode_settings(config)
    self.model_dir = resolve_target_path(_get(config, "target.path"))
    dtype = _get(config, "target.dtype")
    if dtype not in DTYPES:
      raise DecodeError(f"config key target.dtype={dtype!r}: expected one of {DTYPES}")
    shape = _get(config, "mesh.shape", (1, 1, -1))
    try:
      self.mesh = make_mesh(tuple(shape))
    except (ShardingError, TypeError, ValueError) as e:
      raise DecodeError(f"config key mesh.shape={shape!r}: {e}") from None
    self.rules = ShardingRules()
    self.cfg, self.graphdef, self.params = load_target(self.model_dir, self.mesh, self.rules,
                                                       dtype)
    try:
      self.tokenizer = load_tokenizer(self.model_dir, _get(config, "target.chat_template", ""))
      self.tokenizer_error = None
    except CheckpointError as e:  # token-id inputs still work
      self.tokenizer, self.tokenizer_error = None, str(e)
    vocab = self.cfg.vocab_size
    bad = [i for i in self.settings.stop_token_ids if i >= vocab]
    if bad:
      raise DecodeError(f"config key decode.stop_token_ids: {bad} out of the target's "
                        f"vocabulary (size {vocab})")
    stops = default_stop_token_ids(self.model_dir, self.cfg.eos_token_ids, self.tokenizer)
    self.stop_token_ids = tuple(sorted(stops | set(self.settings.stop_token_ids)))
    self.draft_info: dict | None = None  # speculative: {path, kind, dtype} of the draft
    self._vanilla: DecodeEngine | None = None
    self._init_method()

  def _init_method(self):
    s = self.settings
    limit = s.cache_len or self.cfg.max_position_embeddings
    # Longest prompt that fits; a derived cache also leaves room for a draft tree.
    self.max_prompt_len = limit - s.max_new_tokens - (0 if s.cache_len else s.tree_reserve)
    if self.max_prompt_len < 1:
      raise DecodeError(
          f"config key decode.max_new_tokens={s.max_new_tokens} leaves no room for a prompt "
          + (f"in decode.cache_len={s.cache_len}" if s.cache_len else
             f"within the target's max_position_embeddings={limit}"
             + (f" (with {s.tree_reserve} slots for the draft tree)" if s.tree_reserve
                else "")))
    self._generate = METHODS[s.method](self, self.graphdef, self.params)
    self.compiled_shapes: set[tuple[int, int]] = set()  # (padded prompt len, cache len)
    self.last_call_compiled = False  # whether the last batch paid for a compilation

  def vanilla_engine(self) -> "DecodeEngine":
    """An engine for vanilla decoding sharing this one's target, tokenizer and settings
    (made once; itself when this one is vanilla)."""
    if self.settings.method == "vanilla":
      return self
    if self._vanilla is None:
      twin = copy.copy(self)
      twin.settings = dataclasses.replace(self.settings, method="vanilla")
      twin.draft_info, twin._vanilla = None, None
      twin._init_method()
      self._vanilla = twin
    return self._vanilla

  # ---- tokenization

  def _need_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError(f"the target has no tokenizer ({self.tokenizer_error})")

  def encode_text(self, text: str) -> list[int]:
    """Raw text -> ids, special tokens (BOS) as the tokenizer adds them by default."""
    self._need_tokenizer()
    return list(self.tokenizer(text)["input_ids"])

  def encode_chat(self, messages: list[dict]) -> list[int]:
    """A chat -> ids of its rendering with the chat template and the generation prompt."""
    self._need_tokenizer()
    if not getattr(self.tokenizer, "chat_template", None):
      raise ValueError("the target's tokenizer has no chat template")
    try:
      text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are input errors
      raise ValueError(f"chat template failed: {e}") from None
    # The rendered text already holds the template's special tokens (BOS included).
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def decode_text(self, ids: Sequence[int]) -> str | None:
    if self.tokenizer is None:
      return None
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  # ---- generation

  def batch_shape(self, max_prompt_len: int) -> tuple[int, int]:
    """(padded prompt length, cache length) for a batch whose longest prompt is given."""
    s = self.settings
    padded = bucket_length(max_prompt_len, s.min_prompt_bucket)
    if s.cache_len:
      return min(padded, s.cache_len - s.max_new_tokens), s.cache_len
    # Speculative: prompt + max_new_tokens + one tree + one accepted run (cache_len_for).
    return padded, _round_up(padded + s.max_new_tokens + s.tree_reserve, CACHE_ROUND)

  def generate_batch(self, prompts: Sequence[Sequence[int]], seed: int = 0
                     ) -> list[Completion]:
    """Decodes up to batch_size prompts in one static-shape call."""
    s = self.settings
    n = len(prompts)
    if not 1 <= n <= s.batch_size:
      raise ValueError(f"generate_batch takes 1..{s.batch_size} prompts, got {n}")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1 or max(lengths) > self.max_prompt_len:
      raise ValueError(f"prompt lengths must be in 1..{self.max_prompt_len}, got {lengths}")
    padded, cache_len = self.batch_shape(max(lengths))
    # Filler rows repeat row 0, so (greedy) they finish with it and never prolong the loop.
    rows = list(prompts) + [prompts[0]] * (s.batch_size - n)
    prompt = np.zeros((s.batch_size, padded), np.int32)  # [batch, padded], right-padded
    for i, p in enumerate(rows):
      prompt[i, :len(p)] = p
    row_lengths = np.asarray([len(p) for p in rows], np.int32)  # [batch]
    options = GenerateOptions(max_new_tokens=s.max_new_tokens, sampling=s.sampling,
                              stop_token_ids=self.stop_token_ids, cache_len=cache_len)
    self.last_call_compiled = (padded, cache_len) not in self.compiled_shapes
    self.compiled_shapes.add((padded, cache_len))
    t0 = time.perf_counter()
    out = self._generate(prompt, row_lengths, options, seed)
    tokens, num, reason = (np.asarray(x) for x in out[:3])  # host arrays: call is done
    dt = time.perf_counter() - t0
    history = np.asarray(out.accept_history) if isinstance(out, SpecOutput) else None
    return [Completion(output_ids=[int(t) for t in tokens[i, :num[i]]],
                       finish_reason=FINISH_REASONS[int(reason[i])],
                       prompt_tokens=lengths[i], decode_time_s=dt,
                       # -1 marks steps after the row finished (a row's steps come first)
                       accept_lengths=(None if history is None else
                                       [int(a) for a in history[i] if a >= 0]))
            for i in range(n)]

  def generate(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> list[Completion]:
    """Decodes any number of prompts, batch_size at a time."""
    b = self.settings.batch_size
    out = []
    for i in range(0, len(prompts), b):
      out += self.generate_batch(prompts[i:i + b], seed=batch_seed(seed, i // b))
    return out


def batch_seed(seed: int, batch_index: int) -> int:
  """An independent non-negative int32 seed per (run seed, batch)."""
  return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0] >> 1)


# --------------------------------------------------------------------------- input


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
    raise ValueError(_too_long(len(ids), engine))
  return Record(id=rid, line=line, kind=kind, input_ids=ids, turns=turns)


def _too_long(n: int, engine: DecodeEngine) -> str:
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


# --------------------------------------------------------------------------- output


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


def _mean_accept(committed: int, steps: int) -> float | None:
  return round(committed / steps, 4) if steps else None


def _completion_dict(c: Completion, text: str | None) -> dict:
  d = {"output_ids": c.output_ids, "text": text, "new_tokens": c.new_tokens,
       "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
       "mean_accept_len": _mean_accept(c.committed, c.steps),
       "target_forwards": c.target_forwards}
  if c.accept_lengths is not None:
    d["accept_lengths"] = c.accept_lengths
  d["decode_time_s"] = round(c.decode_time_s, 6)
  return d


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
  """First position where two token lists differ (the shorter length for a proper prefix);
  None when equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


# --------------------------------------------------------------------------- job


@dataclasses.dataclass
class _Job:
  """A record in flight: its current prompt and, for `turns`, the chat so far."""

  record: Record
  prompt: list[int]
  results: list[tuple[Completion, str | None]] = dataclasses.field(default_factory=list)
  messages: list[dict] = dataclasses.field(default_factory=list)
  vanilla: list[Completion] = dataclasses.field(default_factory=list)  # --compare_vanilla

  @property
  def committed_steps(self) -> tuple[int, int]:
    return (sum(c.committed for c, _ in self.results), sum(c.steps for c, _ in self.results))

  def mismatches(self) -> list[dict]:
    """Turns whose output differs from vanilla decoding of the same prompt."""
    out = []
    for k, ((c, _), v) in enumerate(zip(self.results, self.vanilla)):
      pos = first_difference(c.output_ids, v.output_ids)
      if pos is not None:
        m = {"id": self.record.id, "position": pos, "finish_reason": c.finish_reason,
             "vanilla_finish_reason": v.finish_reason}
        if self.record.kind == "turns":
          m["turn"] = k + 1
        out.append(m)
    return out

  def output(self, check_vanilla: bool = False) -> dict:
    rid = self.record.id
    if self.record.kind != "turns":
      (c, text), = self.results
      out = {"id": rid, **_completion_dict(c, text)}
    else:
      turns = [_completion_dict(c, t) for c, t in self.results]
      out = {"id": rid, "turns": turns, "new_tokens": sum(t["new_tokens"] for t in turns),
             "mean_accept_len": _mean_accept(*self.committed_steps),
             "target_forwards": sum(t["target_forwards"] for t in turns),
             "decode_time_s": round(sum(c.decode_time_s for c, _ in self.results), 6)}
    if check_vanilla:
      out["vanilla_match"] = not self.mismatches()
    return out


def _config_dict(config) -> Any:
  """The config as JSON-able data (ConfigDict or plain nested dicts)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else config
  return json.loads(json.dumps(raw, default=str))


def _default_log(msg: str) -> None:
  console.write(msg)


class _Timer:
  """Decode time of one engine over a run: all calls, and warm (compile-free) calls."""

  def __init__(self):
    self.total = self.warm = 0.0
    self.warm_tokens = 0

  def run(self, engine: DecodeEngine, prompts, seed: int) -> list[Completion]:
    """One batch; its time counts as warm unless the call compiled."""
    out = engine.generate_batch(prompts, seed=seed)
    self.total += out[0].decode_time_s
    if not engine.last_call_compiled:
      self.warm += out[0].decode_time_s
      self.warm_tokens += sum(c.new_tokens for c in out)
    return out


class _PairedTimer:
  """Speculative against vanilla decode time on the same batches (--compare_vanilla).

  Each batch is decoded by both engines, alternating, until each has `repeats` warm calls
  (a call that compiled is not timed); the batch contributes the median time of each.
  Interleaving exposes both to the same machine load. `total` (the calls whose outputs are
  kept, compilation included), `warm` and `warm_tokens` describe the speculative side, as
  in _Timer."""

  def __init__(self, repeats: int):
    self.repeats = repeats
    self.total = self.warm = self.vanilla_warm = 0.0
    self.warm_tokens = self.vanilla_warm_tokens = self.timed_batches = 0

  def _call(self, engine: DecodeEngine, prompts, seed: int, times: list[float]):
    out = engine.generate_batch(prompts, seed=seed)
    if not engine.last_call_compiled:
      times.append(out[0].decode_time_s)
    return out

  def run(self, engine: DecodeEngine, vanilla: DecodeEngine, prompts, seed: int
          ) -> tuple[list[Completion], list[Completion]]:
    """One batch: (speculative completions, vanilla completions). Repeated calls use the
    same seed, so they reproduce the same outputs."""
    spec_times, vanilla_times = [], []
    out = self._call(engine, prompts, seed, spec_times)
    vanilla_out = self._call(vanilla, prompts, seed, vanilla_times)
    self.total += out[0].decode_time_s
    while len(spec_times) < self.repeats or len(vanilla_times) < self.repeats:
      if len(spec_times) < self.repeats:
        self._call(engine, prompts, seed, spec_times)
      if len(vanilla_times) < self.repeats:
        self._call(vanilla, prompts, seed, vanilla_times)
    self.timed_batches += 1
    self.warm += float(np.median(spec_times))
    self.vanilla_warm += float(np.median(vanilla_times))
    self.warm_tokens += sum(c.new_tokens for c in out)
    self.vanilla_warm_tokens += sum(c.new_tokens for c in vanilla_out)
    return out, vanilla_out

  def summary(self) -> dict:
    """Tokens/s of each side from the per-batch medians; speedup = their ratio."""
    spec, vanilla = (_rate(self.warm_tokens, self.warm),
                     _rate(self.vanilla_warm_tokens, self.vanilla_warm))
    return {"decode_time_s": round(self.warm, 4),
            "vanilla_decode_time_s": round(self.vanilla_warm, 4),
            "tokens_per_s": spec, "vanilla_tokens_per_s": vanilla,
            "speedup": round(spec / vanilla, 4) if spec and vanilla else None,
            "timing": f"median of {self.repeats} interleaved warm calls per batch "
                      f"({self.timed_batches} batch{'es' if self.timed_batches != 1 else ''});"
                      f" speedup = tokens/s ratio"}


def _rate(tokens: int, seconds: float) -> float | None:
  return round(tokens / seconds, 2) if seconds else None


def run_decode(config, input_path: str, output_path: str, *, strict: bool = False,
               seed: int | None = None, progress: bool = True,
               engine: DecodeEngine | None = None,
               log: Callable[[str], None] | None = None,
               compare_vanilla: bool = False) -> dict:
  """Decodes every input record whose id is not yet in `output_path`; returns the summary
  (also written to `<output>.summary.json`).

  Malformed lines are reported through `log` with their line number and skipped, or with
  `strict` abort the job (DecodeError) before anything is decoded. `engine` reuses a
  DecodeEngine built from this config (then `config` may be None); `seed` overrides
  decode.seed. `compare_vanilla` also decodes each batch with vanilla decoding (see the
  module docstring). Raises DecodeError when no record was decoded because every one was
  skipped (malformed, or too long for the cache), after writing the summary."""
  t_start = time.perf_counter()
  log = log or _default_log
  settings = engine.settings if engine is not None else decode_settings(config)
  run_seed = settings.seed if seed is None else int(seed)
  if not input_path or not os.path.isfile(input_path):
    raise DecodeError(f"input file {input_path!r} does not exist")
  if not output_path:
    raise DecodeError("no output file given")
  out_dir = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(out_dir):
    raise DecodeError(f"output directory {out_dir!r} does not exist")
  import jax
  is_writer = jax.process_index() == 0
  done, partial = scan_output(output_path, truncate=is_writer)
  if partial:
    log(f"{output_path}: dropped a partial last line (an interrupted write); its record "
        f"is decoded again")

  if engine is None:
    engine = DecodeEngine(config)
  vanilla = engine.vanilla_engine() if compare_vanilla else None
  greedy_check = vanilla is not None and settings.sampling.temperature == 0
  t_loaded = time.perf_counter()
  records, problems, blank = load_records(input_path, engine)
  if problems and strict:
    raise DecodeError(problems[0].where(input_path) + " (--strict)")
  for p in problems:
    log(f"{p.where(input_path)} (skipped)")
  pending = [r for r in records if id_key(r.id) not in done]

  writer = JsonlWriter(output_path) if is_writer else None
  queue = collections.deque(_Job(r, r.input_ids) for r in pending)
  stats = collections.Counter()
  timer = _PairedTimer(settings.timing_repeats) if vanilla is not None else _Timer()
  depth_hits = np.zeros(settings.tree_depth + 1, np.int64)  # [D+1]: steps accepting >= d
  record_taus, mismatches = [], []
  bar = console.progress(len(pending), f"decode[{unit_name(engine)}]", "rec",
                         enabled=progress)
  try:
    while queue:
      jobs = [queue.popleft() for _ in range(min(settings.batch_size, len(queue)))]
      prompts = [j.prompt for j in jobs]
      bseed = batch_seed(run_seed, stats["batches"])
      if vanilla is not None:
        completions, vanilla_out = timer.run(engine, vanilla, prompts, bseed)
        for job, v in zip(jobs, vanilla_out):
          job.vanilla.append(v)
          stats["vanilla_new_tokens"] += v.new_tokens
      else:
        completions = timer.run(engine, prompts, bseed)
      stats["batches"] += 1
      followups = []
      for job, c in zip(jobs, completions):
        text = engine.decode_text(c.output_ids)
        job.results.append((c, text))
        stats["new_tokens"] += c.new_tokens
        stats["prompt_tokens"] += c.prompt_tokens
        stats["steps"] += c.steps
        stats["committed"] += c.committed
        stats["target_forwards"] += c.target_forwards
        stats[f"finish_{c.finish_reason}"] += 1
        if c.accept_lengths:
          a = np.minimum(np.asarray(c.accept_lengths), settings.tree_depth)
          depth_hits += np.bincount(a, minlength=settings.tree_depth + 1)[::-1].cumsum()[::-1]
        rec = job.record
        if rec.kind == "turns" and len(job.results) < len(rec.turns):
          nxt = _next_turn(job, text, engine)
          if isinstance(nxt, Problem):
            if strict:
              raise DecodeError(nxt.where(input_path) + " (--strict)")
            log(f"{nxt.where(input_path)} (skipped)")
            problems.append(nxt)
            stats["failed"] += 1
            bar.update(1)
          else:
            followups.append(job)
          continue
        committed, steps = job.committed_steps
        if steps:
          record_taus.append(committed / steps)
        if greedy_check:
          bad = job.mismatches()
          mismatches += bad
          stats["checked"] += 1
          stats["matched"] += not bad
        if writer is not None:
          writer.write(job.output(check_vanilla=greedy_check))
        stats["decoded"] += 1
        bar.update(1)
      queue.extendleft(reversed(followups))  # finish multi-turn records first
      if timer.warm:  # compile-free calls only
        bar.set_postfix_str(f"{timer.warm_tokens / timer.warm:.1f} tok/s")
  finally:
    bar.close()
    if writer is not None:
      writer.close()

  wall = time.perf_counter() - t_start
  steps = stats["steps"]
  summary = {
      "method": settings.method,
      "input": input_path,
      "output": output_path,
      "input_lines": len(records) + len(problems) - stats["failed"],
      "blank_lines": blank,
      "records": len(records),
      "decoded": stats["decoded"],
      "skipped_done": len(records) - len(pending),
      "malformed": len(problems),
      "problems": [{"line": p.line, "reason": p.reason}
                   for p in problems[:MAX_REPORTED_PROBLEMS]],
      "recovered_partial_line": partial,
      "new_tokens": stats["new_tokens"],
      "prompt_tokens": stats["prompt_tokens"],
      "finish_reasons": {r: stats[f"finish_{r}"] for r in FINISH_REASONS.values()
                         if stats[f"finish_{r}"]},
      "batches": stats["batches"],
      "compiled_shapes": len(engine.compiled_shapes),
      # The calls whose outputs are kept (compilation included, timing repeats not).
      "decode_time_s": round(timer.total, 4),
      "tokens_per_s": _rate(stats["new_tokens"], timer.total) or 0.0,
      "tokens_per_s_excl_compile": _rate(timer.warm_tokens, timer.warm),
      # Target forwards: prefill + verify steps (vanilla: one per token).
      "target_forwards": stats["target_forwards"],
      "verify_steps": steps,
      # Tokens committed per verify step, pooled over all steps, and the mean of per-record
      # values (records with at least one step).
      "tau": _mean_accept(stats["committed"], steps),
      "tau_per_record_mean": (round(float(np.mean(record_taus)), 4) if record_taus
                              else None),
      # Element d-1: fraction of verify steps that accepted >= d draft tokens, d = 1..D.
      "acceptance_by_depth": ([round(float(x) / steps, 4) for x in depth_hits[1:]]
                              if settings.speculative and steps else None),
      "tree": settings.tree_dict(),
      "draft": engine.draft_info,
      "load_time_s": round(t_loaded - t_start, 4),
      "wall_time_s": round(wall, 4),
      "seed": run_seed,
      "strict": strict,
      "stop_token_ids": list(engine.stop_token_ids),
      "config": _config_dict(engine.config),
  }
  if vanilla is not None:
    summary["compare_vanilla"] = {
        **timer.summary(),  # warm calls only, interleaved, medians
        "vanilla_new_tokens": stats["vanilla_new_tokens"],
        "greedy": greedy_check,
        "checked": stats["checked"] if greedy_check else None,
        "matched": stats["matched"] if greedy_check else None,
        "mismatches": mismatches[:MAX_REPORTED_PROBLEMS] if greedy_check else None,
    }
  if is_writer:
    tmp = output_path + ".summary.json.tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, output_path + ".summary.json")
  if not summary["decoded"] and not summary["skipped_done"]:
    raise DecodeError(_nothing_decoded(summary, input_path))
  return summary


def _nothing_decoded(summary: dict, input_path: str) -> str:
  """Why a job decoded nothing, in one line (the summary file lists every problem)."""
  if not summary["malformed"]:
    return f"{input_path} holds no record to decode"
  first = summary["problems"][0]
  return (f"no record was decoded: all {summary['malformed']} input record(s) were skipped "
          f"(first: {input_path}:{first['line']}: {first['reason']}); details in "
          f"{summary['output']}.summary.json")


def _num(x, fmt: str = ".1f") -> str:
  return "-" if x is None else format(x, fmt)


def format_summary(summary: dict) -> str:
  """A run's summary for people, in a few lines (the full one is <output>.summary.json)."""
  skipped = [f"{summary['malformed']} malformed or too long"] if summary["malformed"] else []
  if summary["skipped_done"]:
    skipped.append(f"{summary['skipped_done']} already in the output")
  lines = [f"decode[{summary['draft']['kind'] if summary['draft'] else summary['method']}]: "
           f"{summary['decoded']} records decoded"
           + (f" ({', '.join(skipped)} skipped)" if skipped else "")
           + f", {summary['new_tokens']} new tokens, "
           f"{_num(summary['tokens_per_s_excl_compile'])} tokens/s excluding compilation "
           f"({_num(summary['tokens_per_s'])} with it)"]
  if summary["acceptance_by_depth"] is not None:
    lines.append(f"tau {_num(summary['tau'], '.2f')} tokens per target forward; acceptance "
                 "by depth " + " ".join(f"{a:.2f}" for a in summary["acceptance_by_depth"]))
  cmp = summary.get("compare_vanilla")
  if cmp:
    lines.append(f"vs vanilla: speedup {_num(cmp['speedup'], '.2f')}x "
                 f"({_num(cmp['tokens_per_s'])} vs {_num(cmp['vanilla_tokens_per_s'])} "
                 f"tokens/s, {cmp['timing']})")
    lines.append(f"greedy outputs equal to vanilla: {cmp['matched']}/{cmp['checked']} records"
                 if cmp["greedy"] else "sampled: outputs not compared with vanilla")
  lines.append(f"outputs: {summary['output']} (summary: {summary['output']}.summary.json)")
  return "\n".join(lines)


def unit_name(engine: DecodeEngine) -> str:
  """What a decoding engine runs, by draft kind (fs_only, pad_only, ...) or 'vanilla'."""
  return engine.draft_info["kind"] if engine.draft_info else engine.settings.method


def _next_turn(job: _Job, answer: str | None, engine: DecodeEngine) -> list[int] | Problem:
  """Moves a `turns` job to its next user message (answer appended to the chat); returns
  the new prompt, or a Problem when it does not fit."""
  rec = job.record
  k = len(job.results)  # index of the next turn
  if not job.messages:
    job.messages = [{"role": "user", "content": rec.turns[0]}]
  job.messages += [{"role": "assistant", "content": (answer or "").strip()},
                   {"role": "user", "content": rec.turns[k]}]
  try:
    ids = engine.encode_chat(job.messages)
  except ValueError as e:
    return Problem(rec.line, f"turn {k + 1}: {e}")
  if len(ids) > engine.max_prompt_len:
    return Problem(rec.line, f"turn {k + 1}: {_too_long(len(ids), engine)}")
  job.prompt = ids
  return ids
