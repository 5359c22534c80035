"""Plain numpy reference for fspad_jax.tree: one row at a time, Python loops, no tricks.

The tests compare the JAX implementation against these functions. Scores are float32 like the
JAX code (so float32 ties are the same ties); verification probabilities are float64.
"""

from __future__ import annotations

import numpy as np


def clean_log_probs(logp):
  """NaN -> -inf, >= 0 -> 0 (log-probs are <= 0)."""
  logp = np.asarray(logp, np.float32)
  return np.where(np.isnan(logp), np.float32(-np.inf),
                  np.where(logp >= 0, np.float32(0), logp)).astype(np.float32)


def top_k(values, k):
  """Indices of the k largest values, largest first, ties to the lower index."""
  return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))[:k]


def build_buffers(root_logp, level_logps, top_k_: int):
  """One row's generated nodes as a list of dicts, in buffer-id order.

  root_logp [V]; level_logps [D-1, K, V]: row s of level l holds the draft log-probs after
  frontier slot s of level l-1."""
  k = top_k_
  nodes = []
  root_logp = clean_log_probs(root_logp)
  for slot, token in enumerate(top_k(root_logp, k)):
    nodes.append(dict(token=token, score=np.float32(root_logp[token]), parent=-1, depth=1,
                      parent_slot=-1, frontier_slot=slot))
  frontier = list(range(k))  # buffer ids of the frontier, by slot
  for level, level_logp in enumerate(level_logps, start=1):
    offset = len(nodes)
    candidates = []
    for slot, parent_id in enumerate(frontier):
      logp = clean_log_probs(level_logp[slot])
      for token in top_k(logp, k):
        score = np.float32(nodes[parent_id]["score"] + logp[token])
        candidates.append(dict(token=token, score=score, parent=parent_id, depth=level + 1,
                               parent_slot=slot, frontier_slot=-1))
    chosen = top_k([c["score"] for c in candidates], k)
    for slot, c in enumerate(chosen):
      candidates[c]["frontier_slot"] = slot
    nodes.extend(candidates)
    frontier = [offset + c for c in chosen]
  return nodes


def rerank(nodes, total_tokens: int, root_token: int, top_k_: int, depth: int):
  """One row's Tree as a dict of numpy arrays (same fields and conventions as tree.Tree)."""
  eff = []
  for node in nodes:  # parents come first
    score = clean_log_probs(node["score"])[()]
    if node["parent"] >= 0:
      score = min(score, eff[node["parent"]])
    eff.append(np.float32(score))
  ranked = sorted(range(len(nodes)), key=lambda i: (-float(eff[i]), nodes[i]["depth"], i))
  kept = ranked[:total_tokens]
  rank = {node_id: r for r, node_id in enumerate(kept)}
  order = sorted(kept, key=lambda i: (nodes[i]["depth"], rank[i]))
  index = {node_id: i + 1 for i, node_id in enumerate(order)}
  num = total_tokens + 1

  tokens = [root_token] + [nodes[i]["token"] for i in order]
  parents = [-1] + [index[nodes[i]["parent"]] if nodes[i]["parent"] >= 0 else 0 for i in order]
  depths = [0] + [nodes[i]["depth"] for i in order]
  mask = np.zeros((num, num), bool)
  for i in range(num):
    j = i
    while j >= 0:
      mask[i, j] = True
      j = parents[j]
  children = np.full((num, top_k_), -1, np.int32)
  for j in range(1, num):
    p = parents[j]
    r = int(np.sum(children[p] >= 0))
    children[p, r] = j
  paths = np.full((total_tokens, depth + 1), -1, np.int32)
  num_paths = 0
  for leaf in range(num):
    if np.any(children[leaf] >= 0):
      continue
    chain, j = [], leaf
    while j >= 0:
      chain.append(j)
      j = parents[j]
    paths[num_paths, :len(chain)] = chain[::-1]
    num_paths += 1
  return dict(
      tokens=np.array(tokens, np.int32), parents=np.array(parents, np.int32),
      depths=np.array(depths, np.int32), ancestor_mask=mask, children=children, paths=paths,
      num_paths=np.int32(num_paths),
      scores=np.array([0.0] + [eff[i] for i in order], np.float32),
      node_ids=np.array([-1] + order, np.int32),
      parent_slots=np.array([-1] + [nodes[i]["parent_slot"] for i in order], np.int32),
      frontier_slots=np.array([-1] + [nodes[i]["frontier_slot"] for i in order], np.int32))


def build_tree(root_tokens, root_logp, level_logps, top_k_: int, total_tokens: int):
  """Batched wrapper: root_tokens [b], root_logp [b, V], level_logps [b, D-1, K, V] -> dict of
  stacked arrays [b, ...]."""
  depth = np.shape(level_logps)[1] + 1
  rows = [rerank(build_buffers(root_logp[b], level_logps[b], top_k_), total_tokens,
                 int(root_tokens[b]), top_k_, depth) for b in range(len(root_tokens))]
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _result(tree, accepted, bonus, depth):
  accepted_nodes = np.full(depth + 1, -1, np.int32)
  accepted_nodes[:len(accepted)] = accepted
  output = np.full(depth + 1, -1, np.int32)
  output[:len(accepted) - 1] = [tree["tokens"][i] for i in accepted[1:]]
  output[len(accepted) - 1] = bonus
  return dict(accept_len=len(accepted) - 1, accepted_nodes=accepted_nodes, bonus_tokens=bonus,
              output_tokens=output)


def verify_greedy(tree, target_logits):
  """One row: tree dict, target_logits [T, V]. Longest accepted root-to-leaf prefix (first
  path on ties), then the argmax at its end."""
  depth = tree["paths"].shape[1] - 1
  argmax = [int(np.argmax(np.asarray(l, np.float32))) for l in target_logits]
  best = [0]
  for path in tree["paths"][:tree["num_paths"]]:
    path = [int(i) for i in path if i >= 0]
    n = 1
    while n < len(path) and tree["tokens"][path[n]] == argmax[path[n - 1]]:
      n += 1
    if n > len(best):
      best = path[:n]
  return _result(tree, best, argmax[best[-1]], depth)


def sample_residual(probs, u):
  """Inverse CDF of probs (normalized here) at u in [0, 1); never a zero-probability token."""
  probs = np.asarray(probs, np.float64)
  cdf = np.cumsum(probs / probs.sum())
  index = int(np.sum(cdf <= u))
  return min(index, int(np.nonzero(probs > 0)[0][-1]))


def verify_sample(tree, node_probs, accept_uniforms, residual_uniforms, accept_probs=None):
  """One row: node_probs [T, V] (processed target distribution after each node);
  accept_uniforms [D+1, K]; residual_uniforms [D+1].

  Literal recursive rejection: accept child x with probability p(x) of the current,
  renormalized p; on rejection p(x) = 0 and renormalize. `accept_probs` [T, V], if given,
  replaces p(x) in the acceptance test only (a deliberately wrong verifier for the tests)."""
  depth = len(residual_uniforms) - 1
  node, accepted = 0, [0]
  for step in range(depth + 1):
    p = np.array(node_probs[node], np.float64)
    p /= p.sum()
    moved = False
    for r, child in enumerate(tree["children"][node]):
      if child < 0:
        break
      x = tree["tokens"][child]
      chance = p[x] if accept_probs is None else accept_probs[node][x]
      if accept_uniforms[step][r] < chance:
        node, moved = int(child), True
        accepted.append(node)
        break
      if p.sum() - p[x] <= 0:  # only a wrong verifier can reject a certain token
        continue
      p[x] = 0.0
      p /= p.sum()
    if not moved:
      return _result(tree, accepted, sample_residual(p, residual_uniforms[step]), depth)
  raise AssertionError("walk ran past the tree depth")


def _row(tree, b):
  return {key: value[b] for key, value in tree.items()}


def verify_greedy_batch(tree, target_logits):
  rows = [verify_greedy(_row(tree, b), target_logits[b]) for b in range(len(target_logits))]
  return {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0]}


def verify_sample_batch(tree, node_probs, accept_uniforms, residual_uniforms,
                        accept_probs=None):
  rows = [verify_sample(_row(tree, b), node_probs[b], accept_uniforms[b], residual_uniforms[b],
                        None if accept_probs is None else accept_probs[b])
          for b in range(len(node_probs))]
  return {key: np.stack([np.asarray(r[key]) for r in rows]) for key in rows[0]}
