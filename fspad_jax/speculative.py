"""Lossless tree speculative decoding (EAGLE-2 dynamic tree) with FSPAD or EAGLE drafts.

State between steps, per row (n = committed tokens in the target cache):
  * target cache holds t(0..n-1); draft cache holds the draft's inputs for positions
    0..n-1, i.e. (f(j), e(t(j+1))) with true target features;
  * last_token = t(n), the newest token (sampled, not yet run through the target);
  * root_tokens / root_logp = the draft's top-K candidates for t(n+1) and their log-probs,
    and root_feature = its fed-back feature (FSPAD: `regress`; EAGLE: its single output),
    from the draft input at position n-1.

One step (`speculative_step`, all on device, static shapes):
  1. Draft tree. Level 0 = the root candidates. Each further level runs the K frontier nodes
     through the draft in one call at position n + level - 1, each fed its parent's
     feature; they attend to the committed draft prefix plus their own ancestors, whose K/V
     sit in a scratch area at the end of the draft cache ((D-1)*K slots). rerank keeps the
     best total_tokens nodes (fspad_jax.tree).
  2. Verify. One target forward over the T = total_tokens + 1 tree tokens (root = t(n)) at
     positions n + depth with the ancestor mask, writing K/V at slots n..n+T-1; greedy or
     rejection-sampling acceptance (fspad_jax.tree.verify) with the shared sampler.
  3. Commit. The accepted path's K/V are gathered to slots n..n+m (no recomputation); the
     draft runs once over (f(n+i), e(t(n+i+1))), i = 0..m, with the target's true features
     of the accepted tokens, which also yields the next root. Stop tokens inside the run and
     max_new_tokens truncate the output; finished rows stop changing.

Why the output is the target's own: every emitted token is either a draft token the
verifier accepted or the verifier's bonus token. Greedy: a draft token is accepted only if
it equals the target's argmax after the accepted prefix, and the bonus is that argmax, so
the emitted sequence is the target's greedy sequence. Sampling: fspad_jax.tree's rejection
over siblings emits each token with exactly the probability `processed_probs` (the vanilla
sampler's distribution) gives it after the emitted prefix; see tree.verify_sample_with_uniforms.
The draft only changes how many tokens one target forward yields.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fspad_jax import tree as tree_lib
from fspad_jax.draft import Draft, draft_logits
from fspad_jax.generate import (FINISH_LENGTH, FINISH_STOP, is_stop, place_prompts, prefill,
                                prompt_shardings)
from fspad_jax.hot_vocab import DraftVocab, hot_logits, make_draft_vocab
from fspad_jax.model import AttentionInputs, KVCache, Transformer, move_slots, rope_tables
from fspad_jax.sampling import SamplingParams, sample_tokens
from fspad_jax.sharding import ShardingRules, replicated, to_host

Array = jax.Array

FINISH_CACHE_FULL = 2  # the target cache cannot hold another tree


@dataclasses.dataclass(frozen=True)
class SpecOptions:
  """Static settings of one compiled speculative decoder."""

  max_new_tokens: int = 64
  sampling: SamplingParams = SamplingParams()
  stop_token_ids: tuple[int, ...] = ()
  cache_len: int = 512  # target cache slots (the draft gets these plus its scratch area)
  depth: int = 6  # D: draft levels (deepest draft node is at tree depth D)
  top_k: int = 10  # K
  total_tokens: int = 60  # draft nodes kept for verification

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.depth < 1 or self.top_k < 1:
      raise ValueError(f"tree depth and top_k must be >= 1 (got {self.depth}, {self.top_k})")
    max_nodes = tree_lib.num_buffer_nodes(self.top_k, self.depth)
    if not 1 <= self.total_tokens <= max_nodes:
      raise ValueError(f"total_tokens={self.total_tokens} must be in [1, {max_nodes}] for "
                       f"depth={self.depth}, top_k={self.top_k}")

  @property
  def tree_size(self) -> int:
    return self.total_tokens + 1

  @property
  def scratch(self) -> int:
    return max(self.depth - 1, 1) * self.top_k


class SpecState(NamedTuple):
  target_cache: KVCache
  draft_cache: KVCache  # cache_len committed slots + scratch slots at the end
  last_token: Array  # [batch] int32, t(n)
  root_tokens: Array  # [batch, K] int32: the draft's top-K candidates for t(n+1), best first
  root_logp: Array  # [batch, K] float32: their draft log-probs
  root_feature: Array  # [batch, embed]: feature fed back for the level-0 nodes
  output: Array  # [batch, max_new_tokens + D + 1] int32, -1 padded
  num_tokens: Array  # [batch] int32 emitted so far
  done: Array  # [batch] bool
  finish_reason: Array  # [batch] int32
  accept_history: Array  # [batch, max_new_tokens] int32: accepted draft tokens per step, -1
  steps: Array  # [batch] int32: verification steps taken by each row
  step: Array  # scalar int32
  rng: Array


class SpecOutput(NamedTuple):
  tokens: Array  # [batch, max_new_tokens] int32, -1 padded
  num_tokens: Array  # [batch]
  finish_reason: Array  # [batch]
  accept_history: Array  # [batch, max_new_tokens] accepted draft tokens per verify step, -1
  steps: Array  # [batch] verification steps (target forwards after the prefill)


def draft_candidates(target: Transformer, predict: Array, top_k: int,
                     vocab: DraftVocab | None = None, draft: Draft | None = None
                     ) -> tuple[Array, Array]:
  """The draft's top-K next tokens (target ids) and their log-probs ([..., K] each) from its
  `predict` feature [..., embed] (tree.top_candidates: no vocabulary-wide log-softmax). With a
  hot vocabulary, over its N logits only, mapped back to target ids. A draft with its own LM
  head ('eagle3') scores with that head (over vocab.ids when it has a hot vocabulary)."""
  if draft is not None and draft.cfg.own_head:
    tokens, logp = tree_lib.top_candidates(draft.logits(predict), top_k)
    return (tokens if vocab is None else jnp.take(vocab.ids, tokens)), logp
  if vocab is None:
    return tree_lib.top_candidates(draft_logits(target, predict), top_k)
  tokens, logp = tree_lib.top_candidates(hot_logits(vocab, predict, target.cfg.dtype), top_k)
  return jnp.take(vocab.ids, tokens), logp


def draft_prefill(draft: Draft, target: Transformer, features: Array, prompt: Array,
                  prompt_lengths: Array, first_token: Array, cache: KVCache, top_k: int,
                  vocab: DraftVocab | None = None) -> tuple[Array, Array, Array, KVCache]:
  """Runs the draft over the prompt: position j gets (f(j), e(t(j+1))), where t(len) is the
  first sampled token; features [batch, seq, k*embed] are the target's taps
  (Transformer.features_and_taps with the draft's feature_layers). Returns (root_tokens, root_logp [batch, K], root_feature [batch, embed],
  cache with lengths = prompt_lengths)."""
  batch, seq = prompt.shape
  next_tokens = jnp.concatenate([prompt[:, 1:], prompt[:, -1:]], axis=1)  # [batch, seq]
  last = (prompt_lengths - 1)[:, None]
  next_tokens = jnp.where(jnp.arange(seq)[None] == last, first_token[:, None], next_tokens)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  out = draft(features, target.embed(next_tokens), positions,
              cache.replace(lengths=jnp.zeros_like(prompt_lengths)))
  take = lambda x: jnp.take_along_axis(x, last[:, :, None], axis=1)[:, 0]
  root_tokens, root_logp = draft_candidates(target, take(out.predict), top_k, vocab, draft)
  return root_tokens, root_logp, take(out.regress), out.cache.replace(lengths=prompt_lengths)


def build_tree(draft: Draft, target: Transformer, state: SpecState, options: SpecOptions,
               vocab: DraftVocab | None = None) -> tuple[tree_lib.Tree, KVCache]:
  """EAGLE-2 dynamic draft tree from the state's root. Returns (tree, draft cache with the
  scratch area overwritten)."""
  K, D = options.top_k, options.depth
  cache = state.draft_cache
  batch = state.last_token.shape[0]
  committed = cache.lengths  # [batch] n
  max_len = cache.max_len
  scratch_base = max_len - options.scratch
  layer_cfg = draft.cfg.layer_config

  tokens, scores = state.root_tokens, state.root_logp  # [batch, K]
  buffers = tree_lib.init_buffers(state.last_token, tokens, scores, D)
  frontier_tokens = tokens
  # [batch, K, embed]: the feature each frontier node is fed (its parent's output).
  frontier_feats = jnp.broadcast_to(state.root_feature[:, None],
                                    (batch, K, state.root_feature.shape[-1]))
  ancestors = jnp.zeros((batch, K, options.scratch), bool)  # scratch slots each node sees
  slots = jnp.arange(max_len)
  for level in range(1, D):
    # The level-(level-1) frontier goes through the draft at position n + level - 1.
    positions = jnp.broadcast_to((committed + level - 1)[:, None], (batch, K))
    own = (level - 1) * K + jnp.arange(K)  # scratch index of each frontier slot
    prefix = slots[None, None, :] < committed[:, None, None]  # [batch, 1, max_len]
    # Each node sees its ancestors' scratch slots and its own (written before attending).
    seen = ancestors | (jnp.arange(options.scratch) == own[:, None])[None]  # [b, K, scratch]
    mask = prefix | jnp.pad(seen, ((0, 0), (0, 0), (scratch_base, 0)))  # [batch, K, max_len]
    cos, sin = rope_tables(layer_cfg, positions)
    write_slots = jnp.broadcast_to(scratch_base + own, (batch, K)).astype(jnp.int32)
    x = draft.fuse_inputs(frontier_feats, target.embed(frontier_tokens))
    predict, regress, cache = draft.layer(x, cache, AttentionInputs(cos, sin, mask, write_slots))
    child_tokens, child_logp = draft_candidates(target, predict, K, vocab, draft)  # [b,K,K]
    expansion = tree_lib.expand_candidates(buffers.frontier_scores, child_tokens, child_logp)
    buffers = tree_lib.add_level(buffers, level, expansion)
    parent = expansion.frontier_parent_slots  # [batch, K]
    frontier_tokens = expansion.frontier_tokens
    frontier_feats = jnp.take_along_axis(regress, parent[:, :, None], axis=1)
    parent_anc = jnp.take_along_axis(ancestors, parent[:, :, None], axis=1)
    ancestors = parent_anc | (jnp.arange(options.scratch)[None, None]
                              == ((level - 1) * K + parent)[:, :, None])
  return tree_lib.rerank(buffers, options.total_tokens), cache


def commit_target_cache(cache: KVCache, accepted_nodes: Array, accept_len: Array,
                        active: Array) -> KVCache:
  """Moves the accepted path's K/V from tree slots n + node to slots n + i (i = 0..m) and
  advances lengths by m + 1 for active rows. accepted_nodes: [batch, D+1], root first."""
  n = cache.lengths
  i = jnp.arange(accepted_nodes.shape[1])[None]
  src = n[:, None] + jnp.maximum(accepted_nodes, 0)  # [batch, D+1]
  keep = (i <= accept_len[:, None]) & active[:, None]
  dst = jnp.where(keep, n[:, None] + i, cache.max_len)  # out of range -> dropped
  return move_slots(cache, src, dst, n + jnp.where(active, accept_len + 1, 0))


def speculative_step(draft: Draft, target: Transformer, state: SpecState, options: SpecOptions,
                     vocab: DraftVocab | None = None) -> SpecState:
  """Draft a tree, verify it with one target forward, commit the accepted tokens. vocab: the
  draft's hot vocabulary (None: the full one); verification always uses the full one."""
  batch = state.last_token.shape[0]
  n = state.target_cache.lengths
  active = ~state.done
  # A row whose cache can't hold another tree stops (never an out-of-bounds write).
  full = n + options.tree_size > state.target_cache.max_len
  finish_reason = jnp.where(active & full, FINISH_CACHE_FULL, state.finish_reason)
  active = active & ~full
  done = state.done | full

  tree, draft_cache = build_tree(draft, target, state, options, vocab)
  positions = n[:, None] + tree.depths  # [batch, T]
  # One target pass: the final feature (verification) and the draft's feature layers (commit).
  feats, taps, target_cache = target.features_and_taps(
      tree.tokens, positions, state.target_cache, draft.cfg.feature_layers,
      block_mask=tree.ancestor_mask)  # taps: [batch, T, k*embed]
  logits = target.logits(feats)
  if options.sampling.greedy:  # no PRNG work in greedy steps
    rng, verify_rng = state.rng, None
  else:
    rng, verify_rng = jax.random.split(state.rng)
  result = tree_lib.verify(tree, logits, options.sampling, verify_rng)
  target_cache = commit_target_cache(target_cache, result.accepted_nodes, result.accept_len,
                                     active)

  # Draft commit: (f(n+i), e(t(n+i+1))) for i = 0..m at positions n+i, with the target's
  # true (tapped, fused by the draft) features of the accepted tokens.
  width = options.depth + 1
  node = jnp.maximum(result.accepted_nodes, 0)  # [batch, D+1]
  path_feats = jnp.take_along_axis(taps, node[:, :, None], axis=1)  # [batch, D+1, k*embed]
  path_next = jnp.maximum(result.output_tokens, 0)  # [batch, D+1]
  draft_positions = n[:, None] + jnp.arange(width)[None]
  valid = (jnp.arange(width)[None] <= result.accept_len[:, None]) & active[:, None]
  write_slots = jnp.where(valid, draft_positions, draft_cache.max_len)  # pad/inactive: drop
  out = draft(path_feats, target.embed(path_next), draft_positions,
              draft_cache.replace(lengths=n), write_slots=write_slots)
  take_last = lambda x: jnp.take_along_axis(x, result.accept_len[:, None, None], axis=1)[:, 0]
  next_tokens, next_logp = draft_candidates(target, take_last(out.predict), options.top_k,
                                           vocab, draft)
  root_tokens = jnp.where(active[:, None], next_tokens, state.root_tokens)
  root_logp = jnp.where(active[:, None], next_logp, state.root_logp)
  root_feature = jnp.where(active[:, None], take_last(out.regress), state.root_feature)
  draft_cache = out.cache.replace(lengths=n + jnp.where(active, result.accept_len + 1, 0))

  # Emit the accepted tokens + bonus, truncated at a stop token or max_new_tokens.
  new = result.output_tokens  # [batch, D+1]
  emitted = jnp.arange(width)[None] <= result.accept_len[:, None]
  stops = is_stop(new, options.stop_token_ids) & emitted
  first_stop = jnp.where(jnp.any(stops, 1), jnp.argmax(stops, 1), width)
  count = jnp.minimum(jnp.minimum(result.accept_len + 1, first_stop + 1),
                      options.max_new_tokens - state.num_tokens)
  count = jnp.where(active, count, 0)
  write = jnp.where(jnp.arange(width)[None] < count[:, None],
                    state.num_tokens[:, None] + jnp.arange(width)[None], state.output.shape[1])
  output = state.output.at[jnp.arange(batch)[:, None], write].set(new, mode="drop")
  num_tokens = state.num_tokens + count
  hit_stop = active & jnp.any(stops & (jnp.arange(width)[None] < count[:, None]), axis=1)
  hit_len = active & (num_tokens >= options.max_new_tokens)
  finish_reason = jnp.where(hit_stop, FINISH_STOP,
                            jnp.where(hit_len, FINISH_LENGTH, finish_reason))
  last_token = jnp.where(active, take_last(new[:, :, None])[:, 0], state.last_token)
  history = state.accept_history.at[:, state.step].set(
      jnp.where(active, result.accept_len, -1), mode="drop")
  return SpecState(
      target_cache=target_cache, draft_cache=draft_cache, last_token=last_token,
      root_tokens=root_tokens, root_logp=root_logp, root_feature=root_feature, output=output,
      num_tokens=num_tokens,
      done=done | hit_stop | hit_len, finish_reason=finish_reason, accept_history=history,
      steps=state.steps + active.astype(jnp.int32), step=state.step + 1, rng=rng)


def init_state(draft: Draft, target: Transformer, prompt: Array, prompt_lengths: Array,
               rng: Array, options: SpecOptions, vocab: DraftVocab | None = None) -> SpecState:
  """Target and draft prefill, and the first token (sampled from the target)."""
  batch = prompt.shape[0]
  target_cache = KVCache.create(target.cfg, batch, options.cache_len)
  feats, logits, target_cache = prefill(target, prompt, prompt_lengths, target_cache,
                                        feature_layers=draft.cfg.feature_layers)
  rng, sub = jax.random.split(rng)
  first = sample_tokens(sub, logits, options.sampling)  # [batch]
  draft_cache = KVCache.create(draft.cfg.layer_config, batch,
                               options.cache_len + options.scratch)
  root_tokens, root_logp, root_feature, draft_cache = draft_prefill(
      draft, target, feats, prompt, prompt_lengths, first, draft_cache, options.top_k, vocab)
  output = jnp.full((batch, options.max_new_tokens + options.depth + 1), -1, jnp.int32)
  output = output.at[:, 0].set(first)
  stop = is_stop(first, options.stop_token_ids)
  done = stop | (options.max_new_tokens <= 1)
  return SpecState(
      target_cache=target_cache, draft_cache=draft_cache, last_token=first,
      root_tokens=root_tokens, root_logp=root_logp, root_feature=root_feature, output=output,
      num_tokens=jnp.ones((batch,), jnp.int32), done=done,
      finish_reason=jnp.where(stop, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
      accept_history=jnp.full((batch, options.max_new_tokens), -1, jnp.int32),
      steps=jnp.zeros((batch,), jnp.int32), step=jnp.int32(0), rng=rng)


def speculative_generate(draft: Draft, target: Transformer, prompt: Array,
                         prompt_lengths: Array, rng: Array, options: SpecOptions,
                         vocab: DraftVocab | None = None) -> SpecOutput:
  """Prefill, then speculative steps until every row is done (traceable; loop on device)."""
  state = init_state(draft, target, prompt, prompt_lengths, rng, options, vocab)
  state = jax.lax.while_loop(
      lambda s: ~jnp.all(s.done) & (s.step < options.max_new_tokens),
      lambda s: speculative_step(draft, target, s, options, vocab), state)
  return SpecOutput(state.output[:, :options.max_new_tokens], state.num_tokens,
                    state.finish_reason, state.accept_history, state.steps)


class SpeculativeGenerator:
  """Compiled speculative generation for one (target, draft, mesh); reusable across calls.

  >>> gen = SpeculativeGenerator(target_graphdef, target_params, draft_graphdef,
  ...                            draft_params, mesh)
  >>> out = gen(prompt_np, lengths_np, SpecOptions(max_new_tokens=64), seed=0)

  hot_ids: the draft's hot vocabulary (fspad_jax.hot_vocab), or None for the full one; the
  LM head is sliced to those rows once, here (and quantized when weight_dtype is "int8":
  pass a draft quantized by fspad_jax.quant.quantize_draft with it).
  """

  def __init__(self, target_graphdef, target_params, draft_graphdef, draft_params, mesh,
               rules: ShardingRules | None = None, hot_ids: np.ndarray | None = None,
               weight_dtype: str = ""):
    self.target_graphdef, self.target_params = target_graphdef, target_params
    self.draft_graphdef, self.draft_params = draft_graphdef, draft_params
    self.mesh, self.rules = mesh, rules or ShardingRules()
    self.vocab = None
    draft_cfg = nnx.merge(draft_graphdef, draft_params).cfg
    own_head = draft_cfg.own_head
    if own_head and draft_cfg.hot_vocab_size != (0 if hot_ids is None else len(hot_ids)):
      raise ValueError(f"an 'eagle3' draft with a {draft_cfg.head_vocab_size}-row LM head needs "
                       f"{draft_cfg.hot_vocab_size or 'no'} hot ids, got "
                       f"{'none' if hot_ids is None else len(hot_ids)}")
    if hot_ids is not None and own_head:  # the draft scores with its own head: ids only
      ids = np.asarray(hot_ids, np.int32)
      self.vocab = DraftVocab(jax.device_put(ids, replicated(mesh)) if mesh is not None
                              else jax.device_put(ids), None)
    elif hot_ids is not None:
      self.vocab = jax.jit(lambda p, ids: make_draft_vocab(
          nnx.merge(target_graphdef, p), ids, weight_dtype))(
              target_params, np.asarray(hot_ids, np.int32))
    self._compiled = {}

  def _fn(self, options: SpecOptions, batch: int):
    key = (options, batch)
    if key not in self._compiled:
      tg, dg = self.target_graphdef, self.draft_graphdef
      tok_sh, vec_sh = prompt_shardings(self.mesh, self.rules, batch)
      rep = replicated(self.mesh)

      def run(target_params, draft_params, vocab, prompt, lengths, rng_data):
        target = nnx.merge(tg, target_params)
        draft = nnx.merge(dg, draft_params)
        return speculative_generate(draft, target, prompt, lengths,
                                    jax.random.wrap_key_data(rng_data), options, vocab)

      shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      self._compiled[key] = jax.jit(
          run, in_shardings=(shardings(self.target_params), shardings(self.draft_params),
                             shardings(self.vocab), tok_sh, vec_sh, rep),
          out_shardings=SpecOutput(rep, rep, rep, rep, rep))
    return self._compiled[key]

  def __call__(self, prompt: np.ndarray, lengths: np.ndarray, options: SpecOptions,
               seed: int = 0) -> SpecOutput:
    """prompt [batch, seq] right-padded int32, lengths [batch]. Returns numpy outputs."""
    if np.shape(prompt)[1] > options.cache_len:
      raise ValueError(f"prompts of {np.shape(prompt)[1]} tokens do not fit cache_len="
                       f"{options.cache_len}")
    placed = place_prompts(prompt, lengths, seed, self.mesh, self.rules)
    out = self._fn(options, np.shape(prompt)[0])(self.target_params, self.draft_params,
                                                 self.vocab, *placed)
    return SpecOutput(*(to_host(x) for x in out))


def make_step_fn(target_graphdef, draft_graphdef, options: SpecOptions):
  """One speculative step as its own jit, state donated: (target_params, draft_params,
  state, vocab=None) -> state. For step-wise control (serving loops, benchmarks);
  `SpeculativeGenerator` runs the same step inside one on-device loop instead."""
  def step(target_params, draft_params, state, vocab=None):
    return speculative_step(nnx.merge(draft_graphdef, draft_params),
                            nnx.merge(target_graphdef, target_params), state, options, vocab)
  return jax.jit(step, donate_argnames=("state",))


def cache_len_for(prompt_len: int, options: SpecOptions) -> int:
  """Target cache slots that never run out: prompt + max_new_tokens + one tree + a run."""
  return prompt_len + options.max_new_tokens + options.tree_size + options.depth + 1
