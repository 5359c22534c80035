"""Draft heads: cached/blocked/tree drafting equals the full forward; the formulas as written."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fspad_jax.config import ConfigError
from fspad_jax.draft import (DRAFT_KINDS, EAGLE_LAYOUT_KINDS, DraftConfig, draft_config_from_target, draft_step,
                             init_draft, init_draft_cache)
from fspad_jax.model import init_model, rope_inverse_frequencies
from fspad_jax.tiny_checkpoint import tiny_config

TARGET = tiny_config(vocab_size=80, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=48)
D = TARGET.hidden_size
MAX_LEN = 16


def randomized(draft, seed=1):
  """The draft with every param random (norm weights near 1, biases non-zero)."""
  graphdef, state = nnx.split(draft)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [(0.15 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)).astype(x.dtype)
         for k, x in zip(keys, leaves)]
  return graphdef, jax.tree.unflatten(treedef, new)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, features, embeddings, positions, cache, block_mask=None,
            write_slots=None):
  return nnx.merge(graphdef, params)(features, embeddings, positions, cache, block_mask,
                                     write_slots)


def inputs(batch, seq, seed=0, dtype=jnp.float32):
  kf, ke = jax.random.split(jax.random.key(seed))
  features = jax.random.normal(kf, (batch, seq, D)).astype(dtype)  # [batch, seq, embed]
  embeddings = jax.random.normal(ke, (batch, seq, D)).astype(dtype)
  return features, embeddings


def arange_positions(batch, seq, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + seq, dtype=jnp.int32), (batch, seq))


def make(kind, **overrides):
  cfg = draft_config_from_target(TARGET, kind, **overrides)
  graphdef, params = randomized(init_draft(cfg))
  return cfg, graphdef, params


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_incremental_and_block_equal_full(kind):
  cfg, graphdef, params = make(kind)
  batch, seq = 2, 7
  feats, embs = inputs(batch, seq)
  empty = init_draft_cache(cfg, batch, MAX_LEN)
  full = forward(graphdef, params, feats, embs, arange_positions(batch, seq), empty)
  if kind in ("eagle", "fs_only"):
    np.testing.assert_array_equal(full.predict, full.regress)
  else:
    assert not np.allclose(full.predict, full.regress)

  # Prefix block, rows committed at different lengths, then one token at a time per row.
  out = forward(graphdef, params, feats[:, :3], embs[:, :3], arange_positions(batch, 3), empty)
  lengths = jnp.array([3, 2], jnp.int32)
  cache = out.cache.replace(lengths=lengths)
  rows = jnp.arange(batch)
  for _ in range(4):
    out = forward(graphdef, params, feats[rows, lengths][:, None], embs[rows, lengths][:, None],
                  lengths[:, None], cache)
    for name in ("predict", "regress"):
      np.testing.assert_allclose(getattr(out, name)[:, 0], getattr(full, name)[rows, lengths],
                                 atol=2e-5, rtol=1e-5)
    lengths = lengths + 1
    cache = out.cache.replace(lengths=lengths)

  # Prefix, then a block of 4 with an explicit causal mask.
  out = forward(graphdef, params, feats[:, :3], embs[:, :3], arange_positions(batch, 3), empty)
  cache = out.cache.replace(lengths=jnp.full((batch,), 3, jnp.int32))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((4, 4), bool)), (batch, 4, 4))
  out = forward(graphdef, params, feats[:, 3:], embs[:, 3:], arange_positions(batch, 4, 3),
                cache, causal)
  np.testing.assert_allclose(out.predict, full.predict[:, 3:], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out.regress, full.regress[:, 3:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_tree_block_equals_each_path(kind):
  cfg, graphdef, params = make(kind)
  batch, prefix, seq = 2, 3, 7  # the shapes of the test above: compiled once
  parents = [-1, 0, 0, 1]  # node i's parent in the block; -1: child of the prefix
  n = len(parents)
  paths = []
  for i in range(n):
    path = [i]
    while parents[path[0]] >= 0:
      path.insert(0, parents[path[0]])
    paths.append(path)
  ancestors = np.zeros((n, n), bool)  # [node, node]: ancestor-or-self
  for i, path in enumerate(paths):
    ancestors[i, path] = True

  feats, embs = inputs(batch, prefix + n, seed=3)  # prefix inputs, then one per tree node
  empty = init_draft_cache(cfg, batch, MAX_LEN)
  out = forward(graphdef, params, feats[:, :prefix], embs[:, :prefix],
                arange_positions(batch, prefix), empty)
  cache = out.cache.replace(lengths=jnp.full((batch,), prefix, jnp.int32))
  depth = np.array([len(p) - 1 for p in paths])
  positions = jnp.broadcast_to(jnp.asarray(prefix + depth, jnp.int32), (batch, n))
  tree = forward(graphdef, params, feats[:, prefix:], embs[:, prefix:], positions, cache,
                 jnp.broadcast_to(jnp.asarray(ancestors), (batch, n, n)))

  for i, path in enumerate(paths):
    # The node's path as a plain causal sequence, right-padded (never attended to).
    index = list(range(prefix)) + [prefix + j for j in path]
    index += [0] * (seq - len(index))
    ref = forward(graphdef, params, feats[:, index], embs[:, index],
                  arange_positions(batch, seq), empty)
    last = prefix + len(path) - 1
    np.testing.assert_allclose(tree.predict[:, i], ref.predict[:, last], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(tree.regress[:, i], ref.regress[:, last], atol=2e-5, rtol=1e-5)


def test_shapes_default_to_target():
  for kind in EAGLE_LAYOUT_KINDS:  # eagle3 / fspad3: tests/test_eagle3.py
    cfg = draft_config_from_target(TARGET, kind)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.rms_norm_eps, cfg.rope, cfg.dtype) == (
                TARGET.hidden_size, TARGET.num_heads, TARGET.num_kv_heads, TARGET.head_dim,
                TARGET.intermediate_size, TARGET.rms_norm_eps, TARGET.rope, TARGET.dtype)
    _, state = nnx.split(init_draft(cfg))
    flat = {p: v.get_value().shape for p, v in nnx.to_flat_state(state)}
    d, f = TARGET.hidden_size, TARGET.intermediate_size
    assert flat[("fc", "kernel")] == (2, d, d)
    assert flat[("layer", "attn", "q_kernel")] == (d, TARGET.num_heads, TARGET.head_dim)
    assert flat[("layer", "mlp", "down_kernel")] == (f, 2 * d if cfg.partial_alignment else d)
    assert (("feature_sampling", "gate_up_kernel") in flat) == cfg.feature_sampling
    assert not any(TARGET.vocab_size in s for s in flat.values())  # no embedding / LM head
    assert sum(int(np.prod(s)) for s in flat.values()) == cfg.num_params
  small = draft_config_from_target(TARGET, "fspad", intermediate_size=16, num_kv_heads=4)
  assert small.intermediate_size == 16 and small.num_kv_heads == 4
  with pytest.raises(ConfigError, match="hidden_size"):
    draft_config_from_target(TARGET, "eagle", hidden_size=16)
  with pytest.raises(ConfigError, match="kind"):
    draft_config_from_target(TARGET, "medusa")


def test_bfloat16_runs_and_tracks_float32():
  target = init_model(TARGET.replace(dtype="bfloat16"))
  batch, seq = 2, 7
  feats, embs = inputs(batch, seq)
  tokens = jax.random.randint(jax.random.key(5), (batch, seq), 0, TARGET.vocab_size)
  outs = {}
  for dtype in ("float32", "bfloat16"):  # same random draws, rounded to bf16
    cfg = draft_config_from_target(TARGET, "fspad", dtype=dtype)
    draft = init_draft(cfg, seed=0)
    out = forward(*nnx.split(draft), feats.astype(dtype), embs.astype(dtype),
                  arange_positions(batch, seq), init_draft_cache(cfg, batch, MAX_LEN))
    assert out.predict.dtype == out.regress.dtype == out.cache.kv[0].dtype == jnp.dtype(dtype)
    outs[dtype] = out
  bf16 = np.asarray(outs["bfloat16"].regress, np.float32)
  assert np.isfinite(bf16).all()
  np.testing.assert_allclose(bf16, outs["float32"].regress, atol=0.1, rtol=0.05)

  logits, out = nnx.jit(draft_step)(draft, target, feats.astype("bfloat16"), tokens,
                                    arange_positions(batch, seq),
                                    init_draft_cache(cfg, batch, MAX_LEN))
  assert logits.shape == (batch, seq, TARGET.vocab_size) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, nnx.jit(lambda t, x: t.logits(x))(target, out.predict))


# --- The formulas of shared/DESIGN.md 1.1-1.2, by hand in numpy (float64) -------------------


def _rms(x, w, eps):
  return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _silu(x):
  return x / (1 + np.exp(-x))


def _reference(cfg: DraftConfig, p, f, e):
  """p: flat params as float64 numpy; f, e: [seq, d]. Returns (predict, regress)."""
  d, h, kvh, hd, eps = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, \
      cfg.rms_norm_eps
  seq = f.shape[0]
  w_fc = p["fc", "kernel"].reshape(2 * d, d)  # [2d, d]: rows [:d] read e, rows [d:] read f
  h_fc = np.concatenate([e, f], -1) @ w_fc + p["fc", "bias"]  # h = W_fc [e; f] + b
  x = h_fc
  if cfg.feature_sampling:
    w_gate = p["feature_sampling", "gate_up_kernel"][0]  # [d, d_ff]
    w_up = p["feature_sampling", "gate_up_kernel"][1]
    w_down = p["feature_sampling", "down_kernel"]  # [d_ff, d]
    normed = _rms(h_fc, p["feature_sampling", "norm", "weight"], eps)
    x = h_fc + (_silu(e @ w_gate) * (normed @ w_up)) @ w_down

  # Attention with RoPE (rotate-half), causal, grouped KV heads; no input norm.
  q = (x @ p["layer", "attn", "q_kernel"].reshape(d, h * hd)).reshape(seq, h, hd)
  k = (x @ p["layer", "attn", "kv_kernel"][:, 0].reshape(d, kvh * hd)).reshape(seq, kvh, hd)
  v = (x @ p["layer", "attn", "kv_kernel"][:, 1].reshape(d, kvh * hd)).reshape(seq, kvh, hd)
  inv = np.asarray(rope_inverse_frequencies(cfg.layer_config))
  ang = np.arange(seq)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = lambda t: t * cos[:, None] + np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]],
                                                    -1) * sin[:, None]
  q, k = rot(q), rot(k)
  heads = []
  for head in range(h):
    kv = head // (h // kvh)
    s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
    s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    heads.append((w / w.sum(-1, keepdims=True)) @ v[:, kv])
  attn = np.concatenate(heads, -1) @ p["layer", "attn", "o_kernel"].reshape(h * hd, d)
  a = x + attn  # post-attention hidden state

  m = _rms(a, p["layer", "post_attn_norm", "weight"], eps)
  mlp = (_silu(m @ p["layer", "mlp", "gate_up_kernel"][:, 0])
         * (m @ p["layer", "mlp", "gate_up_kernel"][:, 1])) @ p["layer", "mlp", "down_kernel"]
  if cfg.partial_alignment:
    o = np.concatenate([a, a], -1) + mlp  # o = [a; a] + MLP(RMSNorm(a)), MLP: d_ff -> 2d
    return o[:, :d], o[:, d:]
  o = a + mlp
  return o, o


@pytest.mark.parametrize("kind", EAGLE_LAYOUT_KINDS)  # eagle3: the torch reference, test_eagle3
def test_formulas_by_hand(kind):
  cfg, graphdef, params = make(kind)
  p = {path: np.asarray(v.get_value(), np.float64) for path, v in nnx.to_flat_state(params)}
  feats, embs = inputs(2, 7, seed=7)
  out = forward(graphdef, params, feats, embs, arange_positions(2, 7),
                init_draft_cache(cfg, 2, MAX_LEN))
  for row in range(2):
    predict, regress = _reference(cfg, p, np.asarray(feats[row], np.float64),
                                  np.asarray(embs[row], np.float64))
    np.testing.assert_allclose(out.predict[row], predict, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out.regress[row], regress, atol=2e-5, rtol=1e-5)
