"""DecodeEngine: a loaded target + tokenizer (+ draft) and its compiled decoding method,
decoding batches of token-id prompts at static shapes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import numpy as np

from fspad_jax.decoding.settings import (DTYPES, METHOD_NAMES, MIN_BUCKET, DecodeError,
                                         DecodeSettings, config_value, decode_settings,
                                         resolve_target_path)
from fspad_jax.draft_source import load_draft_for_decode, load_draft_hot_ids
from fspad_jax.generate import (FINISH_REASONS, GenerateOptions, GenerateOutput,
                                VanillaGenerator, VanillaSlots, default_row_seeds)
from fspad_jax.hf_checkpoint import CheckpointError, load_target, load_tokenizer
from fspad_jax.quant import check_weight_dtype, quantize_draft
from fspad_jax.sharding import ShardingError, ShardingRules, make_mesh
from fspad_jax.speculative import SpecOutput, SpecSlots, SpeculativeGenerator

CACHE_ROUND = 64  # derived cache lengths are multiples of this


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


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


# (engine, graphdef, params) -> fn(prompt [batch, seq], lengths [batch], options, seed,
#   row_seeds=None, limits=None) -> GenerateOutput or SpecOutput (numpy), with
#   fn.slots(options, batch) -> the method's continuous-batching slot functions
#   (generate.VanillaSlots / speculative.SpecSlots). Speculative methods read their extra
#   config sections (`draft`) from engine.config.
MethodBuilder = Callable[..., Callable[[np.ndarray, np.ndarray, GenerateOptions, int],
                                       GenerateOutput | SpecOutput]]


class _Vanilla(VanillaGenerator):
  def slots(self, options: GenerateOptions, batch: int) -> VanillaSlots:
    return VanillaSlots(self.graphdef, self.params, self.mesh, self.rules, options, batch)


def _build_vanilla(engine: "DecodeEngine", graphdef, params):
  return _Vanilla(graphdef, params, engine.mesh, engine.rules)


class _Speculative:
  """A SpeculativeGenerator called with GenerateOptions (the tree comes from settings)."""

  def __init__(self, generator: SpeculativeGenerator, settings: DecodeSettings):
    self.generator, self.settings = generator, settings

  def __call__(self, prompt, lengths, options: GenerateOptions, seed: int = 0,
               row_seeds=None, limits=None) -> SpecOutput:
    return self.generator(prompt, lengths, self.settings.spec_options(options), seed,
                          row_seeds, limits)

  def slots(self, options: GenerateOptions, batch: int) -> SpecSlots:
    return SpecSlots(self.generator, self.settings.spec_options(options), batch)


def _build_speculative(engine: "DecodeEngine", graphdef, params):
  """Loads draft.path (refused unless it fits the target and the method)."""
  method = engine.settings.method
  path = config_value(engine.config, "draft.path", "")
  if not path:
    raise DecodeError(f"config key draft.path is not set: decode.method={method!r} needs a "
                      f"draft (a train.py workdir, a checkpoint step or an EAGLE-layout "
                      f"directory)")
  cfg, draft_graphdef, draft_params = load_draft_for_decode(
      path, engine.cfg, method, engine.mesh, engine.rules)
  draft_vocab = cfg.hot_vocab_size or engine.cfg.vocab_size
  if engine.settings.tree_top_k > draft_vocab:
    raise DecodeError(f"config key decode.tree_top_k={engine.settings.tree_top_k} exceeds the "
                      f"draft's vocabulary (size {draft_vocab}, {path})")
  hot_ids = load_draft_hot_ids(path, cfg, engine.cfg)
  weight_dtype = check_weight_dtype(config_value(engine.config, "draft.weight_dtype", ""))
  if weight_dtype == "int8":
    draft_graphdef, draft_params = quantize_draft(draft_graphdef, draft_params, engine.mesh)
  engine.draft_info = {"path": os.path.abspath(path), "kind": cfg.kind, "dtype": cfg.dtype,
                       "weight_dtype": weight_dtype or cfg.dtype,
                       "vocab_size": draft_vocab}
  generator = SpeculativeGenerator(graphdef, params, draft_graphdef, draft_params,
                                   engine.mesh, engine.rules, hot_ids=hot_ids,
                                   weight_dtype=weight_dtype)
  if engine.settings.tree == "auto":  # size the tree from measured costs (tree_auto)
    from fspad_jax import console
    from fspad_jax.decoding.tree_auto import choose_for_engine
    engine.settings, engine.tree_auto = choose_for_engine(engine, generator, console.write)
  return _Speculative(generator, engine.settings)


METHODS: dict[str, MethodBuilder] = {
    "vanilla": _build_vanilla, "eagle": _build_speculative, "fspad": _build_speculative,
    "eagle3": _build_speculative}
assert set(METHODS) == set(METHOD_NAMES), "settings.METHOD_NAMES lists every method"


@dataclasses.dataclass
class Completion:
  """One decoded prompt."""

  output_ids: list[int]  # generated tokens, including the stop token when one was generated
  finish_reason: str  # "stop" | "length" | "cache_full"
  prompt_tokens: int
  decode_time_s: float  # wall time of the batch call that decoded it (shared by its rows);
  #                      continuous batching: from its slot's refill to its readback
  accept_lengths: list[int] | None = None  # speculative: accepted draft tokens per step
  slot: int | None = None  # continuous batching: the slot that decoded it

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
    for i in (eos if isinstance(eos, list) else [] if eos is None else [eos]):
      if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise DecodeError(f"{path}: eos_token_id {eos!r}: expected a token id (an integer "
                          f">= 0) or a list of them")
      ids.add(i)
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
    self.model_dir = resolve_target_path(config_value(config, "target.path"))
    dtype = config_value(config, "target.dtype")
    if dtype not in DTYPES:
      raise DecodeError(f"config key target.dtype={dtype!r}: expected one of {DTYPES}")
    shape = config_value(config, "mesh.shape", (1, 1, -1))
    try:
      self.mesh = make_mesh(tuple(shape))
    except (ShardingError, TypeError, ValueError) as e:
      raise DecodeError(f"config key mesh.shape={shape!r}: {e}") from None
    self.rules = ShardingRules()
    self.cfg, self.graphdef, self.params = load_target(self.model_dir, self.mesh, self.rules,
                                                       dtype)
    try:
      self.tokenizer = load_tokenizer(self.model_dir, config_value(config, "target.chat_template", ""))
      self.tokenizer_error = None
    except CheckpointError as e:  # token-id inputs still work
      self.tokenizer, self.tokenizer_error = None, str(e)
    vocab = self.cfg.vocab_size
    bad = [i for i in self.settings.stop_token_ids if i >= vocab]
    if bad:
      raise DecodeError(f"config key decode.stop_token_ids: {bad} out of the target's "
                        f"vocabulary (size {vocab})")
    if self.settings.speculative and self.settings.tree_top_k > vocab:
      raise DecodeError(f"config key decode.tree_top_k={self.settings.tree_top_k} exceeds the "
                        f"target's vocabulary (size {vocab})")
    stops = default_stop_token_ids(self.model_dir, self.cfg.eos_token_ids, self.tokenizer)
    self.stop_token_ids = tuple(sorted(stops | set(self.settings.stop_token_ids)))
    self.draft_info: dict | None = None  # speculative: {path, kind, dtype} of the draft
    self.tree_auto: dict | None = None  # decode.tree=auto: the choice (tree_auto.choose_for_engine)
    self._vanilla: DecodeEngine | None = None
    self._init_method()

  @classmethod
  def from_model(cls, config, cfg, graphdef, params, mesh) -> "DecodeEngine":
    """An engine over an already built target (benchmarks: random weights, no directory,
    no tokenizer; token-id prompts only). Stop ids: the config's and cfg.eos_token_ids."""
    self = cls.__new__(cls)
    self.config, self.settings = config, decode_settings(config)
    self.model_dir, self.mesh, self.rules = None, mesh, ShardingRules()
    self.cfg, self.graphdef, self.params = cfg, graphdef, params
    self.tokenizer, self.tokenizer_error = None, "built from a model, without a tokenizer"
    self.stop_token_ids = tuple(sorted(set(cfg.eos_token_ids) | set(self.settings.stop_token_ids)))
    self.draft_info, self._vanilla, self.tree_auto = None, None, None
    self._init_method()
    return self

  def _init_method(self):
    self._set_prompt_limit()
    self._generate = METHODS[self.settings.method](self, self.graphdef, self.params)
    if self.tree_auto is not None:
      self._set_prompt_limit()  # the chosen tree's reserve
    self._slots = None  # continuous batching's slot functions (slot_decoder)
    self.compiled_shapes: set[tuple[int, int]] = set()  # (padded prompt len, cache len)
    self.last_call_compiled = False  # whether the last batch paid for a compilation

  def _set_prompt_limit(self):
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

  def vanilla_engine(self) -> "DecodeEngine":
    """An engine for vanilla decoding sharing this one's target, tokenizer and settings
    (made once; itself when this one is vanilla)."""
    if self.settings.method == "vanilla":
      return self
    if self._vanilla is None:
      twin = copy.copy(self)
      twin.settings = dataclasses.replace(self.settings, method="vanilla")
      twin.draft_info, twin._vanilla, twin.tree_auto, twin._slots = None, None, None, None
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
    return padded, round_up(padded + s.max_new_tokens + s.tree_reserve, CACHE_ROUND)

  def generate_options(self, cache_len: int) -> GenerateOptions:
    s = self.settings
    return GenerateOptions(max_new_tokens=s.max_new_tokens, sampling=s.sampling,
                           stop_token_ids=self.stop_token_ids, cache_len=cache_len)

  def check_prompt_lengths(self, lengths: Sequence[int]) -> None:
    if min(lengths) < 1 or max(lengths) > self.max_prompt_len:
      raise ValueError(f"prompt lengths must be in 1..{self.max_prompt_len}, got {list(lengths)}")

  def slot_decoder(self, options: GenerateOptions | None = None):
    """This method's continuous-batching slot functions for batch_size slots (made once;
    fspad_jax.decoding.scheduler drives them)."""
    if self._slots is None:
      limit = self.settings.cache_len or self.cfg.max_position_embeddings
      self._slots = self._generate.slots(options or self.generate_options(limit),
                                         self.settings.batch_size)
    return self._slots

  def generate_batch(self, prompts: Sequence[Sequence[int]], seed: int = 0,
                     row_seeds: Sequence[int] | None = None,
                     limits: Sequence[int] | None = None) -> list[Completion]:
    """Decodes up to batch_size prompts in one static-shape call. row_seeds: each prompt's
    sampling seed (default: derived from `seed` and the row), so a prompt's samples do not
    depend on its row or batch; limits: each prompt's max new tokens (<= max_new_tokens)."""
    s = self.settings
    n = len(prompts)
    if not 1 <= n <= s.batch_size:
      raise ValueError(f"generate_batch takes 1..{s.batch_size} prompts, got {n}")
    lengths = [len(p) for p in prompts]
    self.check_prompt_lengths(lengths)
    padded, cache_len = self.batch_shape(max(lengths))
    row_seeds = list(default_row_seeds(seed, n) if row_seeds is None else row_seeds)
    limits = list([s.max_new_tokens] * n if limits is None else limits)
    row_seeds += [row_seeds[0]] * (s.batch_size - n)
    limits += [limits[0]] * (s.batch_size - n)
    # Filler rows repeat row 0, so (greedy) they finish with it and never prolong the loop.
    rows = list(prompts) + [prompts[0]] * (s.batch_size - n)
    prompt = np.zeros((s.batch_size, padded), np.int32)  # [batch, padded], right-padded
    for i, p in enumerate(rows):
      prompt[i, :len(p)] = p
    row_lengths = np.asarray([len(p) for p in rows], np.int32)  # [batch]
    options = self.generate_options(cache_len)
    self.last_call_compiled = (padded, cache_len) not in self.compiled_shapes
    self.compiled_shapes.add((padded, cache_len))
    t0 = time.perf_counter()
    out = self._generate(prompt, row_lengths, options, seed, np.asarray(row_seeds, np.int32),
                         np.asarray(limits, np.int32))
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
    """Decodes any number of prompts, batch_size at a time (prompt k samples with
    record_seed(seed, str(k)))."""
    b = self.settings.batch_size
    out = []
    for i in range(0, len(prompts), b):
      chunk = prompts[i:i + b]
      out += self.generate_batch(chunk, row_seeds=[record_seed(seed, str(i + k))
                                                   for k in range(len(chunk))])
    return out


def batch_seed(seed: int, batch_index: int) -> int:
  """An independent non-negative int32 seed per (run seed, batch)."""
  return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0] >> 1)


def record_seed(seed: int, record_key: str, turn: int = 0) -> int:
  """The sampling seed of one record's turn: a non-negative int32 from (run seed, the
  record's id key, turn), whatever its batch, slot or neighbours."""
  digest = hashlib.sha256(record_key.encode("utf-8")).digest()
  words = np.frombuffer(digest[:16], np.uint32).tolist()
  return int(np.random.SeedSequence([int(seed), *words, int(turn)]).generate_state(1)[0] >> 1)
