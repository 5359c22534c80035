"""Draft models ("autoregression heads") for feature-level speculative decoding, in Flax NNX.

A draft predicts the target's next *feature* (shared/DESIGN.md section 1). Its input at
sequence position j is the target feature f(j) and the target's embedding of the shifted
token t(j+1); RoPE uses position j (as EAGLE does). The token embedding and the LM head are
the target's, frozen, and are not part of the draft's params: callers pass embeddings in and
get draft logits from `Transformer.logits(out.predict)` (`draft_step` does both).

Kinds (`DraftConfig.kind`):
  * 'eagle':    x = fc([e; f]), one decoder layer without input RMSNorm; predict = regress.
  * 'fspad':    feature sampling (FS) block instead of the plain fc, and partial alignment
                (PAD): the layer's MLP projects to 2d on a duplicated residual, o = [a; a] +
                MLP(RMSNorm(a)); predict = o[..., :d] (LM head), regress = o[..., d:] (fed back).
  * 'fs_only':  FS block + plain layer.      * 'pad_only': plain fc + PAD layer.
FS: h = W_fc [e; f] + b;  x = h + W_down(SiLU(W_gate e) * (W_up RMSNorm(h))).

The layer reuses the target's `Attention` (RoPE positions, a static `KVCache` with per-row
lengths, `block_mask` among the new block, explicit `write_slots`), so a block of tree nodes
can be drafted with an ancestor mask. Like the target, the returned cache keeps `lengths`:
callers commit explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fspad_jax.config import ConfigError, ModelConfig, RopeConfig
from fspad_jax.model import (Attention, AttentionInputs, KVCache, MLP, RMSNorm, Transformer, _param, kernel, make_attention_inputs)

Array = jax.Array

DRAFT_KINDS = ("eagle", "fspad", "fs_only", "pad_only")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
  """Shapes and numerics of a draft head. Hashable, so usable as a jit static."""

  kind: str  # one of DRAFT_KINDS
  hidden_size: int  # must equal the target's
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  dtype: str = "float32"
  fc_bias: bool = True  # EAGLE's `bias` flag in config.json
  vocab_size: int = 0  # the target's (for config.json export and checks); 0 = unknown
  max_position_embeddings: int = 4096
  hot_vocab_size: int = 0  # N hot token ids the draft proposes (fspad_jax.hot_vocab); 0 = all
  qkv_bias: bool = False  # q/k/v projection biases (imported Qwen2 EAGLE heads: "qkv_bias")

  def __post_init__(self):
    if self.hot_vocab_size < 0 or (self.vocab_size and self.hot_vocab_size > self.vocab_size):
      raise ConfigError(f"draft hot_vocab_size={self.hot_vocab_size} must be in "
                        f"0..{self.vocab_size} (the target's vocabulary)")
    if self.kind not in DRAFT_KINDS:
      raise ConfigError(f"draft kind {self.kind!r}: expected one of {DRAFT_KINDS}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"draft num_heads={self.num_heads} is not a multiple of "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ConfigError(f"draft dtype={self.dtype!r}: expected float32, bfloat16 or float16")

  def replace(self, **kw) -> "DraftConfig":
    return dataclasses.replace(self, **kw)

  @property
  def feature_sampling(self) -> bool:
    return self.kind in ("fspad", "fs_only")

  @property
  def partial_alignment(self) -> bool:
    return self.kind in ("fspad", "pad_only")

  @property
  def layer_config(self) -> ModelConfig:
    """The decoder layer's geometry as a one-layer ModelConfig (for Attention and KVCache)."""
    return ModelConfig(
        vocab_size=max(self.vocab_size, 1), hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
        rope=self.rope, max_position_embeddings=self.max_position_embeddings, dtype=self.dtype,
        qkv_bias=self.qkv_bias)

  @property
  def num_params(self) -> int:
    d, f = self.hidden_size, self.intermediate_size
    attn = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    attn += self.num_heads * self.head_dim * d
    if self.qkv_bias:
      attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    fc = 2 * d * d + (d if self.fc_bias else 0)
    fs = 3 * d * f + d if self.feature_sampling else 0
    mlp = 2 * d * f + f * (2 * d if self.partial_alignment else d)
    return fc + fs + attn + d + mlp


def draft_config_from_target(target_cfg: ModelConfig, kind: str, **overrides) -> DraftConfig:
  """A draft shaped like one layer of the target (EAGLE's and FSPAD's default)."""
  cfg = DraftConfig(
      kind=kind, hidden_size=target_cfg.hidden_size, num_heads=target_cfg.num_heads,
      num_kv_heads=target_cfg.num_kv_heads, head_dim=target_cfg.head_dim,
      intermediate_size=target_cfg.intermediate_size, rms_norm_eps=target_cfg.rms_norm_eps,
      rope=target_cfg.rope, dtype=target_cfg.dtype, vocab_size=target_cfg.vocab_size,
      max_position_embeddings=target_cfg.max_position_embeddings).replace(**overrides)
  if cfg.hidden_size != target_cfg.hidden_size:
    raise ConfigError(f"draft hidden_size={cfg.hidden_size} must equal the target's "
                      f"({target_cfg.hidden_size}): the draft reads and predicts its features")
  return cfg


class DraftOutput(NamedTuple):
  predict: Array  # [batch, seq, embed]: LM-head input (draft logits = target.logits(predict))
  regress: Array  # [batch, seq, embed]: the predicted next feature, fed back when drafting
  cache: KVCache


class InputFusion(nnx.Module):
  """EAGLE's fc: [e; f] (2d) -> d, with optional bias. Kernel stacked as [2, d, d]."""

  def __init__(self, d: int, bias: bool, dtype, rngs: nnx.Rngs):
    # kernel[0] reads the embedding, kernel[1] the feature (EAGLE's concat order).
    self.kernel = _param(rngs, "draft_fc_kernel", (2, d, d), dtype)  # [2, embed, embed]
    self.use_bias = bias
    if bias:
      self.bias = _param(rngs, "norm", (d,), dtype, init="zeros")

  def __call__(self, embeddings: Array, features: Array) -> Array:
    inputs = jnp.stack([embeddings, features], axis=2)  # [batch, seq, 2, embed]
    h = jnp.einsum("bscd,cde->bse", inputs, kernel(self, "kernel", inputs.dtype))  # [b, s, d]
    if self.use_bias:
      h = h + self.bias[...]
    return h


class FeatureSampling(nnx.Module):
  """FSPAD's FS block: x = h + W_down(SiLU(W_gate e) * (W_up RMSNorm(h)))."""

  def __init__(self, d: int, d_ff: int, eps: float, dtype, rngs: nnx.Rngs):
    self.norm = RMSNorm(d, eps, dtype, rngs)
    # [0] = W_gate (reads the embedding), [1] = W_up (reads RMSNorm(h)). Stacked first: the
    # two read different inputs, so the stack is a batch axis of the matmul, and a batch
    # axis must lead for the matmul to read the kernel without a transposed copy per call.
    self.gate_up_kernel = _param(rngs, "fs_gate_up_kernel", (2, d, d_ff), dtype)
    self.down_kernel = _param(rngs, "down_kernel", (d_ff, d), dtype)

  def __call__(self, h: Array, embeddings: Array) -> Array:
    inputs = jnp.stack([embeddings, self.norm(h)], axis=2)  # [batch, seq, 2, embed]
    gate_up = jnp.einsum("bscd,cdf->bscf", inputs,
                         kernel(self, "gate_up_kernel", inputs.dtype))  # [b, s, 2, d_ff]
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]  # [batch, seq, d_ff]
    return h + jnp.einsum("bsf,fd->bsd", hidden, kernel(self, "down_kernel", hidden.dtype))


class DraftLayer(nnx.Module):
  """EAGLE's decoder layer (no input RMSNorm). With `split_output`, PAD's 2d-wide MLP on a
  duplicated residual; returns (predict, regress, cache)."""

  def __init__(self, layer_cfg: ModelConfig, split_output: bool, rngs: nnx.Rngs):
    d, dt = layer_cfg.hidden_size, layer_cfg.dtype
    self.split_output = split_output
    self.attn = Attention(layer_cfg, rngs)
    self.post_attn_norm = RMSNorm(d, layer_cfg.rms_norm_eps, dt, rngs)
    self.mlp = MLP(d, layer_cfg.intermediate_size, dt, rngs,
                   d_out=2 * d if split_output else None)

  def __call__(self, x: Array, cache: KVCache, att: AttentionInputs):
    h, cache = self.attn(x, cache, 0, att)
    a = x + h  # [batch, seq, embed]: post-attention hidden state
    update = self.mlp(self.post_attn_norm(a))  # [batch, seq, embed or 2*embed]
    if not self.split_output:
      out = a + update
      return out, out, cache
    d = a.shape[-1]
    out = jnp.concatenate([a, a], axis=-1) + update  # [batch, seq, 2*embed]
    return out[..., :d], out[..., d:], cache


class Draft(nnx.Module):
  """A draft head of any kind in DRAFT_KINDS; see the module docstring."""

  def __init__(self, cfg: DraftConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt = cfg.hidden_size, cfg.dtype
    self.fc = InputFusion(d, cfg.fc_bias, dt, rngs)
    if cfg.feature_sampling:
      self.feature_sampling = FeatureSampling(d, cfg.intermediate_size, cfg.rms_norm_eps, dt,
                                              rngs)
    self.layer = DraftLayer(cfg.layer_config, cfg.partial_alignment, rngs)

  def fuse_inputs(self, features: Array, embeddings: Array) -> Array:
    """[batch, seq, embed] x2 -> the decoder layer's input [batch, seq, embed]."""
    dtype = jnp.dtype(self.cfg.dtype)
    features, embeddings = features.astype(dtype), embeddings.astype(dtype)
    h = self.fc(embeddings, features)
    if self.cfg.feature_sampling:
      h = self.feature_sampling(h, embeddings)
    return h

  def __call__(self, features: Array, embeddings: Array, positions: Array, cache: KVCache,
               block_mask: Array | None = None, write_slots: Array | None = None
               ) -> DraftOutput:
    """Runs a block of draft inputs against the draft's cache.

    features: [batch, seq, embed] f(j) (target features, or the draft's fed-back `regress`);
    embeddings: [batch, seq, embed] the target's embedding of t(j+1); positions: [batch, seq]
    int32, j (prefix length + depth for tree nodes). block_mask [batch, seq, seq] bool among
    the block (default causal); write_slots [batch, seq] (default right after the committed
    prefix). The returned cache keeps `lengths`.
    """
    att = make_attention_inputs(self.cfg.layer_config, positions, cache.lengths, cache.max_len,
                                block_mask, write_slots)
    x = self.fuse_inputs(features, embeddings)
    predict, regress, cache = self.layer(x, cache, att)
    return DraftOutput(predict, regress, cache)


def init_draft(cfg: DraftConfig, seed: int = 0) -> Draft:
  """A randomly initialized draft (training starts here; tests)."""
  return Draft(cfg, nnx.Rngs(params=seed))


def abstract_draft(cfg: DraftConfig) -> Draft:
  """The draft's structure with ShapeDtypeStructs: no memory allocated."""
  return nnx.eval_shape(lambda: Draft(cfg, nnx.Rngs(params=0)))


def init_draft_cache(cfg: DraftConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty one-layer KV cache for the draft."""
  return KVCache.create(cfg.layer_config, batch, max_len, dtype)


def draft_logits(target: Transformer, predict: Array) -> Array:
  """The draft's token logits [..., vocab] (float32): the target's frozen LM head applied to
  the draft's `predict` feature [..., embed], cast to the target's dtype."""
  return target.logits(predict.astype(jnp.dtype(target.cfg.dtype)))


def draft_step(draft: Draft, target: Transformer, features: Array, next_tokens: Array,
               positions: Array, cache: KVCache, block_mask: Array | None = None,
               write_slots: Array | None = None) -> tuple[Array, DraftOutput]:
  """Embeds `next_tokens` [batch, seq] with the target, runs the draft, and applies the
  target's LM head to `predict`. Returns (logits [batch, seq, vocab] float32, DraftOutput)."""
  out = draft(features, target.embed(next_tokens), positions, cache, block_mask, write_slots)
  return draft_logits(target, out.predict), out
