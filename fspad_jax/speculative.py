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
from fspad_jax.generate import (FINISH_LENGTH, FINISH_STOP, default_row_seeds, is_stop,
                                place_prompts, prefill, prompt_shardings)
from fspad_jax.hot_vocab import DraftVocab, hot_logits, make_draft_vocab
from fspad_jax.model import AttentionInputs, KVCache, Transformer, move_slots, rope_tables
from fspad_jax.sampling import SamplingParams, fold_rows, row_keys, sample_tokens
from fspad_jax.sharding import ShardingRules, replicated, to_host
from fspad_jax.slots import SlotDecoder, grow_cache

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
  steps: Array  # [batch] int32: verification steps taken by each row (its history column)
  step: Array  # scalar int32: steps taken by this loop
  limit: Array  # [batch] int32: this row's max new tokens (<= max_new_tokens)
  keys: Array  # [batch] PRNG keys, one per row: the first token draws with fold_in(key, 0),
  #              verify step k (0-based, per row) with fold_in(key, k + 1)


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
  frontier_tokens, frontier_scores = tokens, scores
  # [batch, K, embed]: the feature each frontier node is fed (its parent's output).
  frontier_feats = jnp.broadcast_to(state.root_feature[:, None],
                                    (batch, K, state.root_feature.shape[-1]))
  # Per-step constants, built once for all levels: RoPE at positions n + level - 1
  # ([batch, D-1, head_dim]).
  cos_all, sin_all = rope_tables(layer_cfg, committed[:, None] + jnp.arange(max(D - 1, 1)))
  slot_ids = np.arange(max_len)  # [max_len]
  own_slots = lambda level: scratch_base + (level - 1) * K + np.arange(K)  # [K]
  # Which cache slots each frontier node sees: the committed prefix, its ancestors' scratch
  # slots and its own (written before attending); a child inherits its parent's row.
  mask = ((slot_ids < committed[:, None, None])
          | (slot_ids == own_slots(1)[:, None])[None])  # [batch, K, max_len]
  expansions = []
  for level in range(1, D):
    # The level-(level-1) frontier goes through the draft at position n + level - 1; its
    # K/V go to the contiguous scratch slots own_slots(level) (the same for every row).
    cos = jnp.broadcast_to(cos_all[:, level - 1, None], (batch, K, cos_all.shape[-1]))
    sin = jnp.broadcast_to(sin_all[:, level - 1, None], (batch, K, sin_all.shape[-1]))
    write_slots = jnp.broadcast_to(jnp.asarray(own_slots(level), jnp.int32), (batch, K))
    x = draft.fuse_inputs(frontier_feats, target.embed(frontier_tokens))
    predict, regress, cache = draft.layer(
        x, cache, AttentionInputs(cos, sin, mask, write_slots,
                                  write_start=int(own_slots(level)[0])))
    child_tokens, child_logp = draft_candidates(target, predict, K, vocab, draft)  # [b,K,K]
    expansion = tree_lib.expand_candidates(frontier_scores, child_tokens, child_logp)
    expansions.append(expansion)
    parent = expansion.frontier_parent_slots  # [batch, K]
    frontier_tokens, frontier_scores = expansion.frontier_tokens, expansion.frontier_scores
    frontier_feats = jnp.take_along_axis(regress, parent[:, :, None], axis=1)
    if level + 1 < D:
      mask = (jnp.take_along_axis(mask, parent[:, :, None], axis=1)
              | (slot_ids == own_slots(level + 1)[:, None])[None])
  buffers = tree_lib.assemble_buffers(state.last_token, tokens, scores, expansions, D)
  # Child score = parent score + a cleaned log-prob: already monotone along every path.
  return tree_lib.rerank(buffers, options.total_tokens, monotone=True), cache


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


def verify_rows(tree: tree_lib.Tree, logits: Array, sampling: SamplingParams, keys: Array
                ) -> tree_lib.Verification:
  """tree_lib.verify with each row's randomness drawn from its own key (keys [batch]), so a
  row's result does not depend on its batch slot or neighbours; greedy draws nothing."""
  if sampling.greedy:
    return tree_lib.verify_greedy(tree, logits)

  def uniforms(key):
    accept_key, residual_key = jax.random.split(key)
    return (jax.random.uniform(accept_key, (tree.depth + 1, tree.top_k)),
            jax.random.uniform(residual_key, (tree.depth + 1,)))

  accept_u, residual_u = jax.vmap(uniforms)(keys)  # [batch, D+1, K], [batch, D+1]
  return tree_lib.verify_sample_with_uniforms(tree, logits, sampling, accept_u, residual_u)


def speculative_step(draft: Draft, target: Transformer, state: SpecState, options: SpecOptions,
                     vocab: DraftVocab | None = None, span: int | None = None) -> SpecState:
  """Draft a tree, verify it with one target forward, commit the accepted tokens. vocab: the
  draft's hot vocabulary (None: the full one); verification always uses the full one. span:
  the target's attention span (static; every live row's length + tree size fits below it)."""
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
      block_mask=tree.ancestor_mask, span=span)  # taps: [batch, T, k*embed]
  logits = target.logits(feats)
  # No PRNG work in greedy steps.
  verify_keys = None if options.sampling.greedy else fold_rows(state.keys, state.steps + 1)
  result = verify_rows(tree, logits, options.sampling, verify_keys)
  target_cache = commit_target_cache(target_cache, result.accepted_nodes, result.accept_len,
                                     active)

  # Draft commit: (f(n+i), e(t(n+i+1))) for i = 0..m at positions n+i, with the target's
  # true (tapped, fused by the draft) features of the accepted tokens.
  width = options.depth + 1
  node = jnp.maximum(result.accepted_nodes, 0)  # [batch, D+1]
  path_feats = jnp.take_along_axis(taps, node[:, :, None], axis=1)  # [batch, D+1, k*embed]
  path_next = jnp.maximum(result.output_tokens, 0)  # [batch, D+1]
  draft_positions = n[:, None] + jnp.arange(width)[None]
  # All D+1 inputs are written right after the prefix (the causal fast path): slots past a
  # row's new length (padding beyond accept_len, and inactive rows) lie beyond its
  # committed prefix, which no query reads; later commits overwrite them.
  out = draft(path_feats, target.embed(path_next), draft_positions,
              draft_cache.replace(lengths=n))
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
                      state.limit - state.num_tokens)
  count = jnp.where(active, count, 0)
  write = jnp.where(jnp.arange(width)[None] < count[:, None],
                    state.num_tokens[:, None] + jnp.arange(width)[None], state.output.shape[1])
  output = state.output.at[jnp.arange(batch)[:, None], write].set(new, mode="drop")
  num_tokens = state.num_tokens + count
  hit_stop = active & jnp.any(stops & (jnp.arange(width)[None] < count[:, None]), axis=1)
  hit_len = active & (num_tokens >= state.limit)
  finish_reason = jnp.where(hit_stop, FINISH_STOP,
                            jnp.where(hit_len, FINISH_LENGTH, finish_reason))
  last_token = jnp.where(active, take_last(new[:, :, None])[:, 0], state.last_token)
  history = state.accept_history.at[jnp.arange(batch), jnp.where(
      active, state.steps, state.accept_history.shape[1])].set(result.accept_len, mode="drop")
  return SpecState(
      target_cache=target_cache, draft_cache=draft_cache, last_token=last_token,
      root_tokens=root_tokens, root_logp=root_logp, root_feature=root_feature, output=output,
      num_tokens=num_tokens,
      done=done | hit_stop | hit_len, finish_reason=finish_reason, accept_history=history,
      steps=state.steps + active.astype(jnp.int32), step=state.step + 1, limit=state.limit,
      keys=state.keys)


def init_state(draft: Draft, target: Transformer, prompt: Array, prompt_lengths: Array,
               rng: Array, options: SpecOptions, vocab: DraftVocab | None = None,
               limits: Array | None = None) -> SpecState:
  """Target and draft prefill, and the first token (sampled from the target). rng: [batch]
  PRNG keys, one per row (one key is split into one per row); limits: [batch] max new
  tokens per row (default options.max_new_tokens)."""
  batch = prompt.shape[0]
  keys = jax.random.split(rng, batch) if jnp.ndim(rng) == 0 else rng
  limits = (jnp.full((batch,), options.max_new_tokens, jnp.int32) if limits is None
            else limits.astype(jnp.int32))
  target_cache = KVCache.create(target.cfg, batch, options.cache_len)
  feats, logits, target_cache = prefill(target, prompt, prompt_lengths, target_cache,
                                        feature_layers=draft.cfg.feature_layers)
  first = sample_tokens(None if options.sampling.greedy else
                        fold_rows(keys, jnp.zeros((batch,), jnp.int32)), logits,
                        options.sampling)  # [batch]
  draft_cache = KVCache.create(draft.cfg.layer_config, batch,
                               options.cache_len + options.scratch)
  root_tokens, root_logp, root_feature, draft_cache = draft_prefill(
      draft, target, feats, prompt, prompt_lengths, first, draft_cache, options.top_k, vocab)
  output = jnp.full((batch, options.max_new_tokens + options.depth + 1), -1, jnp.int32)
  output = output.at[:, 0].set(first)
  stop = is_stop(first, options.stop_token_ids)
  done = stop | (limits <= 1)
  return SpecState(
      target_cache=target_cache, draft_cache=draft_cache, last_token=first,
      root_tokens=root_tokens, root_logp=root_logp, root_feature=root_feature, output=output,
      num_tokens=jnp.ones((batch,), jnp.int32), done=done,
      finish_reason=jnp.where(stop, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32),
      accept_history=jnp.full((batch, options.max_new_tokens), -1, jnp.int32),
      steps=jnp.zeros((batch,), jnp.int32), step=jnp.int32(0), limit=limits, keys=keys)


def speculative_generate(draft: Draft, target: Transformer, prompt: Array,
                         prompt_lengths: Array, rng: Array, options: SpecOptions,
                         vocab: DraftVocab | None = None, limits: Array | None = None
                         ) -> SpecOutput:
  """Prefill, then speculative steps until every row is done (traceable; loop on device)."""
  state = init_state(draft, target, prompt, prompt_lengths, rng, options, vocab, limits)
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

      def run(target_params, draft_params, vocab, prompt, lengths, seeds, limits):
        target = nnx.merge(tg, target_params)
        draft = nnx.merge(dg, draft_params)
        return speculative_generate(draft, target, prompt, lengths, row_keys(seeds), options,
                                    vocab, limits)

      shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
      self._compiled[key] = jax.jit(
          run, in_shardings=(shardings(self.target_params), shardings(self.draft_params),
                             shardings(self.vocab), tok_sh, vec_sh, vec_sh, vec_sh),
          out_shardings=SpecOutput(rep, rep, rep, rep, rep))
    return self._compiled[key]

  def __call__(self, prompt: np.ndarray, lengths: np.ndarray, options: SpecOptions,
               seed: int = 0, row_seeds: np.ndarray | None = None,
               limits: np.ndarray | None = None) -> SpecOutput:
    """prompt [batch, seq] right-padded int32, lengths [batch]; row_seeds and limits as in
    VanillaGenerator. Returns numpy outputs."""
    if np.shape(prompt)[1] > options.cache_len:
      raise ValueError(f"prompts of {np.shape(prompt)[1]} tokens do not fit cache_len="
                       f"{options.cache_len}")
    batch = np.shape(prompt)[0]
    row_seeds = default_row_seeds(seed, batch) if row_seeds is None else row_seeds
    placed = place_prompts(prompt, lengths, row_seeds, self.mesh, self.rules, limits,
                           options.max_new_tokens)
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


# ------------------------------------------------------------- continuous batching (slots)


def run_spec_steps(draft: Draft, target: Transformer, state: SpecState, budget: Array,
                   options: SpecOptions, vocab: DraftVocab | None, span: int) -> SpecState:
  """Up to `budget` speculative steps (traceable; one host visit), leaving early when a row
  finishes or a live row's next tree would not fit below the attention span `span`."""
  done0 = state.done  # [batch]

  def cond(s: SpecState):
    longest = jnp.max(jnp.where(s.done, 0, s.target_cache.lengths))
    return ((s.step < budget) & ~jnp.all(s.done) & ~jnp.any(s.done & ~done0)
            & (longest + options.tree_size <= span))

  return jax.lax.while_loop(
      cond, lambda s: speculative_step(draft, target, s, options, vocab, span),
      state._replace(step=jnp.int32(0)))


class SpecSlots(SlotDecoder):
  """Device-side slot functions of continuous batching for speculative decoding (the
  counterpart of generate.VanillaSlots, slots.SlotDecoder): a SpecState of `batch` slots."""

  def __init__(self, generator: SpeculativeGenerator, options: SpecOptions, batch: int):
    super().__init__()
    self.gen, self.options, self.batch = generator, options, batch
    self.mesh, self.rules = generator.mesh, generator.rules
    self.steps_per_token = options.depth + 1  # cache slots one step may add to a row
    self.reserve = options.tree_size  # slots a step needs beyond a row's length
    self.cfg = nnx.merge(generator.target_graphdef, generator.target_params).cfg

  def _models(self, tp, dp) -> tuple[Transformer, Draft]:
    return nnx.merge(self.gen.target_graphdef, tp), nnx.merge(self.gen.draft_graphdef, dp)

  def _options(self, cache_len: int) -> SpecOptions:
    return dataclasses.replace(self.options, cache_len=cache_len)

  def _init(self, tp, dp, vocab, prompt, lengths, seeds, limits, cache_len):
    target, draft = self._models(tp, dp)
    return init_state(draft, target, prompt, lengths, row_keys(seeds), self._options(cache_len),
                      vocab, limits)

  # ---- slots.SlotDecoder hooks

  def _empty(self, args, cache_len: int) -> SpecState:
    """Every slot idle (done), from a dummy one-token prefill of each row."""
    b = self.batch
    state = self._init(*args, jnp.zeros((b, 1), jnp.int32), jnp.ones((b,), jnp.int32),
                       jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32), cache_len)
    return state._replace(done=jnp.ones((b,), bool), target_cache=state.target_cache.replace(
        lengths=jnp.zeros((b,), jnp.int32)))

  def _grow(self, state: SpecState, cache_len: int) -> SpecState:
    """Both caches grown by the same number of slots (the draft's scratch area moves to its
    new end; it is rewritten by every step)."""
    extra = cache_len - state.target_cache.max_len
    return state._replace(target_cache=grow_cache(state.target_cache, cache_len),
                          draft_cache=grow_cache(state.draft_cache,
                                                 state.draft_cache.max_len + extra))

  def _args(self):
    return self.gen.target_params, self.gen.draft_params, self.gen.vocab

  def _init_rows(self, args, prompt, lengths, seeds, limits, cache_len: int) -> SpecState:
    return self._init(*args, prompt, lengths, seeds, limits, cache_len)

  def _run_inner(self, args, state: SpecState, steps, span: int) -> SpecState:
    tp, dp, vocab = args
    target, draft = self._models(tp, dp)
    return run_spec_steps(draft, target, state, steps,
                          self._options(state.target_cache.max_len), vocab, span)

  @staticmethod
  def _results(state: SpecState):
    return state.output, state.num_tokens, state.finish_reason, state.accept_history

  @staticmethod
  def _lengths(state: SpecState):
    return state.target_cache.lengths

  @staticmethod
  def _cache_len(state: SpecState) -> int:
    return state.target_cache.max_len

  @staticmethod
  def _finish(row) -> tuple[list[int], int, list[int]]:
    tokens, num, reason, history = row
    return ([int(t) for t in tokens[:num]], int(reason), [int(a) for a in history if a >= 0])
