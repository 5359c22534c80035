"""Training-time test (EAGLE-3, HASS): the draft unrolled on its own features during training,
with the attention decoding gives it.

Step k (k = 1..steps) holds, at sequence position j, the draft's k-th step of the chain
anchored at a = j - k + 1, the chain a tree decodes when every drafted token is the data's:
  * input: the true token's embedding e(t(j+1)) and the feature f(j) for k = 1 (the target's,
    noised in training), else step k-1's `regress` at j-1 (the draft's own prediction of f(j));
  * RoPE position j (a tree node at depth k-1 below the anchor: position n + depth);
  * attention: step-1 K/V at positions <= a (the committed prefix, true features), step-i K/V
    at position j - k + i for 1 < i < k (the chain's earlier steps, tree ancestors) and its
    own: speculative.build_tree's mask for a chain.
Step 1 is today's teacher-forced causal pass. Positions with a < 0 have no such chain; they
are computed (finite) but never trained.

Cost: the step-1 keys enter as one dense [seq, seq] product per step, each earlier step's
key as an elementwise product on a shifted diagonal, so step k costs one plain draft forward
plus k - 1 dot products per query. A static Python unroll: each step has its own static shape.
Gradients flow through the fed-back features (as EAGLE-3 trains).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fspad_jax.config import ConfigError
from fspad_jax.draft import Draft
from fspad_jax.model import kernel, rope_tables

Array = jax.Array

DEFAULT_DECAY = 0.8  # EAGLE-3's per-step loss weight 0.8^(k-1)


def step_weights(steps, weights=()) -> tuple[float, ...]:
  """The loss weight of each unrolled step: `weights` (one per step), or 0.8^(k-1) when
  empty. Raises ConfigError (one line, naming train.ttt_steps / train.ttt_weights)."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ConfigError(f"config key train.ttt_steps={steps!r}: expected an integer >= 1")
  weights = tuple(weights or ())
  if not weights:
    return tuple(DEFAULT_DECAY ** i for i in range(steps))
  ok = len(weights) == steps and all(
      isinstance(w, (int, float, np.number)) and not isinstance(w, bool) and math.isfinite(w)
      and w >= 0 for w in weights) and any(w > 0 for w in weights)
  if not ok:
    raise ConfigError(f"config key train.ttt_weights={weights!r}: expected train.ttt_steps="
                      f"{steps} finite non-negative numbers, not all 0 (or () for 0.8^k)")
  return tuple(float(w) for w in weights)


class Step(NamedTuple):
  predict: Array  # [batch, seq, embed]: LM-head input of step k at every position
  regress: Array  # [batch, seq, embed]: its predicted next feature (fed to step k+1 at j+1)


def _shift(x: Array, by: int) -> Array:
  """x[:, j - by] at j along axis 1, zeros where j < by."""
  if by == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (by, 0)
  return jnp.pad(x[:, :x.shape[1] - by], pad)


def _chain_attention(draft: Draft, x: Array, q: Array, prefix_kv: tuple[Array, Array],
                     chain_kv: list[tuple[Array, Array]], k: int) -> Array:
  """Step k's attention output [batch, seq, embed] for queries q [batch, seq, heads, hd].

  prefix_kv: step 1's (keys, values) [batch, seq, kv_heads, hd] at every position;
  chain_kv: steps 2..k's, already shifted so that entry i-2 holds, at j, step i's K/V of
  position j - k + i. Scores, masking value, softmax and casts follow model.Attention."""
  attn = draft.layer.attn
  cfg = attn.cfg
  batch, seq = q.shape[:2]
  groups = cfg.num_heads // cfg.num_kv_heads
  qg = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
  keys, values = prefix_kv
  scale = 1.0 / np.sqrt(cfg.head_dim)
  scores = jnp.einsum("bskgh,btkh->bkgst", qg, keys.astype(q.dtype),
                      preferred_element_type=jnp.float32) * scale  # [b, kvh, g, seq, seq]
  j = jnp.arange(seq)
  prefix = j[None, :] <= (j - k + 1)[:, None]  # [seq(query), seq(key)]: positions <= anchor
  scores = jnp.where(prefix, scores, -1e30)
  if chain_kv:
    chain_keys = jnp.stack([kk for kk, _ in chain_kv], axis=2)  # [b, seq, k-1, kvh, hd]
    chain = jnp.einsum("bskgh,bsckh->bkgsc", qg, chain_keys.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale  # [b, kvh, g, seq, k-1]
    # Step i's key sits at position j - k + i, outside the row (masked) where that is < 0.
    inside = (j[:, None] - k + jnp.arange(2, k + 1)[None]) >= 0  # [seq, k-1]
    scores = jnp.concatenate([scores, jnp.where(inside, chain, -1e30)], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)  # [b, kvh, g, seq, seq + k-1]
  out = jnp.einsum("bkgst,btkh->bskgh", probs[..., :seq], values.astype(x.dtype))
  if chain_kv:
    chain_values = jnp.stack([vv for _, vv in chain_kv], axis=2)  # [b, seq, k-1, kvh, hd]
    out = out + jnp.einsum("bkgsc,bsckh->bskgh", probs[..., seq:],
                           chain_values.astype(x.dtype))
  out = out.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
  out = jnp.einsum("bshk,hkd->bsd", out, kernel(attn, "o_kernel", x.dtype))
  if cfg.o_bias:
    out = out + attn.o_bias[...]
  return out


def unrolled_forward(draft: Draft, features: Array, embeddings: Array, steps: int
                     ) -> list[Step]:
  """The draft unrolled `steps` times over whole sequences (see the module docstring).

  features: [batch, seq, embed] f(j) for step 1; embeddings: [batch, seq, embed] e(t(j+1)).
  Returns one Step per k = 1..steps, each [batch, seq, embed] indexed by position j."""
  layer_cfg = draft.cfg.layer_config
  if layer_cfg.sliding_window is not None:
    raise ValueError("training-time test does not support a sliding-window draft")
  batch, seq = features.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  cos, sin = rope_tables(layer_cfg, positions)
  out: list[Step] = []
  prefix_kv, earlier = None, []  # earlier: steps 2..k-1's unshifted K/V at their positions
  feats = features
  for k in range(1, steps + 1):
    x = draft.fuse_inputs(feats, embeddings)  # [batch, seq, embed]
    q, key, value = draft.layer.attn.project(draft.layer.attention_input(x), cos, sin)
    if k == 1:
      prefix_kv = (key, value)
      chain = []
    else:
      earlier.append((key, value))
      # Step i (2 <= i <= k) at j reads its K/V at position j - k + i: shifted by k - i.
      chain = [(_shift(kk, k - i), _shift(vv, k - i))
               for i, (kk, vv) in enumerate(earlier, start=2)]
    h = _chain_attention(draft, x, q, prefix_kv, chain, k)
    predict, regress = draft.layer.finish(x, h)
    out.append(Step(predict, regress))
    feats = _shift(regress, 1)  # step k+1 at j reads step k's regress at j-1
  return out
