"""Llama-family decoder (Llama 2/3/3.1/3.2, Vicuna, Mistral, Qwen2) in Flax NNX.

The modules hold parameters only as `nnx.Param`s tagged with logical axes; the forward
pass is a plain function of (params, inputs, cache). Entry points split the model once
(`graphdef, params = nnx.split(model)`) and jit pure functions of the `params` pytree.

Attention works on a *block* of new tokens against a static-size KV cache holding every
layer in one buffer [layers, batch, kv_heads, slots, head_dim], write-then-attend:
  * the block's K/V are written at explicit cache slots (`write_slots`, right after the
    committed prefix by default), in place, so that a later step can commit any subset of
    the block by moving slots (`move_slots`: one gather and one scatter for all layers);
  * then every new token attends over the cache: to the committed prefix of its row
    (slots < cache.lengths[b]) plus the slots of the block's tokens it may see
    (`block_mask[b, i, j]`: causal by default, a tree's ancestor mask for verification).
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
from fspad_jax.quant import SCALE_SUFFIX, dequantize
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


def kernel(module: nnx.Module, name: str, dtype) -> Array:
  """A module's matmul kernel `name`; dequantized inside the product when the module holds
  int8 values with per-channel scales (`<name>_scale`, fspad_jax.quant: int8 drafts)."""
  w = getattr(module, name)[...]
  scale = getattr(module, name + SCALE_SUFFIX, None)
  return w if scale is None else dequantize(w, scale[...], dtype)


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
  # rotate_half(x) = [-x2; x1], built by a reshape and stack: XLA fuses it with the products
  # below, where slicing and concatenating the halves costs separate kernels.
  halves = x.reshape(*x.shape[:-1], 2, half)  # [..., 2, head_dim/2]
  rotated = jnp.stack([-halves[..., 1, :], halves[..., 0, :]], axis=-2).reshape(x.shape)
  xf = x.astype(jnp.float32)
  out = xf * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
  """Static-size KV cache of every layer, keys and values in one buffer, so that a forward
  writes a layer's new K and V with one update, and moving slots (committing an accepted
  path) is one gather and one scatter for all layers together.

  Slot s of row b holds the token at position s of that row; slots < lengths[b] are the
  committed prefix, slots beyond it are scratch that a forward may write (a draft tree)."""

  kv: Array  # [layers, batch, 2, kv_heads, max_len, head_dim]: K at [:, :, 0], V at [:, :, 1]
  lengths: Array  # [batch] int32: number of committed tokens per row

  @property
  def max_len(self) -> int:
    return self.kv.shape[4]

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or cfg.dtype
    # Heads before slots: attention reads a layer's keys (values) as [batch, kv_heads, slots,
    # head_dim], the operand layout its batched matmuls take without a transposed copy.
    shape = (cfg.num_layers, batch, 2, cfg.num_kv_heads, max_len, cfg.head_dim)
    return cls(kv=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

  def shardings(self, mesh, rules) -> "KVCache":
    """This cache's NamedShardings (its leaves may be arrays or eval_shape's structs): K/V
    in the `kv_cache` layout (rows over the batch axes, KV heads over `tensor`), lengths
    over the batch axes; a dimension the mesh axes do not divide is replicated. The one
    cache layout of target forwards, decode loops and continuous batching's slots."""
    return self.replace(
        kv=rules.sharding(mesh, LOGICAL_LAYOUTS["kv_cache"], self.kv.shape),
        lengths=rules.sharding(mesh, LOGICAL_LAYOUTS["batch_vector"], self.lengths.shape))


def move_slots(cache: KVCache, src: Array, dst: Array, lengths: Array) -> KVCache:
  """Copies every layer's K/V from slots src to slots dst ([batch, n] each; a dst out of
  range is dropped) and sets `lengths`: one gather and one scatter."""
  rows = jnp.arange(src.shape[0])[:, None]  # [batch, 1]
  kv = cache.kv.at[:, rows, :, :, dst].set(cache.kv[:, rows, :, :, src], mode="drop")
  return KVCache(kv=kv, lengths=lengths)


class AttentionInputs(NamedTuple):
  """Per-call attention geometry shared by all layers (write-then-attend).

  With a cache, each layer first writes the block's K/V at `write_slots`, then every query
  attends over the cache's slots: `mask` says which. Vanilla steps, prefill, tree verify and
  draft passes all run this one path, so the target's reductions have one shape and order."""

  cos: Array  # [batch, seq, head_dim]
  sin: Array  # [batch, seq, head_dim]
  mask: Array  # [batch, seq, max_len] bool over cache slots ([batch, seq, seq] without a cache)
  write_slots: Array | None  # [batch, seq] int32 (out of range: not written); None: no cache
  # Static: when every row writes the block at the same contiguous slots write_start +
  # 0..seq-1 (a draft tree level's scratch slots), the write is one dynamic-update-slice
  # per buffer instead of a scatter (write_slots must then equal those slots).
  write_start: int | None = None


def make_attention_inputs(cfg: ModelConfig, positions: Array, cache_lengths: Array | None,
                          max_len: int, block_mask: Array | None,
                          write_slots: Array | None) -> AttentionInputs:
  """Masks in cache-slot space. cache_lengths None means no KV cache: the block attends only
  to itself (training).

  max_len is the attention span: queries see slots 0..max_len-1 only, so a span below the
  cache's size (every slot in use, the block's write slots included, must lie below it)
  reads that many slots per layer instead of the whole cache.

  A query sees the committed prefix (slots < cache_lengths) and the slots where the block's
  tokens it may see (block_mask, causal by default) are written."""
  batch, seq = positions.shape
  cos, sin = rope_tables(cfg, positions)
  window = cfg.sliding_window
  slots = jnp.arange(max_len, dtype=jnp.int32)
  contiguous = cache_lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None] if (
      cache_lengths is not None) else None  # [batch, seq]: the slots right after the prefix
  if cache_lengths is not None and write_slots is None and block_mask is None:
    # Contiguous causal block right after the prefix: query i sees slots < lengths + i + 1.
    mask = slots[None, None, :] <= contiguous[:, :, None]  # [batch, seq, max_len]
    if window is not None:  # every visible slot s holds position s
      mask &= positions[:, :, None] - slots[None, None, :] < window
    return AttentionInputs(cos, sin, mask, contiguous)

  if block_mask is None:
    block_mask = jnp.tril(jnp.ones((seq, seq), bool))[None].repeat(batch, 0)
  if window is not None:
    block_mask &= positions[:, :, None] - positions[:, None, :] < window
  if cache_lengths is None:
    return AttentionInputs(cos, sin, block_mask, None)
  if write_slots is None:
    # Contiguous block at slots lengths + 0..seq-1: slot s holds block key s - lengths, so
    # the block part of the mask is block_mask read at that offset (one gather; no
    # [batch, seq, seq, max_len] reduction).
    write_slots = contiguous
    key = slots[None, :] - cache_lengths[:, None]  # [batch, max_len]
    in_range = (key >= 0) & (key < seq)  # [batch, max_len]
    gathered = jnp.take_along_axis(
        block_mask, jnp.broadcast_to(jnp.clip(key, 0, seq - 1)[:, None], (batch, seq, max_len)),
        axis=2)  # [batch, seq, max_len]
    in_block = gathered & in_range[:, None]
  else:
    at_slot = write_slots[:, :, None] == slots[None, None, :]  # [batch, seq(key), max_len]
    in_block = jnp.any(block_mask[:, :, :, None] & at_slot[:, None], axis=2)  # [b, seq, max_len]
  mask = (slots[None, None, :] < cache_lengths[:, None, None]) | in_block
  if window is not None:
    # Committed slot s holds position s; block slots were windowed through block_mask.
    in_window = positions[:, :, None] - slots[None, None, :] < window
    mask &= in_window | (slots[None, None, :] >= cache_lengths[:, None, None])
  return AttentionInputs(cos, sin, mask, write_slots.astype(jnp.int32))


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, d_in: int | None = None):
    """d_in: width of the attention input (default hidden_size; EAGLE-3's draft reads 2d)."""
    d, h, kvh, hd, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    d_in = d_in or d
    self.cfg = cfg
    self.q_kernel = _param(rngs, "q_kernel", (d_in, h, hd), dt)  # [embed_in, heads, head_dim]
    self.kv_kernel = _param(rngs, "kv_kernel", (d_in, 2, kvh, hd), dt)  # k and v fused
    self.o_kernel = _param(rngs, "o_kernel", (h, hd, d), dt)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, "q_bias", (h, hd), dt, init="zeros")
      self.kv_bias = _param(rngs, "kv_bias", (2, kvh, hd), dt, init="zeros")
    if cfg.o_bias:
      self.o_bias = _param(rngs, "norm", (d,), dt, init="zeros")

  def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
    """x [batch, seq, embed] -> RoPE'd q [batch, seq, heads, head_dim] and RoPE'd k, plain v
    [batch, seq, kv_heads, head_dim]."""
    q = jnp.einsum("bsd,dhk->bshk", x, kernel(self, "q_kernel", x.dtype))  # [b, s, h, hd]
    kv = jnp.einsum("bsd,dckh->bsckh", x, kernel(self, "kv_kernel", x.dtype))  # [b,s,2,kvh,hd]
    if self.cfg.qkv_bias:
      q = q + self.q_bias[...]
      kv = kv + self.kv_bias[...]
    k, v = kv[:, :, 0], kv[:, :, 1]  # [batch, seq, kv_heads, head_dim]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def __call__(self, x: Array, cache: KVCache | None, layer: int, att: AttentionInputs
               ) -> tuple[Array, KVCache | None]:
    """x: [batch, seq, embed]. Writes this block's K/V into layer `layer` of the cache, then
    attends over the cache (or, without a cache, over the block). Returns (out, cache)."""
    cfg = self.cfg
    q, k, v = self.project(x, att.cos, att.sin)
    batch, seq = x.shape[:2]
    if cache is None:
      keys, values = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [batch, kv_heads, seq, head_dim]
    else:
      new = jnp.stack([k, v], axis=2).astype(cache.kv.dtype)  # [batch, seq, 2, kv_heads, hd]
      # Write first (in place; out-of-range slots are dropped), then read the layer.
      if att.write_start is None:
        # Rows and slots are the scatter's indices; K/V, heads and head_dim its window, so a
        # cache split over KV heads (tensor) is written in place on each shard, with no
        # all-gather of the new K/V or of the indices.
        rows = jnp.arange(batch)[:, None]  # [batch, 1]
        kv = cache.kv.at[layer, rows, :, :, att.write_slots].set(new, mode="drop")
      else:  # the same contiguous slots in every row: one slice update
        kv = jax.lax.dynamic_update_slice(cache.kv, new.transpose(0, 2, 3, 1, 4)[None],
                                          (layer, 0, 0, 0, att.write_start, 0))
      cache = cache.replace(kv=kv)
      # Read only the attention span (the mask's width: the slots in use, see
      # make_attention_inputs); the whole layer when the span is the cache.
      span = att.mask.shape[-1]
      keys = cache.kv[layer, :, 0, :, :span]  # [batch, kv_heads, span, head_dim]
      values = cache.kv[layer, :, 1, :, :span]
    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("bskgh,bkth->bkgst", qg, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) / np.sqrt(cfg.head_dim)
    scores = jnp.where(att.mask[:, None, None], scores, -1e30)  # [b, kvh, g, seq, keys]
    # Softmax with the normalization deferred to the output (as flash attention does): the
    # unnormalized weights keep the queries-major layout the second matmul reads, so the
    # values need no transposed copy and the weights no normalized copy.
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # [b, kvh, g, s, keys]
    denom = jnp.sum(weights, axis=-1)  # [batch, kv_heads, groups, seq]
    out = jnp.einsum("bkgst,bkth->bkgsh", weights.astype(x.dtype), values.astype(x.dtype),
                     preferred_element_type=jnp.float32)  # [b, kvh, g, seq, head_dim]
    out = (out / denom[..., None]).astype(x.dtype)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    out = jnp.einsum("bshk,hkd->bsd", out, kernel(self, "o_kernel", x.dtype))
    if cfg.o_bias:
      out = out + self.o_bias[...]
    return out, cache


class MLP(nnx.Module):
  def __init__(self, d: int, d_ff: int, dtype, rngs: nnx.Rngs, d_out: int | None = None):
    self.gate_up_kernel = _param(rngs, "gate_up_kernel", (d, 2, d_ff), dtype)
    self.down_kernel = _param(rngs, "down_kernel", (d_ff, d_out or d), dtype)

  def __call__(self, x: Array) -> Array:
    gate_up = jnp.einsum("bsd,dcf->bscf", x, kernel(self, "gate_up_kernel", x.dtype))
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]  # [batch, seq, d_ff]
    return jnp.einsum("bsf,fd->bsd", hidden, kernel(self, "down_kernel", x.dtype))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, rngs)
    self.attn = Attention(cfg, rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, rngs)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, rngs)

  def __call__(self, x, cache: KVCache | None, layer: int, att: AttentionInputs):
    h, cache = self.attn(self.input_norm(x), cache, layer, att)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return x, cache


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
               block_mask: Array | None = None, write_slots: Array | None = None,
               span: int | None = None) -> tuple[Array, KVCache | None]:
    """Runs a block of new tokens. Returns (features [batch, seq, embed], cache).

    tokens, positions: [batch, seq] int32 (positions drive RoPE; for a tree, prefix
    length + depth). block_mask: [batch, seq, seq] bool among the block (default causal).
    write_slots: [batch, seq] cache slots for the block's K/V (default: right after the
    committed prefix). The returned cache keeps `lengths`: callers commit explicitly.
    With cache=None the block attends only to itself and no cache is kept (training).
    span (static): attend over cache slots < span only (default: the whole cache); every
    committed slot and write slot of a row must lie below it.
    """
    feats, _, cache = self.features_and_taps(tokens, positions, cache, (), block_mask,
                                             write_slots, span)
    return feats, cache

  def features_and_taps(self, tokens: Array, positions: Array, cache: KVCache | None,
                        layers: tuple[int, ...], block_mask: Array | None = None,
                        write_slots: Array | None = None, span: int | None = None
                        ) -> tuple[Array, Array | None, KVCache | None]:
    """`features`, plus the hidden states of `layers` from the same pass (no extra work).

    layers index Hugging Face's `output_hidden_states`: 0 = the embeddings, i = the output
    of decoder layer i (1-based, the residual stream before any norm), num_layers = the final
    normed feature; negative indices count from the end (-1 = the final feature). Returns
    (features [batch, seq, embed], taps [batch, seq, len(layers) * embed] concatenated in
    the order given (None for no layers), cache)."""
    layers = resolve_feature_layers(layers, self.cfg.num_layers)
    if cache is None:
      att = make_attention_inputs(self.cfg, positions, None, 0, block_mask, None)
    else:
      att = make_attention_inputs(self.cfg, positions, cache.lengths,
                                  min(span or cache.max_len, cache.max_len), block_mask,
                                  write_slots)
    x = self.embed(tokens)
    hidden = {0: x} if 0 in layers else {}
    for index, layer in enumerate(self.layers):
      x, cache = layer(x, cache, index, att)
      if index + 1 in layers:
        hidden[index + 1] = x
    feats = self.final_norm(x)
    hidden[self.cfg.num_layers] = feats  # the final index means the normed feature
    taps = jnp.concatenate([hidden[i] for i in layers], axis=-1) if layers else None
    return feats, taps, cache

  def __call__(self, tokens, positions, cache, block_mask=None, write_slots=None, span=None):
    """Returns (logits [batch, seq, vocab] float32, features [batch, seq, embed], cache)."""
    feats, cache = self.features(tokens, positions, cache, block_mask, write_slots, span)
    return self.logits(feats), feats, cache


def resolve_feature_layers(layers, num_layers: int) -> tuple[int, ...]:
  """Feature-layer indices (Transformer.features_and_taps) as 0..num_layers; negative ones
  count from the end. Raises ValueError for an index outside -(L+1)..L."""
  out = []
  for i in layers:
    if not -(num_layers + 1) <= int(i) <= num_layers:
      raise ValueError(f"feature layer {i} is outside 0..{num_layers} (-1 = the final "
                       f"feature) for a {num_layers}-layer target")
    out.append(int(i) % (num_layers + 1))
  return tuple(out)


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialized target (tests and benchmarks)."""
  return Transformer(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model's structure with ShapeDtypeStructs: no memory allocated."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))
