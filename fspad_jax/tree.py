"""Model-independent pieces of tree speculative decoding: the EAGLE-2 dynamic draft tree and
its lossless verification. Pure JAX, static shapes, batched over rows, jit-able.

Sizes: K = `top_k` (children per node and frontier width), D = `depth` (draft levels; tree
depth of the deepest draft node), T = total_tokens + 1 (tree nodes including the root).

Drafting (the caller runs the draft model; these functions only keep the books):

  tokens, scores = root_level(root_logp, K)                      # level 0, depth 1
  buffers = init_buffers(root_token, tokens, scores, D)
  frontier_tokens = tokens                                       # [batch, K]
  for level in 1 .. D-1:
    child_logp = draft(frontier_tokens, ...)                     # [batch, K, vocab]
    expansion = expand_level(buffers.frontier_scores, child_logp, K)
    buffers = add_level(buffers, level, expansion)
    frontier_tokens = expansion.frontier_tokens                  # fed at the next level;
    # their draft inputs come from frontier row expansion.frontier_parent_slots
  tree = rerank(buffers, total_tokens)
  # target forward over tree.tokens at positions prefix_len + tree.depths with
  # tree.ancestor_mask as the in-block mask -> target_logits [batch, T, vocab]
  result = verify(tree, target_logits, sampling, rng)

The decoder builds the same buffers in one pass (`assemble_buffers` over the levels'
`expand_candidates` outputs: one concatenate per field) and reranks with monotone=True;
the incremental form above is its reference (tests/test_tree.py compares them).

`expand_level` keeps, as in EAGLE-2, the top-K children of *every* frontier node as rerank
candidates (K*K per level), while only the global top-K of those become the next frontier and
get expanded. Buffer layout (level-major, so buffer index order is depth order):
  level 0:      ids [0, K): the root's top-K children, best first; frontier slot = id.
  level l >= 1: ids K + (l-1)*K*K + c, c in [0, K*K): child rank c % K of frontier slot c // K
                of level l-1.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fspad_jax.sampling import SamplingParams, processed_probs

Array = jax.Array


def _clean_log_probs(logp: Array) -> Array:
  """NaN -> -inf, anything >= 0 (including -0.0 and float noise) -> +0.0.

  Log-probs are <= 0 by definition; clamping makes child score <= parent score hold exactly
  (IEEE rounding is monotone), and +0.0 only avoids lax.top_k ordering -0.0 below +0.0."""
  logp = logp.astype(jnp.float32)
  return jnp.where(jnp.isnan(logp), -jnp.inf, jnp.where(logp >= 0, 0.0, logp))


def num_buffer_nodes(top_k: int, depth: int) -> int:
  """K + (D-1) * K*K: every node a D-level draft generates."""
  return top_k + (depth - 1) * top_k * top_k


def level_offset(level, top_k: int):
  """Buffer id of the first node of `level` >= 1 (a Python int or a traced scalar)."""
  return top_k + (level - 1) * top_k * top_k


# ----------------------------------------------------------------------------- construction


def top_candidates(logits: Array, top_k: int) -> tuple[Array, Array]:
  """Draft logits [..., vocab] -> their top-K (tokens [..., K] int32, log-probs [..., K]).

  Top-K on the raw logits (log-softmax is monotone), best first, ties to the lower id; the
  log-probs are computed for the kept entries only (logit - logsumexp), so no [..., vocab]
  log-softmax is materialized. NaN logits count as -inf."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.isnan(logits), -jnp.inf, logits)
  values, tokens = jax.lax.top_k(logits, top_k)  # [..., K]
  # logsumexp without jax.nn.logsumexp's guard for an infinite max (one kernel fewer): an
  # all -inf (or +inf) row gives NaN here, which _clean_log_probs turns into -inf. (Taking
  # the shift from the top-1 value instead makes CPU XLA replace TopK by a full sort.)
  shift = jnp.max(logits, axis=-1, keepdims=True)  # [..., 1]
  lse = shift + jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1, keepdims=True))
  return tokens.astype(jnp.int32), _clean_log_probs(values - lse)


def root_level(logp: Array, top_k: int) -> tuple[Array, Array]:
  """Draft log-probs at the root [batch, vocab] -> (tokens [batch, K] int32, scores [batch, K]).

  Top-K, best first, ties to the lower token id; score = log-prob. (The decoder takes the
  same from `top_candidates` on the logits.)"""
  scores, tokens = jax.lax.top_k(_clean_log_probs(logp), top_k)  # [batch, K]
  return tokens.astype(jnp.int32), scores


class Expansion(NamedTuple):
  """One draft level: all K*K candidates, and the K of them that form the next frontier.

  Candidate c is child rank c % K (best first) of frontier slot c // K."""

  candidate_tokens: Array  # [batch, K*K] int32
  candidate_scores: Array  # [batch, K*K] float32: parent score + child log-prob
  frontier_index: Array  # [batch, K] int32: candidate index of each next-frontier node, best first
  frontier_tokens: Array  # [batch, K] int32
  frontier_scores: Array  # [batch, K] float32
  frontier_parent_slots: Array  # [batch, K] int32: previous-frontier slot each descends from


def expand_level(frontier_scores: Array, child_logp: Array, top_k: int) -> Expansion:
  """frontier_scores [batch, K] and the draft log-probs of each frontier node's next token
  child_logp [batch, K, vocab] -> Expansion.

  Each frontier node proposes its top-K tokens; child score = parent score + log-prob; the
  global top-K of the K*K (ties to the lower candidate index) is the next frontier."""
  assert child_logp.shape[1] == top_k, (child_logp.shape, top_k)
  child_lp, child_tokens = jax.lax.top_k(_clean_log_probs(child_logp), top_k)  # [batch, K, K]
  return expand_candidates(frontier_scores, child_tokens, child_lp)


def expand_candidates(frontier_scores: Array, child_tokens: Array, child_lp: Array
                      ) -> Expansion:
  """`expand_level` from each frontier node's top-K children, already selected:
  child_tokens [batch, K, K] int32 and their log-probs child_lp [batch, K, K], best first
  (`top_candidates` of the draft logits)."""
  batch, top_k = frontier_scores.shape
  scores = frontier_scores[:, :, None] + child_lp  # [batch, K, K]
  scores = scores.reshape(batch, top_k * top_k)  # [batch, K*K]
  tokens = child_tokens.reshape(batch, top_k * top_k).astype(jnp.int32)  # [batch, K*K]
  frontier_scores_next, frontier_index = jax.lax.top_k(scores, top_k)  # [batch, K]
  frontier_index = frontier_index.astype(jnp.int32)
  return Expansion(
      candidate_tokens=tokens,
      candidate_scores=scores,
      frontier_index=frontier_index,
      frontier_tokens=jnp.take_along_axis(tokens, frontier_index, axis=1),
      frontier_scores=frontier_scores_next,
      # Truncating division (the index is >= 0): `//` on signed ints adds a floor
      # correction, a kernel of its own per level.
      frontier_parent_slots=jax.lax.div(frontier_index, jnp.int32(top_k)))


@flax.struct.dataclass
class TreeBuffers:
  """Every node generated over D levels (N = K + (D-1)*K*K, layout in the module docstring).

  All D levels must be added before `rerank`."""

  root_tokens: Array  # [batch] int32: the last committed (bonus) token, the tree's root
  tokens: Array  # [batch, N] int32
  scores: Array  # [batch, N] float32: cumulative draft log-prob (sum over the path)
  parents: Array  # [batch, N] int32: buffer id of the parent, -1 for the root
  depths: Array  # [batch, N] int32: level + 1 (the root has depth 0)
  parent_slots: Array  # [batch, N] int32: frontier slot of the parent at level - 1 (-1: root)
  frontier_slots: Array  # [batch, N] int32: slot in its own level's frontier, -1 if not in it
  frontier_ids: Array  # [batch, K] int32: buffer ids of the current (last added) frontier
  frontier_scores: Array  # [batch, K] float32
  top_k: int = flax.struct.field(pytree_node=False, default=1)
  depth: int = flax.struct.field(pytree_node=False, default=1)


def init_buffers(root_tokens: Array, tokens: Array, scores: Array, depth: int) -> TreeBuffers:
  """Buffers holding level 0 (`root_level`'s tokens/scores [batch, K]); root_tokens [batch]."""
  batch, top_k = tokens.shape
  size = num_buffer_nodes(top_k, depth)
  ids = jnp.arange(size, dtype=jnp.int32)  # [N]
  node_depths = 1 + jnp.where(ids < top_k, 0, 1 + (ids - top_k) // (top_k * top_k))  # [N]
  level0 = jnp.arange(top_k, dtype=jnp.int32)  # [K]
  pad = size - top_k
  full = lambda value, dtype: jnp.full((batch, pad), value, dtype)
  return TreeBuffers(
      root_tokens=root_tokens.astype(jnp.int32),
      tokens=jnp.concatenate([tokens.astype(jnp.int32), full(0, jnp.int32)], axis=1),
      scores=jnp.concatenate([scores.astype(jnp.float32), full(-jnp.inf, jnp.float32)], axis=1),
      parents=jnp.full((batch, size), -1, jnp.int32),
      depths=jnp.broadcast_to(node_depths.astype(jnp.int32), (batch, size)),
      parent_slots=jnp.full((batch, size), -1, jnp.int32),
      frontier_slots=jnp.concatenate(
          [jnp.broadcast_to(level0, (batch, top_k)), full(-1, jnp.int32)], axis=1),
      frontier_ids=jnp.broadcast_to(level0, (batch, top_k)),
      frontier_scores=scores.astype(jnp.float32),
      top_k=top_k, depth=depth)


def add_level(buffers: TreeBuffers, level, expansion: Expansion) -> TreeBuffers:
  """Writes level `level` (1..D-1; Python int or traced) from `expand_level`'s output, which
  must have been computed from `buffers.frontier_scores`."""
  top_k = buffers.top_k
  width = top_k * top_k
  offset = level_offset(level, top_k)
  parent_slots = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32) // top_k,
                                  expansion.candidate_tokens.shape)  # [batch, K*K]
  parent_ids = jnp.take_along_axis(buffers.frontier_ids, parent_slots, axis=1)  # [batch, K*K]
  is_slot = expansion.frontier_index[:, :, None] == jnp.arange(width)  # [batch, K, K*K]
  frontier_slots = jnp.where(jnp.any(is_slot, axis=1), jnp.argmax(is_slot, axis=1),
                             -1).astype(jnp.int32)  # [batch, K*K]
  write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                               offset, axis=1)
  return buffers.replace(
      tokens=write(buffers.tokens, expansion.candidate_tokens),
      scores=write(buffers.scores, expansion.candidate_scores),
      parents=write(buffers.parents, parent_ids),
      parent_slots=write(buffers.parent_slots, parent_slots),
      frontier_slots=write(buffers.frontier_slots, frontier_slots),
      frontier_ids=(offset + expansion.frontier_index).astype(jnp.int32),
      frontier_scores=expansion.frontier_scores)


def assemble_buffers(root_tokens: Array, tokens: Array, scores: Array,
                     expansions: list[Expansion], depth: int) -> TreeBuffers:
  """The buffers `init_buffers` + `add_level` for levels 1..D-1 build, in one pass: each
  field is one concatenate of its per-level pieces instead of a dynamic-update-slice per
  level and field, and the static fields (depths, parent slots) are constants.

  root_tokens [batch]; tokens, scores [batch, K]: level 0 (`root_level`); expansions: the
  D-1 levels' `expand_candidates` outputs, in order. Equal to the incremental build
  (tests/test_tree.py checks it)."""
  batch, top_k = tokens.shape
  assert len(expansions) == depth - 1, (len(expansions), depth)
  size = num_buffer_nodes(top_k, depth)
  width = top_k * top_k
  ids = np.arange(size)
  node_depths = 1 + np.where(ids < top_k, 0, 1 + (ids - top_k) // width)  # [N]
  level_parent_slots = np.arange(width) // top_k  # [K*K]: frontier slot of each candidate
  parent_slots = np.concatenate([np.full(top_k, -1)] + [level_parent_slots] * (depth - 1))
  token_parts, score_parts = [tokens.astype(jnp.int32)], [scores.astype(jnp.float32)]
  parent_parts = [jnp.full((batch, top_k), -1, jnp.int32)]
  frontier_parts = [jnp.broadcast_to(jnp.arange(top_k, dtype=jnp.int32), (batch, top_k))]
  frontier_ids = frontier_parts[0]  # [batch, K]: buffer ids of the previous frontier
  frontier_scores = scores.astype(jnp.float32)
  for level, expansion in enumerate(expansions, start=1):
    token_parts.append(expansion.candidate_tokens.astype(jnp.int32))
    score_parts.append(expansion.candidate_scores.astype(jnp.float32))
    parent_parts.append(frontier_ids[:, level_parent_slots])  # [batch, K*K]
    is_slot = expansion.frontier_index[:, :, None] == np.arange(width)  # [batch, K, K*K]
    frontier_parts.append(jnp.where(jnp.any(is_slot, axis=1), jnp.argmax(is_slot, axis=1),
                                    -1).astype(jnp.int32))  # [batch, K*K]
    frontier_ids = (level_offset(level, top_k) + expansion.frontier_index).astype(jnp.int32)
    frontier_scores = expansion.frontier_scores
  cat = lambda parts: jnp.concatenate(parts, axis=1)  # [batch, N]
  rows = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (batch, size))
  return TreeBuffers(
      root_tokens=root_tokens.astype(jnp.int32), tokens=cat(token_parts),
      scores=cat(score_parts), parents=cat(parent_parts), depths=rows(node_depths),
      parent_slots=rows(parent_slots), frontier_slots=cat(frontier_parts),
      frontier_ids=frontier_ids, frontier_scores=frontier_scores, top_k=top_k, depth=depth)


# ----------------------------------------------------------------------------- rerank


@flax.struct.dataclass
class Tree:
  """The flattened draft tree, parents before children. Node 0 is the root (the last committed
  token, whose children are the level-0 draft nodes); T = total_tokens + 1.

  Node order: by depth, then by rerank rank (score descending), so the children of a node,
  taken in increasing node index, are in draft-score order (`children` lists them that way)."""

  tokens: Array  # [batch, T] int32
  parents: Array  # [batch, T] int32: tree index of the parent, -1 for the root
  depths: Array  # [batch, T] int32: root 0; target position = prefix length + depth
  ancestor_mask: Array  # [batch, T, T] bool: node i sees node j iff j is i or an ancestor of i
  children: Array  # [batch, T, K] int32: tree indices of each node's children in order, -1 pad
  paths: Array  # [batch, total_tokens, D+1] int32: root-to-leaf node lists, -1 pad
  num_paths: Array  # [batch] int32: valid rows of `paths` (= number of leaves)
  scores: Array  # [batch, T] float32: draft score (root 0)
  node_ids: Array  # [batch, T] int32: buffer id (-1 for the root)
  parent_slots: Array  # [batch, T] int32: frontier slot of the parent (-1 for root and depth 1)
  frontier_slots: Array  # [batch, T] int32: slot in its level's frontier, -1 if not in it
  top_k: int = flax.struct.field(pytree_node=False, default=1)
  depth: int = flax.struct.field(pytree_node=False, default=1)


def rerank(buffers: TreeBuffers, total_tokens: int, monotone: bool = False) -> Tree:
  """Keeps the `total_tokens` best buffer nodes and flattens them into a `Tree`.

  Order: score descending, ties to the shallower node, then to the lower buffer id (one rule,
  since the buffer is level-major). The kept set is a connected tree: scores are first made
  monotone along every path (score := min(score, parent's score); a no-op for buffers built by
  `add_level`, where child = parent + log-prob with log-prob <= 0 and rounding is monotone).
  Then a parent's key strictly precedes its child's (score >=, and a lower id breaks the tie),
  so every prefix of the order, in particular the kept top-`total_tokens`, contains the parent
  of each of its nodes. monotone=True skips making the scores monotone: only for buffers
  whose child scores are parent score + a cleaned log-prob (`add_level`, `assemble_buffers`),
  where that pass changes nothing."""
  top_k, depth = buffers.top_k, buffers.depth
  batch, size = buffers.tokens.shape
  assert 1 <= total_tokens <= size, (total_tokens, size)
  num_nodes = total_tokens + 1

  scores = _clean_log_probs(buffers.scores)  # [batch, N]; NaN -> -inf, scores are <= 0
  has_parent = buffers.parents >= 0  # [batch, N]
  safe_parents = jnp.maximum(buffers.parents, 0)  # [batch, N]
  for _ in range(0 if monotone else depth - 1):  # propagate the min down one level per pass
    parent_scores = jnp.take_along_axis(scores, safe_parents, axis=1)  # [batch, N]
    scores = jnp.where(has_parent, jnp.minimum(scores, parent_scores), scores)

  kept_scores, kept_ids = jax.lax.top_k(scores, total_tokens)  # [batch, total], by rank
  kept_depths = jnp.take_along_axis(buffers.depths, kept_ids, axis=1)  # [batch, total]
  order_key = kept_depths * total_tokens + jnp.arange(total_tokens)  # unique keys
  order = jnp.argsort(order_key, axis=1)  # [batch, total]: by (depth, rank)
  node_ids = jnp.take_along_axis(kept_ids, order, axis=1).astype(jnp.int32)  # [batch, total]

  gather = lambda field: jnp.take_along_axis(field, node_ids, axis=1)  # [batch, total]
  buffer_parents = gather(buffers.parents)  # [batch, total]
  # A kept node's parent is kept (see above): its tree index is 1 + its place in node_ids
  # (found by matching ids, [batch, total, total]; no buffer-wide index map), 0 for the root.
  is_parent = buffer_parents[:, :, None] == node_ids[:, None, :]  # [batch, total, total]
  draft_parents = jnp.max(jnp.where(is_parent, jnp.arange(1, num_nodes, dtype=jnp.int32), 0),
                          axis=2)  # [batch, total]: ids are distinct, so one match at most

  prepend = lambda root, rest: jnp.concatenate(
      [jnp.full((batch, 1), root, rest.dtype), rest], axis=1)  # [batch, T]
  tokens = jnp.concatenate([buffers.root_tokens[:, None], gather(buffers.tokens)], axis=1)
  parents = prepend(-1, draft_parents)  # [batch, T]
  depths = prepend(0, gather(buffers.depths))  # [batch, T]

  # Ancestor mask: the reflexive-transitive closure of "is the parent of", by squaring.
  # Reach within 2^i steps after i squarings; paths are at most D long. 0/1 products are exact.
  node_range = jnp.arange(num_nodes, dtype=jnp.int32)  # [T]
  reach = ((parents[:, :, None] == node_range) | (node_range[:, None] == node_range)
           ).astype(jnp.float32)  # [batch, T(node), T(ancestor)]: itself or its parent
  for _ in range(max(depth - 1, 0).bit_length()):
    reach = (jnp.einsum("bij,bjk->bik", reach, reach) > 0).astype(jnp.float32)
  ancestor_mask = reach > 0  # [batch, T, T]

  # Children in node order: the r-th child of p is the node j with parents[j] == p and rank r.
  is_child = parents[:, None, :] == node_range[:, None]  # [batch, T(parent), T(child)]
  sibling_rank = jnp.cumsum(is_child, axis=2) - 1  # [batch, T, T]
  is_rth = is_child[..., None] & (sibling_rank[..., None] == jnp.arange(top_k))  # [b, T, T, K]
  children = jnp.where(jnp.any(is_rth, axis=2), jnp.argmax(is_rth, axis=2),
                       -1).astype(jnp.int32)  # [batch, T, K]

  # Paths: the leaf's ancestor at each depth; leaves listed in node order.
  is_leaf = ~jnp.any(is_child, axis=2)  # [batch, T]
  at_depth = ancestor_mask[..., None] & (depths[:, None, :, None] == jnp.arange(depth + 1)
                                         )  # [batch, T(node), T(ancestor), D+1]
  node_paths = jnp.where(jnp.any(at_depth, axis=2), jnp.argmax(at_depth, axis=2),
                         -1).astype(jnp.int32)  # [batch, T, D+1]
  leaf_order = jnp.argsort(~is_leaf, axis=1, stable=True)[:, :total_tokens]  # [batch, total]
  leaf_rows = jnp.take_along_axis(is_leaf, leaf_order, axis=1)  # [batch, total]
  paths = jnp.take_along_axis(node_paths, leaf_order[:, :, None], axis=1)  # [b, total, D+1]
  paths = jnp.where(leaf_rows[:, :, None], paths, -1)

  return Tree(
      tokens=tokens.astype(jnp.int32),
      parents=parents,
      depths=depths,
      ancestor_mask=ancestor_mask,
      children=children,
      paths=paths,
      num_paths=jnp.sum(is_leaf, axis=1).astype(jnp.int32),
      scores=prepend(0.0, jnp.take_along_axis(kept_scores, order, axis=1)),
      node_ids=prepend(-1, node_ids),
      parent_slots=prepend(-1, gather(buffers.parent_slots)),
      frontier_slots=prepend(-1, gather(buffers.frontier_slots)),
      top_k=top_k, depth=depth)


# ----------------------------------------------------------------------------- verification


class Verification(NamedTuple):
  """What one verification step commits: accept_len draft tokens, then the bonus token."""

  accept_len: Array  # [batch] int32 in 0..D: accepted draft nodes
  accepted_nodes: Array  # [batch, D+1] int32: tree indices, root first, -1 pad
  bonus_tokens: Array  # [batch] int32: the target's token after the last accepted node
  output_tokens: Array  # [batch, D+1] int32: accepted draft tokens then the bonus, -1 pad


def _output_tokens(tree: Tree, accepted_nodes: Array, accept_len: Array, bonus: Array) -> Array:
  """Accepted draft tokens (nodes 1..accept_len) followed by the bonus token [batch, D+1]."""
  draft = jnp.take_along_axis(tree.tokens, jnp.maximum(accepted_nodes[:, 1:], 0), axis=1)
  slots = jnp.arange(tree.depth + 1)  # [D+1]
  padded = jnp.concatenate([draft, jnp.zeros_like(draft[:, :1])], axis=1)  # [batch, D+1]
  out = jnp.where(slots < accept_len[:, None], padded, -1)
  return jnp.where(slots == accept_len[:, None], bonus[:, None], out).astype(jnp.int32)


def verify_greedy(tree: Tree, target_logits: Array) -> Verification:
  """target_logits [batch, T, vocab] (the target's next-token logits after each node).

  A node is accepted iff its token is the target's argmax at its parent and its parent is
  accepted. Siblings carry distinct tokens, so the accepted nodes form one path (the longest
  accepted prefix of every root-to-leaf path lies on it). Bonus = argmax at its end. argmax is
  that of processed_probs at temperature 0 (first index on ties, logits taken as float32)."""
  depth = tree.depth
  target_argmax = jnp.argmax(target_logits.astype(jnp.float32), axis=-1)  # [batch, T]
  at_parent = jnp.take_along_axis(target_argmax, jnp.maximum(tree.parents, 0), axis=1)
  matches = (tree.tokens == at_parent) | (tree.parents < 0)  # [batch, T]
  accepted = ~jnp.any(tree.ancestor_mask & ~matches[:, None, :], axis=2)  # [batch, T]
  on_depth = accepted[:, :, None] & (tree.depths[:, :, None] == jnp.arange(depth + 1)
                                     )  # [batch, T, D+1]
  # At most one accepted node per depth: a max over node indices finds it (-1: none).
  node_index = jnp.arange(tree.tokens.shape[1], dtype=jnp.int32)[None, :, None]  # [1, T, 1]
  accepted_nodes = jnp.max(jnp.where(on_depth, node_index, -1), axis=1)  # [batch, D+1]
  accept_len = (jnp.sum(accepted_nodes >= 0, axis=1) - 1).astype(jnp.int32)  # [batch]
  last = jnp.take_along_axis(accepted_nodes, accept_len[:, None], axis=1)  # [batch, 1]
  bonus = jnp.take_along_axis(target_argmax, last, axis=1)[:, 0].astype(jnp.int32)
  return Verification(accept_len, accepted_nodes, bonus,
                      _output_tokens(tree, accepted_nodes, accept_len, bonus))


def _inverse_cdf(weights: Array, uniforms: Array) -> Array:
  """Token i with probability weights[i] / sum(weights), from uniforms [batch] in [0, 1).

  weights [batch, vocab] >= 0, unnormalized, with positive sum. Never returns a zero-weight
  token (the clamp catches u * total rounding up to total)."""
  vocab = weights.shape[-1]
  cdf = jnp.cumsum(weights, axis=-1)  # [batch, vocab]
  target = uniforms[:, None] * cdf[:, -1:]  # [batch, 1]
  index = jnp.sum(cdf <= target, axis=-1)  # [batch]
  last_positive = vocab - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)  # [batch]
  return jnp.minimum(index, last_positive).astype(jnp.int32)


def verify_sample_with_uniforms(tree: Tree, target_logits: Array, sampling: SamplingParams,
                                accept_uniforms: Array, residual_uniforms: Array
                                ) -> Verification:
  """Recursive rejection over siblings, with its randomness given explicitly.

  accept_uniforms [batch, D+1, K] decides child r at step s (u < p_residual(x));
  residual_uniforms [batch, D+1] draws the final token at step s by inverse CDF.

  Walk, from the root: p = processed_probs(target logits at the current node, sampling). For its
  children x_1, x_2, ... in draft-score order: accept x_r with probability p(x_r) / sum(p) (p after
  the previous rejections); on rejection set p(x_r) = 0. On acceptance move to x_r and repeat.
  If no child is accepted (or the node is a leaf), sample the bonus token from the residual p.

  Lossless: the children are deterministic, so each proposal is a point mass at x_r, and the
  procedure is the standard accept/reject of a point-mass proposal repeated on the residual.
  With p_r the residual before child r (p_1 = p) and m_r = sum(p_r) = 1 - sum_{i<r} p(x_i):
  P(emit x_r) = (prod_{i<r} (1 - p(x_i)/m_i)) * p(x_r)/m_r = m_r * p(x_r)/m_r = p(x_r)
  (the product telescopes to m_r), and for y not among the children
  P(emit y) = m_{R+1} * p(y)/m_{R+1} = p(y). So the emitted token is distributed exactly as p,
  whichever child got accepted; the walk then continues at that token's node, whose target
  logits are the target's true next-token logits for that prefix, so by induction every
  emitted token follows the target's conditional distribution. Siblings are distinct tokens
  (top-K of one distribution), which the argument needs."""
  batch, num_nodes, vocab = target_logits.shape
  depth, top_k = tree.depth, tree.top_k
  rows = jnp.arange(batch)  # [batch]
  vocab_range = jnp.arange(vocab)  # [vocab]

  def step(state):
    s, node, done, accept_len, accepted_nodes, bonus = state
    logits = jnp.take_along_axis(target_logits, node[:, None, None], axis=1)[:, 0]  # [b, vocab]
    residual = processed_probs(logits, sampling)  # [batch, vocab]
    kids = jnp.take_along_axis(tree.children, node[:, None, None], axis=1)[:, 0]  # [batch, K]
    kid_tokens = jnp.take_along_axis(tree.tokens, jnp.maximum(kids, 0), axis=1)  # [batch, K]
    uniforms = accept_uniforms[:, s]  # [batch, K]

    def try_child(r, carry):
      residual, chosen = carry
      live = (kids[:, r] >= 0) & (chosen < 0) & ~done  # [batch]
      token = kid_tokens[:, r]  # [batch]
      mass = jnp.sum(residual, axis=-1)  # [batch]
      p_token = residual[rows, token]  # [batch]
      accept = live & (uniforms[rows, r] < p_token / jnp.where(live, mass, 1.0))
      reject = live & ~accept
      residual = jnp.where(reject[:, None] & (vocab_range == token[:, None]), 0.0, residual)
      return residual, jnp.where(accept, kids[:, r], chosen)

    residual, chosen = jax.lax.fori_loop(
        0, top_k, try_child, (residual, jnp.full((batch,), -1, jnp.int32)))
    moved = chosen >= 0  # [batch]; implies the row was live
    finish = ~done & ~moved  # [batch]
    sampled = _inverse_cdf(residual, residual_uniforms[:, s])  # [batch]
    accept_len = accept_len + moved
    accepted_nodes = jnp.where(moved[:, None] & (jnp.arange(depth + 1) == accept_len[:, None]),
                               chosen[:, None], accepted_nodes)  # [batch, D+1]
    return (s + 1, jnp.where(moved, chosen, node), done | finish, accept_len, accepted_nodes,
            jnp.where(finish, sampled, bonus))

  init = (jnp.int32(0), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
          jnp.zeros((batch,), jnp.int32),
          jnp.full((batch, depth + 1), -1, jnp.int32).at[:, 0].set(0),
          jnp.zeros((batch,), jnp.int32))
  # A step either moves one level down or finishes; at depth D there are no children, so
  # every row is done after at most D+1 steps.
  _, _, _, accept_len, accepted_nodes, bonus = jax.lax.while_loop(
      lambda state: (state[0] <= depth) & ~jnp.all(state[2]), step, init)
  return Verification(accept_len, accepted_nodes, bonus,
                      _output_tokens(tree, accepted_nodes, accept_len, bonus))


def verify_sample(tree: Tree, target_logits: Array, sampling: SamplingParams, rng: Array
                  ) -> Verification:
  """`verify_sample_with_uniforms` with uniforms drawn from the PRNG key `rng`."""
  batch = target_logits.shape[0]
  accept_key, residual_key = jax.random.split(rng)
  accept_uniforms = jax.random.uniform(accept_key, (batch, tree.depth + 1, tree.top_k))
  residual_uniforms = jax.random.uniform(residual_key, (batch, tree.depth + 1))
  return verify_sample_with_uniforms(tree, target_logits, sampling, accept_uniforms,
                                     residual_uniforms)


def verify(tree: Tree, target_logits: Array, sampling: SamplingParams, rng: Array
           ) -> Verification:
  """Greedy verification if `sampling.greedy`, else rejection sampling (rng unused if greedy)."""
  if sampling.greedy:
    return verify_greedy(tree, target_logits)
  return verify_sample(tree, target_logits, sampling, rng)
