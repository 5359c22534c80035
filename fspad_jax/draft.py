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
  * 'eagle3':   EAGLE-3's head (SafeAILab/EAGLE eagle/model/cnets.py): no input fc; the
                layer's attention reads 2d = [RMSNorm_in(e); RMSNorm_hidden(f)], the residual
                is f; regress = the layer output (fed back, pre-norm), predict = RMSNorm(out),
                and its OWN LM head over its vocabulary (N hot ids, or the full one). No
                feature regression loss (train_lib).
  * 'fspad3':   'fspad' with EAGLE-3's low/mid/high target layers by default (the FSPAD
                variant meant for target-regenerated data and training-time test).
FS: h = W_fc [e; f] + b;  x = h + W_down(SiLU(W_gate e) * (W_up RMSNorm(h))).

Multi-layer target features (`DraftConfig.feature_layers`, EAGLE-3): with k > 1 layers the
draft's input feature is f = W_feat [h_1; ...; h_k] (one bias-free fc, k*d -> d), the
*fused* feature. Everything the draft feeds back lives in that fused space: `regress` is
its prediction of the next position's fused feature, fed back at deeper tree levels, and
PAD's (and EAGLE's) regression target is the fused feature of the true next position,
fuse(h(j+1)), computed by the same fc under stop_gradient. With one layer (the default, the
target's final feature) there is no fc and everything is as before.

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
from fspad_jax.model import (Attention, AttentionInputs, KVCache, MLP, RMSNorm, Transformer, _param, kernel, make_attention_inputs, resolve_feature_layers)

Array = jax.Array

DRAFT_KINDS = ("eagle", "fspad", "fs_only", "pad_only", "eagle3", "fspad3")
# Kinds that fspad_jax.draft_checkpoint's EAGLE-1/2 / FSPAD layout holds (with one feature
# layer); 'eagle3' has its own layout (fspad_jax.eagle3_checkpoint).
EAGLE_LAYOUT_KINDS = ("eagle", "fspad", "fs_only", "pad_only")
# Kinds whose default feature layers are EAGLE-3's low/mid/high triple (others: the final one).
MULTI_LAYER_KINDS = ("eagle3", "fspad3")


def eagle3_feature_layers(num_layers: int) -> tuple[int, ...]:
  """EAGLE-3's target layers: the inputs of decoder layers 2, L//2 and L-3 (SafeAILab/EAGLE
  modeling_llama_kv.py; vLLM's default aux layers), i.e. output_hidden_states indices
  (2, L//2, L-3), low to high ((2, 16, 29) for 32 layers). Targets too shallow for three
  distinct such layers (L < 8) take the distinct values of (1, L//2, L) instead, L being the
  final normed feature: (1, 2) for 2 layers, (1, 2, 4) for 4."""
  picks = (2, num_layers // 2, num_layers - 3)
  if len(set(picks)) == 3 and all(1 <= i < num_layers for i in picks):
    return picks
  return tuple(sorted({1, num_layers // 2 or 1, num_layers}))


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
  # Target hidden states the draft reads (Transformer.features_and_taps indices: 0 = the
  # embeddings, i = output of decoder layer i, -1 = the final normed feature). More than one
  # are fused by a bias-free fc (k*d -> d); see the module docstring for what is fed back.
  feature_layers: tuple[int, ...] = (-1,)
  qkv_bias: bool = False  # q/k/v projection biases (imported Qwen2 EAGLE heads: "qkv_bias")

  def __post_init__(self):
    object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
    if self.kind == "eagle3":  # no input fc at all: its bias flag means nothing
      object.__setattr__(self, "fc_bias", False)
    if not self.feature_layers or len(set(self.feature_layers)) != len(self.feature_layers):
      raise ConfigError(f"draft feature_layers={self.feature_layers}: expected one or more "
                        "distinct target layer indices")
    if self.own_head and not (self.hot_vocab_size or self.vocab_size):
      raise ConfigError(f"draft kind {self.kind!r} has its own LM head: it needs vocab_size "
                        "or hot_vocab_size")
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
    return self.kind in ("fspad", "fs_only", "fspad3")

  @property
  def partial_alignment(self) -> bool:
    return self.kind in ("fspad", "pad_only", "fspad3")

  @property
  def own_head(self) -> bool:
    """EAGLE-3: the draft has its own final norm and LM head over `head_vocab_size` ids."""
    return self.kind == "eagle3"

  @property
  def regresses_feature(self) -> bool:
    """Trained with a feature regression loss (EAGLE-3 is trained on tokens only)."""
    return self.kind != "eagle3"

  @property
  def head_vocab_size(self) -> int:
    """Rows of the draft's own LM head: the hot vocabulary, else the full one."""
    return self.hot_vocab_size or self.vocab_size

  @property
  def num_features(self) -> int:
    return len(self.feature_layers)

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
    d_in = 2 * d if self.own_head else d
    attn = d_in * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    attn += self.num_heads * self.head_dim * d
    if self.qkv_bias:
      attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    fuse = self.num_features * d * d if self.num_features > 1 else 0
    if self.own_head:  # two input norms, the final norm and the own LM head; no input fc
      return fuse + attn + 4 * d + 2 * d * f + f * d + d * self.head_vocab_size
    fc = 2 * d * d + (d if self.fc_bias else 0)
    fs = 3 * d * f + d if self.feature_sampling else 0
    mlp = 2 * d * f + f * (2 * d if self.partial_alignment else d)
    return fuse + fc + fs + attn + d + mlp


def draft_config_from_target(target_cfg: ModelConfig, kind: str, **overrides) -> DraftConfig:
  """A draft shaped like one layer of the target (EAGLE's and FSPAD's default). The
  feature layers default to the kind's (MULTI_LAYER_KINDS: EAGLE-3's triple) and must exist
  in the target."""
  if kind in MULTI_LAYER_KINDS and not overrides.get("feature_layers"):
    overrides["feature_layers"] = eagle3_feature_layers(target_cfg.num_layers)
  overrides = {k: v for k, v in overrides.items() if k != "feature_layers" or v}
  cfg = DraftConfig(
      kind=kind, hidden_size=target_cfg.hidden_size, num_heads=target_cfg.num_heads,
      num_kv_heads=target_cfg.num_kv_heads, head_dim=target_cfg.head_dim,
      intermediate_size=target_cfg.intermediate_size, rms_norm_eps=target_cfg.rms_norm_eps,
      rope=target_cfg.rope, dtype=target_cfg.dtype, vocab_size=target_cfg.vocab_size,
      max_position_embeddings=target_cfg.max_position_embeddings).replace(**overrides)
  if cfg.hidden_size != target_cfg.hidden_size:
    raise ConfigError(f"draft hidden_size={cfg.hidden_size} must equal the target's "
                      f"({target_cfg.hidden_size}): the draft reads and predicts its features")
  check_feature_layers(cfg, target_cfg)
  return cfg


def check_feature_layers(cfg: DraftConfig, target_cfg: ModelConfig) -> None:
  """Refuses feature layers the target does not have, naming the config key."""
  try:
    resolved = resolve_feature_layers(cfg.feature_layers, target_cfg.num_layers)
  except ValueError as e:
    raise ConfigError(f"config key draft.feature_layers={list(cfg.feature_layers)}: {e}"
                      ) from None
  if len(set(resolved)) != len(resolved):
    raise ConfigError(f"config key draft.feature_layers={list(cfg.feature_layers)}: names a "
                      f"layer twice for a {target_cfg.num_layers}-layer target")


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


class FeatureFusion(nnx.Module):
  """EAGLE-3's fc over k target layers: [h_1; ...; h_k] (k*d) -> d, no bias. Kernel [k, d, d]."""

  def __init__(self, k: int, d: int, dtype, rngs: nnx.Rngs):
    self.kernel = _param(rngs, "draft_fc_kernel", (k, d, d), dtype)  # [k, embed, embed]

  def __call__(self, taps: Array) -> Array:
    k, d = self.kernel.shape[:2]
    parts = taps.reshape(*taps.shape[:-1], k, d)  # [batch, seq, k, embed]
    return jnp.einsum("bscd,cde->bse", parts, kernel(self, "kernel", taps.dtype))


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
    h, cache = self.attn(self.attention_input(x), cache, 0, att)
    return (*self.finish(x, h), cache)

  def attention_input(self, x: Array) -> Array:
    """What the attention projects: the layer input itself (no input RMSNorm)."""
    return x

  def finish(self, x: Array, h: Array) -> tuple[Array, Array]:
    """The layer after attention: x, h [batch, seq, embed] (input, attention output) ->
    (predict, regress)."""
    a = x + h  # [batch, seq, embed]: post-attention hidden state
    update = self.mlp(self.post_attn_norm(a))  # [batch, seq, embed or 2*embed]
    if not self.split_output:
      out = a + update
      return out, out
    d = a.shape[-1]
    # o = [a; a] + update, as two halves (no concatenated copy of a).
    return a + update[..., :d], a + update[..., d:]


class Eagle3Layer(nnx.Module):
  """EAGLE-3's decoder layer on x = [e; f] (2d): attention over [RMSNorm_in(e);
  RMSNorm_hidden(f)] with residual f, then the usual post-attention norm and MLP. Returns
  (predict = RMSNorm(out), regress = out, cache)."""

  def __init__(self, layer_cfg: ModelConfig, rngs: nnx.Rngs):
    d, eps, dt = layer_cfg.hidden_size, layer_cfg.rms_norm_eps, layer_cfg.dtype
    self.input_norm = RMSNorm(d, eps, dt, rngs)  # EAGLE-3's input_layernorm (embedding)
    self.hidden_norm = RMSNorm(d, eps, dt, rngs)  # its hidden_norm (feature)
    self.attn = Attention(layer_cfg, rngs, d_in=2 * d)
    self.post_attn_norm = RMSNorm(d, eps, dt, rngs)
    self.mlp = MLP(d, layer_cfg.intermediate_size, dt, rngs)
    self.final_norm = RMSNorm(d, eps, dt, rngs)  # EAGLE-3's `norm`, before its LM head

  def __call__(self, x: Array, cache: KVCache, att: AttentionInputs):
    h, cache = self.attn(self.attention_input(x), cache, 0, att)
    return (*self.finish(x, h), cache)

  def attention_input(self, x: Array) -> Array:
    """x = [e; f] [batch, seq, 2*embed] -> [RMSNorm_in(e); RMSNorm_hidden(f)] (same shape)."""
    d = x.shape[-1] // 2
    return jnp.concatenate([self.input_norm(x[..., :d]), self.hidden_norm(x[..., d:])], axis=-1)

  def finish(self, x: Array, h: Array) -> tuple[Array, Array]:
    """After attention: x [batch, seq, 2*embed], h [batch, seq, embed] -> (predict, regress)."""
    a = x[..., x.shape[-1] // 2:] + h  # [batch, seq, embed]: residual on the feature
    out = a + self.mlp(self.post_attn_norm(a))
    return self.final_norm(out), out


class Draft(nnx.Module):
  """A draft head of any kind in DRAFT_KINDS; see the module docstring."""

  def __init__(self, cfg: DraftConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt = cfg.hidden_size, cfg.dtype
    if cfg.num_features > 1:
      self.feature_fc = FeatureFusion(cfg.num_features, d, dt, rngs)
    if cfg.own_head:
      self.layer = Eagle3Layer(cfg.layer_config, rngs)
      # [embed, N]: the draft's own LM head over its vocabulary (hot ids ascending, or all).
      self.lm_head = _param(rngs, "lm_head", (d, cfg.head_vocab_size), dt)
      return
    self.fc = InputFusion(d, cfg.fc_bias, dt, rngs)
    if cfg.feature_sampling:
      self.feature_sampling = FeatureSampling(d, cfg.intermediate_size, cfg.rms_norm_eps, dt,
                                              rngs)
    self.layer = DraftLayer(cfg.layer_config, cfg.partial_alignment, rngs)

  def fuse_features(self, features: Array) -> Array:
    """The target's taps [batch, seq, k*embed] -> the fused feature [batch, seq, embed];
    a feature already in the fused space ([..., embed]: fed back, or k = 1) passes through."""
    features = features.astype(jnp.dtype(self.cfg.dtype))
    if self.cfg.num_features > 1 and features.shape[-1] != self.cfg.hidden_size:
      return self.feature_fc(features)
    return features

  def fuse_inputs(self, features: Array, embeddings: Array) -> Array:
    """features [batch, seq, k*embed] (target taps) or [batch, seq, embed] (fused or fed
    back), embeddings [batch, seq, embed] -> the decoder layer's input [batch, seq, embed]
    ([batch, seq, 2*embed] = [e; f] for 'eagle3')."""
    dtype = jnp.dtype(self.cfg.dtype)
    features, embeddings = self.fuse_features(features), embeddings.astype(dtype)
    if self.cfg.own_head:
      return jnp.concatenate([embeddings, features], axis=-1)
    h = self.fc(embeddings, features)
    if self.cfg.feature_sampling:
      h = self.feature_sampling(h, embeddings)
    return h

  def __call__(self, features: Array, embeddings: Array, positions: Array, cache: KVCache,
               block_mask: Array | None = None, write_slots: Array | None = None
               ) -> DraftOutput:
    """Runs a block of draft inputs against the draft's cache.

    features: [batch, seq, k*embed] the target's taps at j, or [batch, seq, embed] an already
    fused feature (the draft's fed-back `regress`);
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


  def logits(self, predict: Array) -> Array:
    """'eagle3': its own LM head's logits [..., N] (float32) over its vocabulary."""
    return jnp.einsum("...d,dn->...n", predict, kernel(self, "lm_head", predict.dtype),
                      preferred_element_type=jnp.float32)


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


def token_logits(draft: Draft, target: Transformer, predict: Array) -> Array:
  """The draft's token logits (float32): its own head's [..., N] ('eagle3'), else the
  target's frozen head's [..., vocab]."""
  if draft.cfg.own_head:
    return draft.logits(predict)
  return draft_logits(target, predict)


def draft_step(draft: Draft, target: Transformer, features: Array, next_tokens: Array,
               positions: Array, cache: KVCache, block_mask: Array | None = None,
               write_slots: Array | None = None) -> tuple[Array, DraftOutput]:
  """Embeds `next_tokens` [batch, seq] with the target, runs the draft, and applies the
  token head to `predict` (`token_logits`). Returns (logits [batch, seq, vocab or N] float32,
  DraftOutput)."""
  out = draft(features, target.embed(next_tokens), positions, cache, block_mask, write_slots)
  return token_logits(draft, target, out.predict), out
