"""Llama-family decoder (Llama 2/3/3.1/3.2, Vicuna, Mistral, Qwen2) in Flax NNX.

The modules hold parameters only as `nnx.Param`s tagged with logical axes; the forward
pass is a plain function of (params, inputs, cache). Entry points split the model once
(`graphdef, params = nnx.split(model)`) and jit pure functions of the `params` pytree.

Attention works on a *block* of new tokens against a static-size KV cache:
  * every new token attends to the cached prefix of its row (slots < cache.lengths[b]),
  * plus the block's own tokens where `block_mask[b, i, j]` is true (causal by default;
    a tree's ancestor mask for verification),
  * and its K/V are written at explicit cache slots (`write_slots`), so that a later step
    can commit any subset of the block by copying slots.
Layers are a Python list unrolled inside jit: on GPU a `lax.scan` over stacked layer
weights ran at ~1/3 of the bandwidth of the unrolled form (shared/DESIGN.md section 2).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fspad_jax.config import ModelConfig, rope_inverse_frequencies
from fspad_jax.sharding import LOGICAL_LAYOUTS

Array = jax.Array


def _param(rngs: nnx.Rngs, layout: str, shape, dtype, init="normal", std=0.02) -> nnx.Param:
  if init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=LOGICAL_LAYOUTS[layout])


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """RMSNorm as transformers computes it: normalize in float32, scale in the input dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
    self.weight = _param(rngs, "norm", (dim,), dtype, init="ones")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    return rms_norm(x, self.weight[...], self.eps)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
  """cos, sin for integer positions [...]: each [..., head_dim], float32."""
  inv_freq = jnp.asarray(np.asarray(rope_inverse_frequencies(cfg), np.float32))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [..., head_dim]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, head_dim]. HF rotate_half form."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  xf = x.astype(jnp.float32)
  out = xf * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
  """Static-size KV cache. Slot s of row b holds the token at position s of that row."""

  k: tuple[Array, ...]  # per layer: [batch, max_len, kv_heads, head_dim]
  v: tuple[Array, ...]  # per layer: [batch, max_len, kv_heads, head_dim]
  lengths: Array  # [batch] int32: number of committed tokens per row

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or cfg.dtype
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype)
    return cls(k=tuple(zeros() for _ in range(cfg.num_layers)),
               v=tuple(zeros() for _ in range(cfg.num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))


class AttentionInputs(NamedTuple):
  """Per-call attention geometry shared by all layers."""

  cos: Array  # [batch, seq, head_dim]
  sin: Array  # [batch, seq, head_dim]
  mask: Array  # [batch, seq, max_len + seq] bool: cached prefix slots, then the block
  #              ([batch, seq, seq] when running without a cache)
  write_slots: Array | None  # [batch, seq] int32; None without a cache


def make_attention_inputs(cfg: ModelConfig, positions: Array, cache_lengths: Array | None,
                          max_len: int, block_mask: Array | None,
                          write_slots: Array | None) -> AttentionInputs:
  """cache_lengths None means no KV cache: the block attends only to itself (training)."""
  batch, seq = positions.shape
  if block_mask is None:
    block_mask = jnp.tril(jnp.ones((seq, seq), bool))[None].repeat(batch, 0)
  if cfg.sliding_window is not None:
    block_mask &= positions[:, :, None] - positions[:, None, :] < cfg.sliding_window
  cos, sin = rope_tables(cfg, positions)
  if cache_lengths is None:
    return AttentionInputs(cos, sin, block_mask, None)
  slots = jnp.arange(max_len)
  prefix_mask = slots[None, None, :] < cache_lengths[:, None, None]  # [batch, 1, max_len]
  prefix_mask = jnp.broadcast_to(prefix_mask, (batch, seq, max_len))
  if cfg.sliding_window is not None:
    prefix_mask &= positions[:, :, None] - slots[None, None, :] < cfg.sliding_window
  mask = jnp.concatenate([prefix_mask, block_mask], axis=-1)
  if write_slots is None:
    write_slots = cache_lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None]
  return AttentionInputs(cos, sin, mask, write_slots.astype(jnp.int32))


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, kvh, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    self.cfg = cfg
    self.q_kernel = _param(rngs, "q_kernel", (d, h, hd), dt)  # [embed, heads, head_dim]
    self.kv_kernel = _param(rngs, "kv_kernel", (d, 2, kvh, hd), dt)  # k and v fused
    self.o_kernel = _param(rngs, "o_kernel", (h, hd, d), dt)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, "q_bias", (h, hd), dt, init="zeros")
      self.kv_bias = _param(rngs, "kv_bias", (2, kvh, hd), dt, init="zeros")
    if cfg.o_bias:
      self.o_bias = _param(rngs, "norm", (d,), dt, init="zeros")

  def __call__(self, x: Array, cache_k: Array, cache_v: Array, att: AttentionInputs
               ) -> tuple[Array, Array, Array]:
    """x: [batch, seq, embed]. Returns (out, new cache_k, new cache_v)."""
    cfg = self.cfg
    q = jnp.einsum("bsd,dhk->bshk", x, self.q_kernel[...])  # [batch, seq, heads, head_dim]
    kv = jnp.einsum("bsd,dckh->bsckh", x, self.kv_kernel[...])  # [b, s, 2, kv_heads, hd]
    if cfg.qkv_bias:
      q = q + self.q_bias[...]
      kv = kv + self.kv_bias[...]
    k, v = kv[:, :, 0], kv[:, :, 1]  # [batch, seq, kv_heads, head_dim]
    q = apply_rope(q, att.cos, att.sin)
    k = apply_rope(k, att.cos, att.sin)

    # Attend over [cached prefix slots ; this block], then write the block into the cache.
    if cache_k is None:
      keys, values = k, v  # [batch, seq, kv_heads, head_dim]
    else:
      keys = jnp.concatenate([cache_k, k.astype(cache_k.dtype)], axis=1)  # [b, max_len+s, ...]
      values = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=1)
    batch, seq = x.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("bskgh,btkh->bkgst", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) / np.sqrt(cfg.head_dim)
    scores = jnp.where(att.mask[:, None, None], scores, -1e30)  # [b, kvh, g, s, max_len+s]
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgst,btkh->bskgh", probs, values.astype(x.dtype))
    out = out.reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    out = jnp.einsum("bshk,hkd->bsd", out, self.o_kernel[...])
    if cfg.o_bias:
      out = out + self.o_bias[...]

    if cache_k is None:
      return out, None, None
    rows = jnp.arange(batch)[:, None]
    # Out-of-range slots are dropped, never written out of bounds.
    cache_k = cache_k.at[rows, att.write_slots].set(k.astype(cache_k.dtype), mode="drop")
    cache_v = cache_v.at[rows, att.write_slots].set(v.astype(cache_v.dtype), mode="drop")
    return out, cache_k, cache_v


class MLP(nnx.Module):
  def __init__(self, d: int, d_ff: int, dtype, rngs: nnx.Rngs, d_out: int | None = None):
    self.gate_up_kernel = _param(rngs, "gate_up_kernel", (d, 2, d_ff), dtype)
    self.down_kernel = _param(rngs, "down_kernel", (d_ff, d_out or d), dtype)

  def __call__(self, x: Array) -> Array:
    gate_up = jnp.einsum("bsd,dcf->bscf", x, self.gate_up_kernel[...])  # [b, s, 2, d_ff]
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return jnp.einsum("bsf,fd->bsd", hidden, self.down_kernel[...])


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, rngs)
    self.attn = Attention(cfg, rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, rngs)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, rngs)

  def __call__(self, x, cache_k, cache_v, att: AttentionInputs):
    h, cache_k, cache_v = self.attn(self.input_norm(x), cache_k, cache_v, att)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return x, cache_k, cache_v


class Transformer(nnx.Module):
  """Token embedding -> decoder layers -> final RMSNorm (the feature) -> LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(rngs, "embedding", (cfg.vocab_size, cfg.hidden_size), cfg.dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, "lm_head", (cfg.hidden_size, cfg.vocab_size), cfg.dtype)

  def embed(self, tokens: Array) -> Array:
    return jnp.take(self.embedding[...], tokens, axis=0)  # [batch, seq, embed]

  def logits(self, features: Array) -> Array:
    """features [..., embed] -> float32 logits [..., vocab]."""
    if self.cfg.tie_word_embeddings:
      return jnp.einsum("...d,vd->...v", features, self.embedding[...],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", features, self.lm_head[...],
                      preferred_element_type=jnp.float32)

  def features(self, tokens: Array, positions: Array, cache: KVCache | None,
               block_mask: Array | None = None, write_slots: Array | None = None
               ) -> tuple[Array, KVCache | None]:
    """Runs a block of new tokens. Returns (features [batch, seq, embed], cache).

    tokens, positions: [batch, seq] int32 (positions drive RoPE; for a tree, prefix
    length + depth). block_mask: [batch, seq, seq] bool among the block (default causal).
    write_slots: [batch, seq] cache slots for the block's K/V (default: right after the
    committed prefix). The returned cache keeps `lengths`: callers commit explicitly.
    With cache=None the block attends only to itself and no cache is kept (training).
    """
    if cache is None:
      att = make_attention_inputs(self.cfg, positions, None, 0, block_mask, None)
      caches = [(None, None)] * self.cfg.num_layers
    else:
      att = make_attention_inputs(self.cfg, positions, cache.lengths, cache.max_len,
                                  block_mask, write_slots)
      caches = list(zip(cache.k, cache.v))
    x = self.embed(tokens)
    new_k, new_v = [], []
    for layer, (ck, cv) in zip(self.layers, caches):
      x, ck, cv = layer(x, ck, cv, att)
      new_k.append(ck)
      new_v.append(cv)
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, cache.replace(k=tuple(new_k), v=tuple(new_v))

  def __call__(self, tokens, positions, cache, block_mask=None, write_slots=None):
    """Returns (logits [batch, seq, vocab] float32, features [batch, seq, embed], cache)."""
    feats, cache = self.features(tokens, positions, cache, block_mask, write_slots)
    return self.logits(feats), feats, cache


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialized target (tests and benchmarks)."""
  return Transformer(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model's structure with ShapeDtypeStructs: no memory allocated."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
