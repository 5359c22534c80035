"""The `decode` section of a config, validated: DecodeSettings, and DecodeError for every
user mistake (one line naming the culprit)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from fspad_jax.config import ConfigError
from fspad_jax.draft_source import METHOD_KINDS
from fspad_jax.generate import GenerateOptions
from fspad_jax.hf_checkpoint import CheckpointError, resolve_model_dir
from fspad_jax.sampling import SamplingParams
from fspad_jax.sharding import ShardingError
from fspad_jax.speculative import SpecOptions, cache_len_for
from fspad_jax.tree import num_buffer_nodes

METHOD_NAMES = ("vanilla", *METHOD_KINDS)  # decode.method values (engine.METHODS builds them)
DTYPES = ("float32", "bfloat16", "float16")
MIN_BUCKET = 64  # smallest padded prompt length
TIMING_REPEATS = 3  # --compare_vanilla: interleaved warm calls per batch (median is used)
SCHEDULES = ("continuous", "static")  # decode.schedule values

class DecodeError(ValueError):
  """A user error (config, input file, output file), as one line naming the culprit."""


# Errors that decode.py reports as one line instead of a traceback.
USER_ERRORS = (DecodeError, ConfigError, CheckpointError, ShardingError, FileNotFoundError)


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
  tree: str = ""  # "" : the tree above; "auto": sized from measured costs (tree_auto)
  tree_pins: tuple[tuple[str, int], ...] = ()  # auto: (name, value) held fixed in the search
  schedule: str = "continuous"  # continuous: refill a slot when its row ends; static: batches

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


REQUIRED = object()


def config_value(config, key: str, default=REQUIRED):
  """config['a.b'] (or `default` when absent) with an error that names a missing key."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      if default is REQUIRED:
        raise DecodeError(f"config key {key} is missing") from None
      return default
  return node


def config_int(config, key: str, minimum: int, default=REQUIRED) -> int:
  value = config_value(config, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DecodeError(f"config key {key}={value!r}: expected an integer >= {minimum}")
  return int(value)


def config_float(config, key: str, default=REQUIRED, minimum: float | None = None,
                 maximum: float | None = None, exclusive_minimum: bool = False) -> float:
  """A finite number in [minimum, maximum] ((minimum, maximum] with exclusive_minimum)."""
  value = config_value(config, key, default)
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not math.isfinite(value)
      or (minimum is not None and (value <= minimum if exclusive_minimum else value < minimum))
      or (maximum is not None and value > maximum)):
    low = "" if minimum is None else f"{'>' if exclusive_minimum else '>='} {minimum}"
    high = "" if maximum is None else f"<= {maximum}"
    bounds = " and ".join(b for b in (low, high) if b)
    raise DecodeError(f"config key {key}={value!r}: expected a finite number"
                      + (f" {bounds}" if bounds else ""))
  return float(value)


def check_seed(seed, source: str = "--seed") -> int:
  """A sampling seed: an integer >= 0 (a job's --seed, or decode.seed)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DecodeError(f"{source}={seed!r}: expected an integer >= 0")
  return int(seed)


def decode_settings(config) -> DecodeSettings:
  """Validates config.decode; errors name the key. Optional keys: top_p (1.0), top_k (0),
  cache_len (0), stop_token_ids (()), seed (0), tree_depth (6), tree_top_k (10),
  total_tokens (60), min_prompt_bucket (64), timing_repeats (3), tree ('': fixed; 'auto'),
  schedule (continuous)."""
  method = config_value(config, "decode.method")
  if method not in METHOD_NAMES:
    raise DecodeError(f"config key decode.method={method!r} is not supported "
                      f"(supported: {', '.join(sorted(METHOD_NAMES))})")
  depth = config_int(config, "decode.tree_depth", 1, 6)
  tree_k = config_int(config, "decode.tree_top_k", 1, 10)
  total = config_int(config, "decode.total_tokens", 1, 60)
  tree, pins = tree_setting(config)
  if method in METHOD_KINDS and not tree and total > num_buffer_nodes(tree_k, depth):
    raise DecodeError(f"config key decode.total_tokens={total} exceeds the "
                      f"{num_buffer_nodes(tree_k, depth)} nodes that decode.tree_depth={depth} "
                      f"and decode.tree_top_k={tree_k} draft")
  temperature = config_float(config, "decode.temperature", minimum=0.0)
  top_p = config_float(config, "decode.top_p", 1.0, minimum=0.0, maximum=1.0,
                       exclusive_minimum=True)
  top_k = config_int(config, "decode.top_k", 0, 0)
  try:
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
  except ValueError as e:
    raise DecodeError(f"config keys decode.temperature/top_p/top_k: {e}") from None
  max_new = config_int(config, "decode.max_new_tokens", 1)
  cache_len = config_int(config, "decode.cache_len", 0, 0)
  if cache_len and cache_len <= max_new:
    raise DecodeError(f"config key decode.cache_len={cache_len} leaves no room for a prompt "
                      f"with decode.max_new_tokens={max_new} (use 0 to derive it)")
  stops = config_value(config, "decode.stop_token_ids", ())
  if isinstance(stops, (int, np.integer)) and not isinstance(stops, bool):
    stops = (stops,)
  if (not isinstance(stops, Sequence) or isinstance(stops, str)
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
             for s in stops)):
    raise DecodeError(f"config key decode.stop_token_ids={stops!r}: expected a list of "
                      f"non-negative token ids")
  schedule = config_value(config, "decode.schedule", "continuous")
  if schedule not in SCHEDULES:
    raise DecodeError(f"config key decode.schedule={schedule!r}: expected one of "
                      f"{', '.join(SCHEDULES)}")
  return DecodeSettings(
      method=method, schedule=schedule, sampling=sampling, max_new_tokens=max_new,
      batch_size=config_int(config, "decode.batch_size", 1), cache_len=cache_len,
      stop_token_ids=tuple(int(s) for s in stops), seed=config_int(config, "decode.seed", 0, 0),
      tree_depth=depth, tree_top_k=tree_k, total_tokens=total,
      min_prompt_bucket=config_int(config, "decode.min_prompt_bucket", 1, MIN_BUCKET),
      timing_repeats=config_int(config, "decode.timing_repeats", 1, TIMING_REPEATS),
      tree=tree, tree_pins=pins)


TREE_PINS = ("depth", "top_k", "nodes")


def tree_setting(config) -> tuple[str, tuple[tuple[str, int], ...]]:
  """decode.tree: "" (the fixed tree of decode.tree_depth/tree_top_k/total_tokens) or
  "auto", optionally pinning some sizes: "auto:depth=4,top_k=8" (names depth, top_k,
  nodes). Returns (tree, pins). Under "auto" the config file's tree_depth/tree_top_k/
  total_tokens are not used (they are the fixed tree's); on decode.py's command line they
  pin the search (pin_overridden_tree_keys)."""
  value = config_value(config, "decode.tree", "")
  bad = DecodeError(f"config key decode.tree={value!r}: expected '' (fixed tree) or 'auto', "
                    f"optionally 'auto:depth=D,top_k=K,nodes=N' with any of those pinned")
  if not isinstance(value, str):
    raise bad
  head, _, rest = value.strip().partition(":")
  if head in ("", "fixed") and not rest:
    return "", ()
  if head != "auto":
    raise bad
  pins = {}
  for part in filter(None, (p.strip() for p in rest.split(","))):
    name, eq, num = part.partition("=")
    if not eq or name.strip() not in TREE_PINS or name.strip() in pins:
      raise bad
    try:
      pins[name.strip()] = int(num)
    except ValueError:
      raise bad from None
    if pins[name.strip()] < 1:
      raise bad
  return "auto", tuple(sorted(pins.items()))


# decode.py command-line keys that pin decode.tree=auto's search, and their pin names.
TREE_KEY_PINS = {"decode.tree_depth": "depth", "decode.tree_top_k": "top_k",
                 "decode.total_tokens": "nodes"}


def pin_overridden_tree_keys(config, overridden) -> None:
  """Explicit settings win over decode.tree=auto: with decode.tree=auto, each of
  decode.tree_depth/tree_top_k/total_tokens named in `overridden` (the keys set on decode.py's
  command line; ml_collections' override values) is added to decode.tree as a pin
  ("auto" + --config.decode.tree_depth=4 becomes "auto:depth=4"). In place; a key that
  contradicts a pin already in decode.tree is refused."""
  tree, pins = tree_setting(config)
  wanted = [key for key in TREE_KEY_PINS if key in overridden]
  if tree != "auto" or not wanted:
    return
  pins = dict(pins)
  for key in wanted:
    name, value = TREE_KEY_PINS[key], config_int(config, key, 1)
    if pins.get(name, value) != value:
      raise DecodeError(f"config key {key}={value} contradicts the pin {name}={pins[name]} in "
                        f"decode.tree={config_value(config, 'decode.tree')!r}")
    pins[name] = value
  config.decode.tree = "auto:" + ",".join(f"{n}={v}" for n, v in sorted(pins.items()))


def resolve_target_path(path: str) -> str:
  """target.path as a local directory: a directory, or a repo id in the local HF cache."""
  try:
    return resolve_model_dir(path, "target.path")
  except ConfigError as e:
    raise DecodeError(str(e)) from None
