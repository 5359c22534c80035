"""Vanilla (target-only) generation: the baseline that speculative decoding must equal.

Prompts come right-padded with per-row lengths. One jitted call prefills and then runs
the whole decode loop on device (`lax.while_loop`), with no host round-trip per token.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from fspad_jax.model import KVCache, Transformer
from fspad_jax.slots import SlotDecoder, grow_cache
from fspad_jax.sampling import SamplingParams, fold_rows, row_keys, sample_tokens
from fspad_jax.sharding import (LOGICAL_LAYOUTS, ShardingRules, host_to_global, replicated,
                                to_host)

Array = jax.Array

FINISH_LENGTH, FINISH_STOP = 0, 1  # finish_reason codes
# 2 = speculative.FINISH_CACHE_FULL: the target cache could not hold another draft tree.
FINISH_REASONS = {FINISH_LENGTH: "length", FINISH_STOP: "stop", 2: "cache_full"}


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
  """Static settings of one compiled generation function."""

  max_new_tokens: int = 64
  sampling: SamplingParams = SamplingParams()
  stop_token_ids: tuple[int, ...] = ()
  cache_len: int = 512

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.cache_len < 1:
      raise ValueError(f"cache_len must be >= 1, got {self.cache_len}")


class GenerateOutput(NamedTuple):
  tokens: Array  # [batch, max_new_tokens] int32; entries past num_tokens are padding (-1)
  num_tokens: Array  # [batch] int32, including the stop token when one was generated
  finish_reason: Array  # [batch] int32, FINISH_LENGTH or FINISH_STOP


def prefill(model: Transformer, prompt: Array, prompt_lengths: Array, cache: KVCache,
            feature_layers: tuple[int, ...] | None = None) -> tuple[Array, Array, KVCache]:
  """Runs right-padded prompts [batch, seq] through the target from an empty cache.

  Returns (features [batch, seq, embed], last-token logits [batch, vocab], cache with
  lengths = prompt_lengths). Padding positions write K/V past each row's length, where the
  next tokens overwrite them; they are never attended to. With `feature_layers` (a draft's),
  the first output is instead those layers' taps [batch, seq, k*embed] from the same pass."""
  batch, seq = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  # The prompt fills slots 0..seq-1 of an empty cache: attend over those only.
  feats, taps, cache = model.features_and_taps(prompt, positions, cache, feature_layers or (),
                                               span=seq)
  last = jnp.take_along_axis(feats, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
  return (feats if taps is None else taps, model.logits(last),
          cache.replace(lengths=prompt_lengths.astype(jnp.int32)))


def is_stop(tokens: Array, stop_token_ids: tuple[int, ...]) -> Array:
  if not stop_token_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_token_ids, jnp.int32))


def constrain_cache(cache: KVCache, mesh, rules: ShardingRules) -> KVCache:
  """Pins the cache's sharding inside jit (batch over data/fsdp, kv heads over tensor)."""
  if mesh is None:
    return cache
  s = cache.shardings(mesh, rules)
  c = jax.lax.with_sharding_constraint
  return cache.replace(kv=c(cache.kv, s.kv))


class DecodeState(NamedTuple):
  """Vanilla decoding state between tokens (one row per prompt, or per slot)."""

  step: Array  # scalar int32: steps taken by this loop (a budget counter, not a column)
  tokens: Array  # [batch, max_new_tokens] int32, -1 padded
  cache: KVCache
  last: Array  # [batch] int32: the newest token, not yet run through the target
  done: Array  # [batch] bool
  num: Array  # [batch] int32: tokens emitted so far (the next column of `tokens`)
  limit: Array  # [batch] int32: this row's max new tokens (<= max_new_tokens)
  keys: Array  # [batch] PRNG keys, one per row: token j is drawn with fold_in(key, j)


def decode_step(model: Transformer, state: DecodeState, options: GenerateOptions,
                span: int | None = None) -> DecodeState:
  """One target forward over each row's newest token, then sample the next one. span: the
  attention span (static; every live row's length must be below it)."""
  step, tokens, cache, last, done, num, limit, keys = state
  positions = cache.lengths[:, None]  # [batch, 1]
  logits, _, cache = model(last[:, None], positions, cache, span=span)
  cache = cache.replace(lengths=cache.lengths + (~done).astype(jnp.int32))
  if options.sampling.greedy:  # no PRNG work when greedy
    nxt = sample_tokens(None, logits[:, 0], options.sampling)
  else:
    nxt = sample_tokens(fold_rows(keys, num), logits[:, 0], options.sampling)
  rows = jnp.arange(tokens.shape[0])
  tokens = tokens.at[rows, jnp.where(done, tokens.shape[1], num)].set(nxt, mode="drop")
  num = num + (~done).astype(jnp.int32)
  done = done | is_stop(nxt, options.stop_token_ids) | (num >= limit)
  last = jnp.where(done, last, jnp.maximum(nxt, 0))
  return DecodeState(step + 1, tokens, cache, last, done, num, limit, keys)


def first_state(model: Transformer, prompt: Array, prompt_lengths: Array, keys: Array,
                limits: Array, options: GenerateOptions, cache: KVCache) -> DecodeState:
  """Prefill right-padded prompts [batch, seq] into an empty cache and draw each row's first
  token (keys [batch], limits [batch] max new tokens per row)."""
  batch = prompt.shape[0]
  _, logits, cache = prefill(model, prompt, prompt_lengths, cache)
  first = sample_tokens(None if options.sampling.greedy else
                        fold_rows(keys, jnp.zeros((batch,), jnp.int32)), logits,
                        options.sampling)  # [batch]
  tokens = jnp.full((batch, options.max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
  done = is_stop(first, options.stop_token_ids) | (limits <= 1)
  return DecodeState(jnp.int32(0), tokens, cache, first, done, jnp.ones((batch,), jnp.int32),
                     limits.astype(jnp.int32), keys)


def finish_reasons(tokens: Array, num: Array, stop_token_ids: tuple[int, ...]) -> Array:
  """[batch] FINISH_STOP when a row's last token is a stop token, else FINISH_LENGTH."""
  last_tok = jnp.take_along_axis(tokens, jnp.maximum(num - 1, 0)[:, None], axis=1)[:, 0]
  return jnp.where(is_stop(last_tok, stop_token_ids), FINISH_STOP, FINISH_LENGTH
                   ).astype(jnp.int32)


def generate(model: Transformer, prompt: Array, prompt_lengths: Array, rng: Array,
             options: GenerateOptions, mesh=None, rules: ShardingRules | None = None,
             limits: Array | None = None) -> GenerateOutput:
  """Prefill, then decode until every row hit a stop token or its limit (traceable).

  rng: [batch] PRNG keys, one per row (one key is split into one per row); limits: [batch]
  max new tokens per row (default options.max_new_tokens)."""
  batch = prompt.shape[0]
  max_new = options.max_new_tokens
  keys = jax.random.split(rng, batch) if jnp.ndim(rng) == 0 else rng
  limits = jnp.full((batch,), max_new, jnp.int32) if limits is None else limits
  cache = KVCache.create(model.cfg, batch, options.cache_len)
  cache = constrain_cache(cache, mesh, rules or ShardingRules())
  state = first_state(model, prompt, prompt_lengths, keys, limits, options, cache)
  state = jax.lax.while_loop(lambda s: (s.step < max_new - 1) & ~jnp.all(s.done),
                             lambda s: decode_step(model, s, options), state)
  return GenerateOutput(state.tokens, state.num,
                        finish_reasons(state.tokens, state.num, options.stop_token_ids))


def prompt_shardings(mesh, rules: ShardingRules, batch: int
                     ) -> tuple[NamedSharding, NamedSharding]:
  """(prompt [batch, seq], lengths [batch]) shardings: batch over the data axes."""
  return (rules.sharding(mesh, LOGICAL_LAYOUTS["act_tokens"], (batch, 1)),
          rules.sharding(mesh, LOGICAL_LAYOUTS["batch_vector"], (batch,)))


def default_row_seeds(seed: int, batch: int) -> np.ndarray:
  """[batch] int32 per-row seeds derived from one call seed (rows of a call differ)."""
  return (np.random.SeedSequence([int(seed), 0x5EED]).generate_state(batch) >> 1
          ).astype(np.int32)


def place_prompts(prompt: np.ndarray, lengths: np.ndarray, row_seeds: np.ndarray, mesh,
                  rules: ShardingRules, limits: np.ndarray | None = None,
                  max_new_tokens: int = 1) -> tuple[Array, Array, Array, Array]:
  """Checks right-padded prompts and places (prompt, lengths, row seeds, row limits) on the
  mesh, from every process alike. row_seeds [batch] int32 seed each row's PRNG key; limits
  [batch] cap each row's new tokens (default max_new_tokens)."""
  prompt = np.asarray(prompt, np.int32)
  lengths = np.asarray(lengths, np.int32)
  if prompt.ndim != 2 or lengths.shape != prompt.shape[:1]:
    raise ValueError(f"prompt must be [batch, seq] and lengths [batch], got {prompt.shape} "
                     f"and {lengths.shape}")
  if lengths.min() < 1 or lengths.max() > prompt.shape[1]:
    raise ValueError(f"prompt lengths must be in 1..{prompt.shape[1]}, got {lengths.tolist()}")
  batch = prompt.shape[0]
  row_seeds = np.broadcast_to(np.asarray(row_seeds, np.int32), (batch,))
  limits = np.broadcast_to(np.asarray(max_new_tokens if limits is None else limits, np.int32),
                           (batch,))
  if limits.min() < 1 or limits.max() > max_new_tokens:
    raise ValueError(f"row limits must be in 1..{max_new_tokens}, got {limits.tolist()}")
  tok_sh, vec_sh = prompt_shardings(mesh, rules, batch)
  return (host_to_global(prompt, tok_sh), host_to_global(lengths, vec_sh),
          host_to_global(np.ascontiguousarray(row_seeds), vec_sh),
          host_to_global(np.ascontiguousarray(limits), vec_sh))


class VanillaGenerator:
  """Compiled vanilla generation for one (graphdef, params, mesh); reusable across calls.

  >>> gen = VanillaGenerator(graphdef, params, mesh)
  >>> out = gen(prompt_np, lengths_np, GenerateOptions(max_new_tokens=32), seed=0)
  """

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, mesh,
               rules: ShardingRules | None = None):
    self.graphdef, self.params, self.mesh = graphdef, params, mesh
    self.rules = rules or ShardingRules()
    self._compiled = {}

  def _fn(self, options: GenerateOptions, batch: int):
    key = (options, batch)
    if key not in self._compiled:
      mesh, rules, graphdef = self.mesh, self.rules, self.graphdef
      param_sh = jax.tree.map(lambda x: x.sharding, self.params)
      tok_sh, vec_sh = prompt_shardings(mesh, rules, batch)
      rep = replicated(mesh)

      def run(params, prompt, lengths, seeds, limits):
        model = nnx.merge(graphdef, params)
        return generate(model, prompt, lengths, row_keys(seeds), options, mesh, rules, limits)

      self._compiled[key] = jax.jit(
          run, in_shardings=(param_sh, tok_sh, vec_sh, vec_sh, vec_sh),
          out_shardings=GenerateOutput(rep, rep, rep))
    return self._compiled[key]

  def __call__(self, prompt: np.ndarray, lengths: np.ndarray, options: GenerateOptions,
               seed: int = 0, row_seeds: np.ndarray | None = None,
               limits: np.ndarray | None = None) -> GenerateOutput:
    """prompt [batch, seq] right-padded int32, lengths [batch]. row_seeds [batch] seed each
    row's sampling (default: derived from `seed` and the row index); limits [batch]: max new
    tokens per row. Returns numpy outputs."""
    batch = np.shape(prompt)[0]
    row_seeds = default_row_seeds(seed, batch) if row_seeds is None else row_seeds
    placed = place_prompts(prompt, lengths, row_seeds, self.mesh, self.rules, limits,
                           options.max_new_tokens)
    need = int(np.max(lengths)) + options.max_new_tokens
    if need > options.cache_len or np.shape(prompt)[1] > options.cache_len:
      raise ValueError(
          f"cache_len={options.cache_len} is too small for prompts of {int(np.max(lengths))} "
          f"tokens plus max_new_tokens={options.max_new_tokens} (needs {need})")
    out = self._fn(options, batch)(self.params, *placed)
    return GenerateOutput(*(to_host(x) for x in out))


# ------------------------------------------------------------- continuous batching (slots)


def run_steps(model: Transformer, state: DecodeState, budget: Array, options: GenerateOptions,
              span: int) -> DecodeState:
  """Up to `budget` decode steps (traceable; one host visit), leaving early when a row
  finishes or a live row would outgrow the attention span `span` (static)."""
  done0 = state.done  # [batch]: rows already finished (or idle) at the visit's start

  def cond(s: DecodeState):
    longest = jnp.max(jnp.where(s.done, 0, s.cache.lengths))
    return ((s.step < budget) & ~jnp.all(s.done) & ~jnp.any(s.done & ~done0)
            & (longest < span))

  return jax.lax.while_loop(cond, lambda s: decode_step(model, s, options, span),
                            state._replace(step=jnp.int32(0)))


class VanillaSlots(SlotDecoder):
  """Device-side slot functions of continuous batching for vanilla decoding (slots.SlotDecoder):
  a DecodeState of `batch` slots, each holding one prompt, refilled from a Stage of
  prefilled prompts when its row is done."""

  steps_per_token = 1  # cache slots one decode step may add to a row
  reserve = 1  # slots a step needs beyond a row's length (its own write)

  def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, mesh,
               rules: ShardingRules | None, options: GenerateOptions, batch: int):
    super().__init__()
    self.graphdef, self.params, self.mesh = graphdef, params, mesh
    self.rules = rules or ShardingRules()
    self.options, self.batch = options, batch
    self.cfg = nnx.merge(graphdef, params).cfg

  def _model(self, params) -> Transformer:
    return nnx.merge(self.graphdef, params)

  # ---- slots.SlotDecoder hooks

  def _empty(self, params, cache_len: int) -> DecodeState:
    b, m = self.batch, self.options.max_new_tokens
    return DecodeState(jnp.int32(0), jnp.full((b, m), -1, jnp.int32),
                       KVCache.create(self.cfg, b, cache_len),
                       jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool),
                       jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32),
                       row_keys(jnp.zeros((b,), jnp.int32)))

  def _grow(self, state: DecodeState, cache_len: int) -> DecodeState:
    return state._replace(cache=grow_cache(state.cache, cache_len))

  def _args(self):
    return self.params

  def _init_rows(self, params, prompt, lengths, seeds, limits, cache_len: int) -> DecodeState:
    model = self._model(params)
    cache = KVCache.create(model.cfg, prompt.shape[0], cache_len)
    return first_state(model, prompt, lengths, row_keys(seeds), limits, self.options, cache)

  def _run_inner(self, params, state: DecodeState, steps, span: int) -> DecodeState:
    return run_steps(self._model(params), state, steps, self.options, span)

  @staticmethod
  def _results(state: DecodeState):
    return state.tokens, state.num

  @staticmethod
  def _lengths(state: DecodeState):
    return state.cache.lengths

  @staticmethod
  def _cache_len(state: DecodeState) -> int:
    return state.cache.max_len

  def _finish(self, row) -> tuple[list[int], int, None]:
    tokens, num = row
    ids = [int(t) for t in tokens[:num]]
    stop = bool(ids) and ids[-1] in self.options.stop_token_ids
    return ids, FINISH_STOP if stop else FINISH_LENGTH, None
