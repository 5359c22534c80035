"""Draft-tree construction and verification (fspad_jax.tree) against the numpy reference, and
statistical losslessness of sampling verification."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fspad_jax import tree as tree_lib
from fspad_jax.sampling import SamplingParams, processed_probs
import tree_reference as ref

# (top_k, depth, total_tokens, vocab)
CONFIGS = [(1, 1, 1, 4), (2, 2, 6, 8), (2, 3, 5, 8), (3, 4, 12, 16), (4, 3, 20, 16),
           (10, 6, 60, 32)]
BATCH = 3
SAMPLING = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9, top_k=5)]


def build_buffers(root_tokens, root_logp, level_logps, top_k, traced_levels=False):
  """The drafter's bookkeeping loop, with per-level draft log-probs given up front."""
  depth = level_logps.shape[1] + 1
  tokens, scores = tree_lib.root_level(root_logp, top_k)
  buffers = tree_lib.init_buffers(root_tokens, tokens, scores, depth)

  def add(level, buffers):
    child_logp = level_logps[:, level - 1]  # [batch, K, vocab]
    expansion = tree_lib.expand_level(buffers.frontier_scores, child_logp, top_k)
    return tree_lib.add_level(buffers, level, expansion)

  if traced_levels and depth > 1:
    return jax.lax.fori_loop(1, depth, add, buffers)
  for level in range(1, depth):
    buffers = add(level, buffers)
  return buffers


@functools.partial(jax.jit, static_argnames=("top_k", "total_tokens", "traced_levels"))
def build_tree(root_tokens, root_logp, level_logps, top_k, total_tokens, traced_levels=False):
  buffers = build_buffers(root_tokens, root_logp, level_logps, top_k, traced_levels)
  return buffers, tree_lib.rerank(buffers, total_tokens)


@functools.partial(jax.jit, static_argnames=("top_k",))
def assemble_buffers(root_tokens, root_logp, level_logps, top_k):
  """The decoder's one-pass bookkeeping (tree.assemble_buffers) over the same levels."""
  depth = level_logps.shape[1] + 1
  tokens, scores = tree_lib.root_level(root_logp, top_k)
  frontier_scores, expansions = scores, []
  for level in range(1, depth):
    expansion = tree_lib.expand_level(frontier_scores, level_logps[:, level - 1], top_k)
    expansions.append(expansion)
    frontier_scores = expansion.frontier_scores
  return tree_lib.assemble_buffers(root_tokens, tokens, scores, expansions, depth)


verify_greedy = jax.jit(tree_lib.verify_greedy)
verify_sample_with_uniforms = jax.jit(tree_lib.verify_sample_with_uniforms,
                                      static_argnames="sampling")
verify_sample = jax.jit(tree_lib.verify_sample, static_argnames="sampling")
rerank = jax.jit(tree_lib.rerank, static_argnames="total_tokens")
rerank_monotone = jax.jit(functools.partial(tree_lib.rerank, monotone=True),
                          static_argnames="total_tokens")


def random_draft(seed, top_k, depth, vocab, batch=BATCH):
  """Coarsely quantized log-probs (many ties, -0.0 among them) with some -inf."""
  rng = np.random.default_rng(seed)

  def log_probs(shape):
    logp = -np.round(np.abs(rng.normal(size=shape)) * 2) / 2
    logp[rng.random(shape) < 0.1] = -np.inf
    return logp.astype(np.float32)

  return (rng.integers(0, vocab, batch).astype(np.int32), log_probs((batch, vocab)),
          log_probs((batch, depth - 1, top_k, vocab)))


def as_numpy(tree):
  """Tree's array fields as a dict of numpy arrays."""
  return {f.name: np.asarray(getattr(tree, f.name)) for f in dataclasses.fields(tree)
          if f.name not in ("top_k", "depth")}


def buffers_to_nodes(buffers, row):
  """One row of JAX TreeBuffers as the reference's node list."""
  fields = ("tokens", "scores", "parents", "depths", "parent_slots", "frontier_slots")
  arrays = [np.asarray(getattr(buffers, f))[row] for f in fields]
  return [dict(token=int(t), score=np.float32(s), parent=int(p), depth=int(d), parent_slot=int(ps),
               frontier_slot=int(fs)) for t, s, p, d, ps, fs in zip(*arrays)]


def assert_trees_equal(actual, expected):
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def target_logits_for(tree, seed, vocab, greedy):
  """Target logits [batch, T, vocab] whose favourite is often one of the node's children.

  Greedy: small integers, so argmax ties (first index wins) are common."""
  rng = np.random.default_rng(seed)
  batch, num_nodes = tree["tokens"].shape
  if greedy:
    logits = rng.integers(0, 3, (batch, num_nodes, vocab)).astype(np.float32)
  else:
    logits = (rng.normal(size=(batch, num_nodes, vocab)) * 1.5).astype(np.float32)
  for b in range(batch):
    for i in range(num_nodes):
      kids = tree["children"][b, i][tree["children"][b, i] >= 0]
      if len(kids) and rng.random() < 0.8:
        token = tree["tokens"][b, rng.choice(kids)]
        logits[b, i, token] = 3.0 if greedy else logits[b, i, token] + 6.0
  return logits


@pytest.mark.parametrize("top_k,depth,total_tokens,vocab", CONFIGS)
def test_construction_matches_reference(top_k, depth, total_tokens, vocab):
  for seed in range(2):
    root_tokens, root_logp, level_logps = random_draft(seed, top_k, depth, vocab)
    buffers, tree = build_tree(root_tokens, root_logp, level_logps, top_k, total_tokens)
    assert tree.tokens.shape == (BATCH, total_tokens + 1)
    assert tree.paths.shape == (BATCH, total_tokens, depth + 1)
    for b in range(BATCH):
      expected_nodes = ref.build_buffers(root_logp[b], level_logps[b], top_k)
      assert buffers_to_nodes(buffers, b) == expected_nodes
    expected = ref.build_tree(root_tokens, root_logp, level_logps, top_k, total_tokens)
    assert_trees_equal(as_numpy(tree), expected)
    _, traced = build_tree(root_tokens, root_logp, level_logps, top_k, total_tokens,
                           traced_levels=True)
    assert_trees_equal(as_numpy(traced), expected)
    # The one-pass assembly equals the incremental one, field by field.
    assembled = assemble_buffers(root_tokens, root_logp, level_logps, top_k)
    assert_trees_equal(as_numpy(assembled), as_numpy(buffers))
    # These buffers are monotone along paths, so skipping that pass changes nothing.
    assert_trees_equal(as_numpy(rerank_monotone(buffers, total_tokens)), expected)


def assert_well_formed(tree, buffer_parents):
  """Connected, parents before children, consistent depths / mask / paths."""
  t = as_numpy(tree)
  batch, num_nodes = t["tokens"].shape
  for b in range(batch):
    parents, depths, ids = t["parents"][b], t["depths"][b], t["node_ids"][b]
    assert parents[0] == -1 and depths[0] == 0 and ids[0] == -1
    assert len(set(ids[1:].tolist())) == num_nodes - 1
    for i in range(1, num_nodes):
      assert 0 <= parents[i] < i
      assert depths[i] == depths[parents[i]] + 1
      # The kept node's parent in the buffer is kept, and it is its tree parent.
      expected_parent = buffer_parents[b, ids[i]]
      assert (parents[i] == 0) if expected_parent < 0 else (ids[parents[i]] == expected_parent)
    assert np.all(np.diff(depths) >= 0)
    mask = t["ancestor_mask"][b]
    assert np.all(mask.sum(axis=1) == depths + 1)
    for path in t["paths"][b][:t["num_paths"][b]]:
      path = path[path >= 0]
      assert path[0] == 0 and np.all(parents[path[1:]] == path[:-1])
      assert not np.any(t["children"][b, path[-1]] >= 0)


@pytest.mark.parametrize("top_k,depth,total_tokens,vocab", CONFIGS)
def test_kept_set_is_connected_tree(top_k, depth, total_tokens, vocab):
  root_tokens, root_logp, level_logps = random_draft(7, top_k, depth, vocab)
  buffers, tree = build_tree(root_tokens, root_logp, level_logps, top_k, total_tokens)
  assert_well_formed(tree, np.asarray(buffers.parents))
  # Adversarial scores (children above parents, NaN, -inf): rerank still keeps a tree, and
  # matches the reference (which applies the same min-over-ancestors rule).
  rng = np.random.default_rng(8)
  scores = rng.normal(size=buffers.scores.shape).astype(np.float32)
  scores[rng.random(scores.shape) < 0.1] = np.nan
  scores[rng.random(scores.shape) < 0.1] = -np.inf
  bad = buffers.replace(scores=jnp.asarray(np.round(scores)))
  bad_tree = rerank(bad, total_tokens)
  assert_well_formed(bad_tree, np.asarray(buffers.parents))
  for b in range(BATCH):
    expected = ref.rerank(buffers_to_nodes(bad, b), total_tokens, int(root_tokens[b]), top_k,
                          depth)
    assert_trees_equal({k: v[b] for k, v in as_numpy(bad_tree).items()}, expected)


@pytest.mark.parametrize("top_k,depth,total_tokens,vocab", CONFIGS)
def test_verification_matches_reference(top_k, depth, total_tokens, vocab):
  root_tokens, root_logp, level_logps = random_draft(11, top_k, depth, vocab)
  _, tree = build_tree(root_tokens, root_logp, level_logps, top_k, total_tokens)
  t = as_numpy(tree)
  fields = tree_lib.Verification._fields

  logits = target_logits_for(t, 12, vocab, greedy=True)
  greedy = verify_greedy(tree, jnp.asarray(logits))
  expected = ref.verify_greedy_batch(t, logits)
  for name in fields:
    np.testing.assert_array_equal(np.asarray(getattr(greedy, name)), expected[name], name)
  assert np.all(greedy.bonus_tokens == np.argmax(
      processed_probs(jnp.asarray(logits), SamplingParams()), axis=-1)[
          np.arange(BATCH), greedy.accepted_nodes[np.arange(BATCH), greedy.accept_len]])

  rng = np.random.default_rng(13)
  accept_u = rng.random((BATCH, depth + 1, top_k)).astype(np.float32)
  residual_u = rng.random((BATCH, depth + 1)).astype(np.float32)
  # Greedy is the temperature-0 case of the sampling walk (one-hot p), whatever the uniforms.
  as_sampling = verify_sample_with_uniforms(tree, jnp.asarray(logits), SamplingParams(),
                                            jnp.asarray(accept_u), jnp.asarray(residual_u))
  for name in fields:
    np.testing.assert_array_equal(np.asarray(getattr(as_sampling, name)), expected[name], name)

  logits = target_logits_for(t, 14, vocab, greedy=False)
  accepted_any = 0
  for sampling in SAMPLING[CONFIGS.index((top_k, depth, total_tokens, vocab)) % 2:][:1]:
    result = verify_sample_with_uniforms(tree, jnp.asarray(logits), sampling,
                                         jnp.asarray(accept_u), jnp.asarray(residual_u))
    probs = np.asarray(processed_probs(jnp.asarray(logits), sampling), np.float64)
    expected = ref.verify_sample_batch(t, probs, accept_u, residual_u)
    for name in fields:
      np.testing.assert_array_equal(np.asarray(getattr(result, name)), expected[name], name)
    accepted_any += int(np.sum(expected["accept_len"]))
  assert accepted_any > 0


# ----------------------------------------------------------------------------- losslessness

STAT_VOCAB, STAT_TOP_K, STAT_DEPTH, STAT_TOTAL = 6, 3, 2, 7
STAT_ROWS = 30_000
STAT_SEED = 0


def stat_tables():
  """Target logits for every prefix (after the root: [V], after x1: [V, V], after x1 x2:
  [V, V, V]) and draft logits (root [V], after x1 [V, V]), fixed."""
  rng = np.random.default_rng(STAT_SEED)
  v = STAT_VOCAB
  target = [rng.normal(size=(v,) * n).astype(np.float32) * 1.2 for n in (1, 2, 3)]
  # A draft that agrees with the target only roughly (so acceptance is frequent at depth 2).
  draft = [0.8 * target[n] + rng.normal(size=(v,) * (n + 1)).astype(np.float32)
           for n in (0, 1)]
  return target, draft


def stat_tree():
  """The 2-level tree the draft tables give (K=3, 6 draft nodes), its target logits at each
  node [1, T, V] and its draft probabilities at each node [1, T, V]."""
  target, draft = stat_tables()
  draft_logp = [jax.nn.log_softmax(jnp.asarray(d), axis=-1) for d in draft]
  root_logp = draft_logp[0][None]  # [1, V]
  level0_tokens, _ = tree_lib.root_level(root_logp, STAT_TOP_K)  # [1, K]
  level_logps = draft_logp[1][level0_tokens][:, None]  # [1, 1, K, V]
  _, tree = build_tree(jnp.zeros((1,), jnp.int32), root_logp, level_logps, STAT_TOP_K,
                       STAT_TOTAL)
  tokens, parents, depths = (np.asarray(x)[0] for x in (tree.tokens, tree.parents, tree.depths))
  node_logits, node_draft = [], []
  for i in range(len(tokens)):
    if depths[i] == 0:
      node_logits.append(target[0])
      node_draft.append(draft[0])
    elif depths[i] == 1:
      node_logits.append(target[1][tokens[i]])
      node_draft.append(draft[1][tokens[i]])
    else:
      node_logits.append(target[2][tokens[parents[i]], tokens[i]])
      node_draft.append(np.full(STAT_VOCAB, -np.inf, np.float32))  # leaves: unused
  node_draft_probs = np.asarray(jax.nn.softmax(jnp.asarray(np.stack(node_draft)), axis=-1))
  return tree, np.stack(node_logits)[None], np.nan_to_num(node_draft_probs)[None]


def inverse_cdf(probs, u):
  """Row-wise draws from probs [n, V] with uniforms u [n]."""
  cdf = np.cumsum(probs, axis=1)
  index = np.sum(cdf <= u[:, None] * cdf[:, -1:], axis=1)
  last_positive = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
  return np.minimum(index, last_positive)


def first_three_tokens(output_tokens, accept_len, target_probs, seed):
  """The first 3 tokens of the sequence: the verification's output, continued by plain target
  sampling (which is what every later decoding step must equal)."""
  rng = np.random.default_rng(seed)
  n = len(accept_len)
  x1 = output_tokens[:, 0]
  x2 = np.where(accept_len >= 1, output_tokens[:, 1],
                inverse_cdf(target_probs[1][x1], rng.random(n)))
  x3 = np.where(accept_len >= 2, output_tokens[:, 2],
                inverse_cdf(target_probs[2][x1, x2], rng.random(n)))
  return x1, x2, x3


def chi_square_pvalue(samples, probs):
  """Chi-square goodness of fit of samples (flat cell indices) to probs (flat). Sampling a
  zero-probability cell gives p-value 0; cells expecting < 5 counts are pooled."""
  n = len(samples)
  observed = np.bincount(samples, minlength=len(probs))
  if np.any(observed[probs <= 0] > 0):
    return 0.0
  expected = probs * n / probs.sum()
  big = expected >= 5
  small = (probs > 0) & ~big
  obs = np.concatenate([observed[big], [observed[small].sum()]])
  exp = np.concatenate([expected[big], [expected[small].sum()]])
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def joint_pvalues(output_tokens, accept_len, target_probs, seed):
  v = STAT_VOCAB
  x1, x2, x3 = first_three_tokens(output_tokens, accept_len, target_probs, seed)
  joint2 = target_probs[0][:, None] * target_probs[1]  # [V, V]
  joint3 = joint2[:, :, None] * target_probs[2]  # [V, V, V]
  return (chi_square_pvalue(x1 * v + x2, joint2.ravel()),
          chi_square_pvalue((x1 * v + x2) * v + x3, joint3.ravel()))


@pytest.mark.parametrize("sampling", SAMPLING[:1] + [SamplingParams(temperature=0.7, top_p=0.9)],
                         ids=["t1.0", "t0.7_p0.9"])
def test_sampling_verification_is_lossless(sampling):
  target, _ = stat_tables()
  target_probs = [np.asarray(processed_probs(jnp.asarray(t), sampling), np.float64)
                  for t in target]
  tree, node_logits, node_draft_probs = stat_tree()
  rows = STAT_ROWS
  tile = lambda x: jnp.broadcast_to(x, (rows,) + x.shape[1:])
  tree_rows = jax.tree.map(tile, tree)
  result = verify_sample(tree_rows, tile(jnp.asarray(node_logits)), sampling,
                         jax.random.key(0))
  output, accept_len = np.asarray(result.output_tokens), np.asarray(result.accept_len)
  assert set(np.unique(accept_len)) == {0, 1, 2}  # every branch of the walk is exercised
  p2, p3 = joint_pvalues(output, accept_len, target_probs, seed=1)
  assert p2 > 1e-3 and p3 > 1e-3, (p2, p3)

  # Power: accepting with the draft probability q instead of p must fail the same test.
  rng = np.random.default_rng(3)
  node_probs = np.asarray(processed_probs(jnp.asarray(node_logits), sampling), np.float64)
  t = {k: np.broadcast_to(v, (rows,) + v.shape[1:]) for k, v in as_numpy(tree).items()}
  wrong = ref.verify_sample_batch(
      t, np.broadcast_to(node_probs, (rows,) + node_probs.shape[1:]),
      rng.random((rows, STAT_DEPTH + 1, STAT_TOP_K)), rng.random((rows, STAT_DEPTH + 1)),
      accept_probs=np.broadcast_to(node_draft_probs, (rows,) + node_draft_probs.shape[1:]))
  wrong_p2, _ = joint_pvalues(wrong["output_tokens"], wrong["accept_len"], target_probs, seed=4)
  assert wrong_p2 < 1e-6, wrong_p2


def test_top_candidates_match_top_k_of_log_softmax():
  """The decoder's top-K on raw logits with log-probs from logsumexp selects the same tokens,
  with the same log-probs, as top-K of the full log-softmax; NaN logits are never chosen."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 5, 97)).astype(np.float32) * 3
  logits[0, 0, :7] = np.nan
  tokens, logp = tree_lib.top_candidates(jnp.asarray(logits), 6)
  clean = np.where(np.isnan(logits), -np.inf, logits)
  full = np.asarray(jax.nn.log_softmax(jnp.asarray(clean), axis=-1))
  expected = np.argsort(-full, axis=-1, kind="stable")[..., :6]
  np.testing.assert_array_equal(np.asarray(tokens), expected)
  np.testing.assert_allclose(np.asarray(logp), np.take_along_axis(full, expected, -1),
                             rtol=0, atol=2e-6)
  assert not np.isin(np.asarray(tokens)[0, 0], np.arange(7)).any()
