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
from fspad_jax.sampling import SamplingParams, sample_tokens
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
  feats, taps, cache = model.features_and_taps(prompt, positions, cache, feature_layers or ())
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
  s = rules.sharding(mesh, LOGICAL_LAYOUTS["kv_cache"], cache.k.shape)
  c = lambda x: jax.lax.with_sharding_constraint(x, s)
  return cache.replace(k=c(cache.k), v=c(cache.v))


class DecodeState(NamedTuple):
  """Vanilla decoding state between tokens (one row per prompt)."""

  step: Array  # scalar int32: next column of `tokens`
  tokens: Array  # [batch, max_new_tokens] int32, -1 padded
  cache: KVCache
  last: Array  # [batch] int32: the newest token, not yet run through the target
  done: Array  # [batch] bool
  num: Array  # [batch] int32: tokens emitted so far
  rng: Array


def decode_step(model: Transformer, state: DecodeState, options: GenerateOptions
                ) -> DecodeState:
  """One target forward over each row's newest token, then sample the next one."""
  step, tokens, cache, last, done, num, rng = state
  positions = cache.lengths[:, None]  # [batch, 1]
  logits, _, cache = model(last[:, None], positions, cache)
  cache = cache.replace(lengths=cache.lengths + (~done).astype(jnp.int32))
  if options.sampling.greedy:
    nxt = sample_tokens(None, logits[:, 0], options.sampling)  # no PRNG work when greedy
  else:
    rng, sub = jax.random.split(rng)
    nxt = sample_tokens(sub, logits[:, 0], options.sampling)
  nxt = jnp.where(done, -1, nxt)
  tokens = tokens.at[:, step].set(nxt)
  num = num + (~done).astype(jnp.int32)
  done = done | is_stop(nxt, options.stop_token_ids) | (num >= options.max_new_tokens)
  return DecodeState(step + 1, tokens, cache, jnp.maximum(nxt, 0), done, num, rng)


def generate(model: Transformer, prompt: Array, prompt_lengths: Array, rng: Array,
             options: GenerateOptions, mesh=None, rules: ShardingRules | None = None
             ) -> GenerateOutput:
  """Prefill, then decode until every row hit a stop token or max_new_tokens (traceable)."""
  batch = prompt.shape[0]
  max_new = options.max_new_tokens
  cache = KVCache.create(model.cfg, batch, options.cache_len)
  cache = constrain_cache(cache, mesh, rules or ShardingRules())
  _, logits, cache = prefill(model, prompt, prompt_lengths, cache)
  rng, sub = jax.random.split(rng)
  first = sample_tokens(sub, logits, options.sampling)  # [batch]
  tokens = jnp.full((batch, max_new), -1, jnp.int32).at[:, 0].set(first)
  done = is_stop(first, options.stop_token_ids) | (max_new <= 1)
  state = DecodeState(jnp.int32(1), tokens, cache, first, done, jnp.ones((batch,), jnp.int32),
                      rng)
  state = jax.lax.while_loop(lambda s: (s.step < max_new) & ~jnp.all(s.done),
                             lambda s: decode_step(model, s, options), state)
  tokens, num = state.tokens, state.num
  last_tok = jnp.take_along_axis(tokens, (num - 1)[:, None], axis=1)[:, 0]
  reason = jnp.where(is_stop(last_tok, options.stop_token_ids), FINISH_STOP, FINISH_LENGTH)
  return GenerateOutput(tokens, num, reason.astype(jnp.int32))


def prompt_shardings(mesh, rules: ShardingRules, batch: int
                     ) -> tuple[NamedSharding, NamedSharding]:
  """(prompt [batch, seq], lengths [batch]) shardings: batch over the data axes."""
  return (rules.sharding(mesh, LOGICAL_LAYOUTS["act_tokens"], (batch, 1)),
          rules.sharding(mesh, LOGICAL_LAYOUTS["batch_vector"], (batch,)))


def place_prompts(prompt: np.ndarray, lengths: np.ndarray, seed: int, mesh,
                  rules: ShardingRules) -> tuple[Array, Array, Array]:
  """Checks right-padded prompts and places (prompt, lengths, PRNG key data) on the mesh,
  from every process alike."""
  prompt = np.asarray(prompt, np.int32)
  lengths = np.asarray(lengths, np.int32)
  if prompt.ndim != 2 or lengths.shape != prompt.shape[:1]:
    raise ValueError(f"prompt must be [batch, seq] and lengths [batch], got {prompt.shape} "
                     f"and {lengths.shape}")
  if lengths.min() < 1 or lengths.max() > prompt.shape[1]:
    raise ValueError(f"prompt lengths must be in 1..{prompt.shape[1]}, got {lengths.tolist()}")
  tok_sh, vec_sh = prompt_shardings(mesh, rules, prompt.shape[0])
  rng = np.asarray(jax.random.key_data(jax.random.key(seed)))
  return (host_to_global(prompt, tok_sh), host_to_global(lengths, vec_sh),
          host_to_global(rng, replicated(mesh)))


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

      def run(params, prompt, lengths, rng_data):
        model = nnx.merge(graphdef, params)
        rng = jax.random.wrap_key_data(rng_data)
        return generate(model, prompt, lengths, rng, options, mesh, rules)

      self._compiled[key] = jax.jit(
          run, in_shardings=(param_sh, tok_sh, vec_sh, rep),
          out_shardings=GenerateOutput(rep, rep, rep))
    return self._compiled[key]

  def __call__(self, prompt: np.ndarray, lengths: np.ndarray, options: GenerateOptions,
               seed: int = 0) -> GenerateOutput:
    """prompt [batch, seq] right-padded int32, lengths [batch]. Returns numpy outputs."""
    placed = place_prompts(prompt, lengths, seed, self.mesh, self.rules)
    need = int(np.max(lengths)) + options.max_new_tokens
    if need > options.cache_len or np.shape(prompt)[1] > options.cache_len:
      raise ValueError(
          f"cache_len={options.cache_len} is too small for prompts of {int(np.max(lengths))} "
          f"tokens plus max_new_tokens={options.max_new_tokens} (needs {need})")
    out = self._fn(options, np.shape(prompt)[0])(self.params, *placed)
    return GenerateOutput(*(to_host(x) for x in out))
