"""Draft-head training against a frozen target, computing target features online.

One jitted step (`make_train_step`) does, for a global batch split into micro-batches:
  target forward (no gradient) -> features f and soft next-token targets
  -> draft forward on (noised f(j), e(t(j+1))) -> loss
     w_reg * SmoothL1(regress(j), f(j+1)) + w_cls * softCE(LMhead(predict(j)), softmax(LMhead(f(j+1))))
  -> gradients of the draft only (accumulated over micro-batches) -> optax update.
Position j is trained iff token j+1 is an assistant token (`loss_mask[j+1]`) inside the row.
With training-time test (`LossConfig.ttt_steps` > 1, fspad_jax.ttt) the draft forward is
unrolled on its own features and the loss is a weighted sum over the steps (`draft_loss`).

Per-depth agreement (`make_agreement_fn`) feeds the draft its own features back as at
inference: pass k predicts, for every anchor j, the draft's k-th step after committing
token j, attending exactly to what inference would see (true-feature K/V up to the anchor,
then the draft's own K/V of passes 2..k-1 at the chain's positions, then itself).

The training loop (`train`) adds Orbax checkpoints (params, optimizer, step, data position,
config), automatic resume, SIGTERM handling, JSONL/TensorBoard logs and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fspad_jax import ttt
from fspad_jax.config import ConfigError, ModelConfig
from fspad_jax.draft import Draft, DraftConfig, abstract_draft, draft_logits, init_draft
from fspad_jax.hf_checkpoint import param_shardings
from fspad_jax.hot_vocab import hot_logits, make_draft_vocab
from fspad_jax.model import AttentionInputs, KVCache, Transformer, resolve_feature_layers, rope_tables
from fspad_jax.sharding import ShardingRules, replicated

logger = logging.getLogger(__name__)
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  w_reg: float = 1.0  # SmoothL1 on the regressed feature
  w_cls: float = 0.1  # soft cross-entropy of the draft's token distribution
  noise: float = 0.2  # EAGLE's uniform feature noise: (U(0,1) - 0.5) * noise * 512 / max_len
  smooth_l1_beta: float = 1.0
  ttt_steps: int = 1  # training-time test: draft steps unrolled on its own features (ttt.py)
  ttt_weights: tuple = ()  # loss weight per step; () = 0.8^(k-1) (EAGLE-3)
  token_loss: str = "full"  # hot-vocabulary drafts: "full" | "hot" vocabulary (token_terms)

  @property
  def step_weights(self) -> tuple[float, ...]:
    return ttt.step_weights(self.ttt_steps, self.ttt_weights)

  def sum_keys(self) -> tuple[str, ...]:
    """The keys of draft_loss's sums: step 1's plain names, then *_step{k} for k >= 2."""
    per_step = ("reg_sum", "cls_sum", "top1_sum", "weight")
    later = tuple(f"{n}_step{k}" for k in range(2, self.ttt_steps + 1) for n in per_step)
    return per_step + ("tokens",) + later


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-5
  warmup_steps: int = 2000
  total_steps: int = 100_000
  decay: str = "linear"  # after warmup: linear | cosine | constant
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.0
  clip: str = "value"  # value (EAGLE: 0.5) | global_norm | none
  clip_value: float = 0.5
  grad_accum: int = 1
  # Multi-layer drafts: the fusion fc's (`feature_fc`) updates times this (train.fusion_lr_scale).
  fusion_lr_scale: float = 1.0


def _scale_updates_of(module: str, scale: float) -> optax.GradientTransformation:
  """Multiplies the updates of the params under top-level key `module` by `scale`."""
  def scale_fn(updates, params=None):
    del params
    return {k: jax.tree.map(lambda u: u * scale, v) if k == module else v
            for k, v in updates.items()}
  return optax.stateless(scale_fn)


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW(b1, b2) with linear warmup then decay, after clipping by value or global norm;
  the fusion fc's steps scaled by fusion_lr_scale. Returns (optimizer, learning-rate
  schedule)."""
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  rest = max(cfg.total_steps - cfg.warmup_steps, 1)
  decay = {"linear": optax.linear_schedule(cfg.learning_rate, 0.0, rest),
           "cosine": optax.cosine_decay_schedule(cfg.learning_rate, rest),
           "constant": optax.constant_schedule(cfg.learning_rate)}[cfg.decay]
  schedule = optax.join_schedules([warmup, decay], [cfg.warmup_steps])
  clip = {"value": optax.clip(cfg.clip_value),
          "global_norm": optax.clip_by_global_norm(cfg.clip_value),
          "none": optax.identity()}[cfg.clip]
  parts = [clip, optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)]
  if cfg.fusion_lr_scale != 1.0:  # (only then: the optimizer state keeps its structure)
    parts.append(_scale_updates_of("feature_fc", cfg.fusion_lr_scale))
  return optax.chain(*parts), schedule


def smooth_l1(x: Array, y: Array, beta: float) -> Array:
  diff = jnp.abs(x - y)
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


class TargetOutputs(NamedTuple):
  features: Array  # [batch, seq, embed] f(j), after the final norm
  next_probs: Array  # [batch, seq, vocab] float32 softmax(LMhead(f(j+1))) at j (0 at the end)
  next_token: Array  # [batch, seq] int32 argmax of the target's distribution after token j+1
  weights: Array  # [batch, seq] float32: position j trained iff loss_mask[j+1] inside the row
  taps: Array  # [batch, seq, k*embed]: the draft's feature layers at j (= features for k=1 final)


def target_outputs(target: Transformer, input_ids: Array, loss_mask: Array,
                   lengths: Array, feature_layers: tuple[int, ...] = (-1,)) -> TargetOutputs:
  """The frozen target's features, the draft's feature layers (same pass) and soft targets,
  with no gradient."""
  batch, seq = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  feats, taps, _ = target.features_and_taps(input_ids, positions, None, feature_layers)
  feats, taps = jax.lax.stop_gradient(feats), jax.lax.stop_gradient(taps)
  next_logits = target.logits(feats[:, 1:])  # [batch, seq-1, vocab]
  next_logits = jnp.pad(next_logits, ((0, 0), (0, 1), (0, 0)))
  next_probs = jax.lax.stop_gradient(jax.nn.softmax(next_logits, axis=-1))
  j = jnp.arange(seq)[None]
  inside = (j + 1) < lengths[:, None]
  shifted_mask = jnp.pad(loss_mask[:, 1:], ((0, 0), (0, 1)))
  weights = (shifted_mask > 0) & inside
  return TargetOutputs(feats, next_probs, jnp.argmax(next_logits, -1).astype(jnp.int32),
                       weights.astype(jnp.float32), taps)


def regression_targets(draft: Draft, tgt: TargetOutputs) -> Array:
  """What `regress(j)` is trained toward: the fused feature of the true next position,
  fuse(taps(j+1)) [batch, seq, embed] float32 (zero past the end). For one feature layer this
  is the target's feature f(j+1); for several, the draft's own fusion fc under stop_gradient
  (the fed-back feature lives in that space; draft.py's docstring)."""
  fused = jax.lax.stop_gradient(draft.fuse_features(tgt.taps)).astype(jnp.float32)
  return jnp.pad(fused[:, 1:], ((0, 0), (0, 1), (0, 0)))


def regression_weight(draft_cfg: DraftConfig, loss_cfg: LossConfig) -> float:
  """w_reg, or 0 for a kind trained without feature regression ('eagle3')."""
  return loss_cfg.w_reg if draft_cfg.regresses_feature else 0.0


TOKEN_LOSSES = ("full", "hot")  # LossConfig.token_loss / config key train.token_loss
# Config key train.fusion_init: how a multi-layer draft's fusion fc (k*d -> d) starts.
# "random": N(0, 0.02) like every kernel (EAGLE-3's); "last": the identity on the deepest
# tapped layer and zeros elsewhere, so the draft starts reading exactly the feature a
# single-layer draft reads and training adds the other layers only where they help.
FUSION_INITS = ("random", "last")


def hot_mask(hot_ids, vocab_size: int) -> Array:
  """EAGLE-3's t2d: [vocab] bool, True at the hot ids."""
  return jnp.zeros((vocab_size,), bool).at[jnp.asarray(hot_ids, jnp.int32)].set(True)


def token_terms(draft: Draft, target: Transformer, predict: Array, tgt: TargetOutputs,
                hot_ids=None, token_loss: str = "full"
                ) -> tuple[Array, Array, Array, Array]:
  """The draft's token loss pieces: (soft cross-entropy [batch, seq], top-1 hit [batch, seq],
  weights of the cross-entropy [batch, seq], top-3 target ids [batch, seq, 3]).

  Top-1/top-3 are what decoding proposes: over the hot ids (hot_ids [N], mapped back to
  target ids) when the draft has a hot vocabulary, else over the full one. The
  cross-entropy (`token_loss`):
    * "full": the draft's softmax over the full vocabulary against softmax(LMhead(f(j+1)))
      at every trained position (a draft on the target's LM head; with a hot vocabulary
      this is the loss of training as if it had none);
    * "hot" (EAGLE-3's d2t/t2d recipe): the draft's softmax over the N hot logits only
      against the target's distribution restricted to the hot ids and renormalized, at the
      positions whose target argmax is hot (the others have no hot label to learn).
  An own-head draft ('eagle3') has logits over its head's vocabulary only: with a hot
  vocabulary it always trains the "hot" way (EAGLE-3), whatever token_loss says."""
  ids = None if hot_ids is None else jnp.asarray(hot_ids, jnp.int32)  # [N]
  if draft.cfg.own_head:
    logits = draft.logits(predict)  # [batch, seq, N or vocab]
    hot_loss = ids is not None
  elif ids is None:
    logits = draft_logits(target, predict)  # [batch, seq, vocab]
    hot_loss = False
  else:
    # The decoder's hot head: the target's LM head rows of the hot ids (hot_vocab.py).
    hot = hot_logits(make_draft_vocab(target, ids), predict, target.cfg.dtype)  # [b, s, N]
    hot_loss = token_loss == "hot"
    logits = hot if hot_loss else draft_logits(target, predict)
  if hot_loss:
    probs = jnp.take(tgt.next_probs, ids, axis=-1)  # [batch, seq, N]
    probs = probs / jnp.maximum(jnp.sum(probs, -1, keepdims=True), 1e-30)
    argmax_hot = jnp.take(hot_mask(ids, tgt.next_probs.shape[-1]), tgt.next_token)
    weights = tgt.weights * argmax_hot.astype(jnp.float32)
  else:
    probs, weights = tgt.next_probs, tgt.weights
  logp = jax.nn.log_softmax(logits, axis=-1)
  cls = -jnp.sum(probs * logp, axis=-1)  # [batch, seq]
  proposals = logits if ids is None or draft.cfg.own_head or hot_loss else hot
  # The barrier: without it top3[..., 0] becomes a second slice of the sort that top_k
  # decomposes into, and XLA then sorts each whole row instead of running its TopK kernel
  # (the agreement eval was 12x slower on CPU; tests/test_sampling.py).
  top3 = jax.lax.optimization_barrier(jax.lax.top_k(proposals, 3)[1])  # [batch, seq, 3]
  top3 = top3 if ids is None else jnp.take(ids, top3)  # target ids
  top1 = (top3[..., 0] == tgt.next_token).astype(jnp.float32)
  return cls, top1, weights, top3


def shifted_embeddings(target: Transformer, input_ids: Array) -> Array:
  """e(t(j+1)) at position j: [batch, seq, embed] (zero past the end)."""
  emb = target.embed(input_ids[:, 1:])
  return jax.lax.stop_gradient(jnp.pad(emb, ((0, 0), (0, 1), (0, 0))))


def draft_loss(draft: Draft, target: Transformer, batch: dict, rng: Array, loss_cfg: LossConfig,
               hot_ids=None) -> tuple[Array, dict]:
  """Loss of one micro-batch and its metrics (unnormalized sums, for exact accumulation).

  The draft is unrolled loss_cfg.ttt_steps times (fspad_jax.ttt; 1 = teacher forcing). At
  every step k, position j (the chain's k-th step from anchor j-k+1) is trained toward the
  target after token j+1: its `regress` toward the fused true feature fuse(taps(j+1))
  (regression_targets; f(j+1) for one feature layer) by SmoothL1 (for FSPAD and PAD-only,
  PAD's regressed half; EAGLE's single output otherwise; weight 0 for 'eagle3') and its
  token distribution toward the target's (token_terms) by soft cross-entropy. Loss =
  sum_k weight_k * (w_reg * reg_k + w_cls * cls_k) / N: per-step sums over trained positions
  with an anchor >= 0, all divided by step 1's count N of trained positions. Sums: step 1
  under reg_sum, cls_sum, top1_sum, weight; step k >= 2 under the same names + _step{k}.
  hot_ids: the draft's hot vocabulary [N], or None (token_terms, loss_cfg.token_loss)."""
  input_ids, loss_mask, lengths = batch["input_ids"], batch["loss_mask"], batch["length"]
  tgt = target_outputs(target, input_ids, loss_mask, lengths, draft.cfg.feature_layers)
  seq = input_ids.shape[1]
  taps = tgt.taps.astype(jnp.float32)  # [batch, seq, k*embed]: noised, then fused by the draft
  noise = (jax.random.uniform(rng, taps.shape) - 0.5) * loss_cfg.noise * 512.0 / seq
  embeddings = shifted_embeddings(target, input_ids)
  steps = ttt.unrolled_forward(draft, taps + noise, embeddings, loss_cfg.ttt_steps)
  next_feats = regression_targets(draft, tgt)  # fuse(taps(j+1)) at j
  w_reg = regression_weight(draft.cfg, loss_cfg)
  j = jnp.arange(seq)[None]
  sums = {"tokens": jnp.sum(lengths).astype(jnp.float32)}
  loss = jnp.zeros((), jnp.float32)
  for k, (step, step_weight) in enumerate(zip(steps, loss_cfg.step_weights), start=1):
    anchored = (j >= k - 1).astype(jnp.float32)  # [1, seq]: a chain anchor >= 0
    w = tgt.weights * anchored  # [batch, seq]
    reg = jnp.mean(smooth_l1(step.regress.astype(jnp.float32), next_feats,
                             loss_cfg.smooth_l1_beta), axis=-1)  # [batch, seq]
    cls, top1, w_tok, _ = token_terms(draft, target, step.predict, tgt, hot_ids,
                                      loss_cfg.token_loss)
    suffix = "" if k == 1 else f"_step{k}"
    step_sums = {"reg_sum": jnp.sum(reg * w), "cls_sum": jnp.sum(cls * w_tok * anchored),
                 "top1_sum": jnp.sum(top1 * w), "weight": jnp.sum(w)}
    sums.update({name + suffix: v for name, v in step_sums.items()})
    loss = loss + step_weight * (w_reg * step_sums["reg_sum"]
                                 + loss_cfg.w_cls * step_sums["cls_sum"])
  return loss / jnp.maximum(sums["weight"], 1.0), sums


class TrainState(NamedTuple):
  params: Any  # the draft's float32 master params (a pure dict)
  opt_state: Any
  step: Array  # int32 scalar


@dataclasses.dataclass
class TrainSetup:
  """Everything the jitted functions close over: graphdefs, shardings, configs."""

  target_cfg: ModelConfig
  target_graphdef: nnx.GraphDef
  target_params: nnx.State
  draft_cfg: DraftConfig
  draft_graphdef: nnx.GraphDef  # built with the compute dtype
  mesh: jax.sharding.Mesh
  rules: ShardingRules
  optimizer: optax.GradientTransformation
  learning_rate: Callable  # step -> learning rate (for logging)
  loss_cfg: LossConfig
  grad_accum: int
  seed: int = 0
  hot_ids: Any = None  # [N] int32: the draft's hot vocabulary (draft.vocab_size > 0), or None
  fusion_init: str = "random"  # one of FUSION_INITS (multi-layer drafts only)

  def batch_sharding(self, ndim: int, micro: bool = False) -> NamedSharding:
    """Batch dim over (data, fsdp); a leading micro-batch axis stays unsharded."""
    spec = self.rules.spec(("batch",), None, self.mesh)
    parts = ([None] if micro else []) + [spec[0]] + [None] * (ndim - 1 - int(micro))
    return NamedSharding(self.mesh, P(*parts))

  def draft_param_shardings(self) -> dict:
    abstract = nnx.state(abstract_draft(self.draft_cfg.replace(dtype="float32")))
    return nnx.to_pure_dict(param_shardings(abstract, self.mesh, self.rules))

  def state_shardings(self, state: TrainState) -> TrainState:
    params_sh = self.draft_param_shardings()
    opt_sh = optax.tree_utils.tree_map_params(
        self.optimizer, lambda _, s: s, state.opt_state, params_sh,
        transform_non_params=lambda _: replicated(self.mesh))
    return TrainState(params_sh, opt_sh, replicated(self.mesh))


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def init_fusion_last(draft: Draft, layers: tuple[int, ...]) -> None:
  """train.fusion_init="last": the fusion fc becomes the identity on the deepest of the
  resolved feature `layers` and zero on the others (in place)."""
  k, d = draft.feature_fc.kernel.shape[:2]
  deepest = int(np.argmax(layers))
  value = jnp.zeros((k, d, d), draft.feature_fc.kernel.dtype)  # [k, embed, embed]
  draft.feature_fc.kernel[...] = value.at[deepest].set(jnp.eye(d, dtype=value.dtype))


def init_train_state(setup: TrainSetup, seed: int) -> TrainState:
  """Random float32 draft params and optimizer state, created directly in their shardings."""
  master_cfg = setup.draft_cfg.replace(dtype="float32")

  def init():
    draft = init_draft(master_cfg, seed)
    if setup.fusion_init == "last" and master_cfg.num_features > 1:
      init_fusion_last(draft, resolve_feature_layers(master_cfg.feature_layers,
                                                     setup.target_cfg.num_layers))
    params = nnx.to_pure_dict(nnx.state(draft))
    return TrainState(params, setup.optimizer.init(params), jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init)
  shardings = setup.state_shardings(abstract)
  return jax.jit(init, out_shardings=shardings)()


def make_train_step(setup: TrainSetup, state_shardings: TrainState, micro_batch: int,
                    seq_len: int) -> Callable:
  """(state, target_params, batch) -> (state, metrics): one jit, state donated.

  batch arrays are [grad_accum, micro_batch, seq] (length: [grad_accum, micro_batch])."""
  compute_dtype = jnp.dtype(setup.draft_cfg.dtype)
  loss_cfg = setup.loss_cfg

  def step_fn(state: TrainState, target_params, batch):
    target = nnx.merge(setup.target_graphdef, target_params)
    rng = jax.random.fold_in(jax.random.key(setup.seed), state.step)

    def micro_grads(carry, micro):
      grads_acc, sums_acc, i = carry
      def loss_fn(params):
        draft = nnx.merge(setup.draft_graphdef, _cast(params, compute_dtype))
        return draft_loss(draft, target, micro, jax.random.fold_in(rng, i), loss_cfg,
                          setup.hot_ids)
      (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      # Weight each micro-batch's gradient by its share of trained tokens (exact mean).
      grads = jax.tree.map(lambda g: g * sums["weight"], grads)
      return (jax.tree.map(jnp.add, grads_acc, grads),
              jax.tree.map(jnp.add, sums_acc, sums), i + 1), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in loss_cfg.sum_keys()}
    (grads, sums, _), _ = jax.lax.scan(micro_grads, (zeros, zero_sums, jnp.int32(0)), batch)
    denom = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss_reg": sums["reg_sum"] / denom, "loss_cls": sums["cls_sum"] / denom,
               "top1": sums["top1_sum"] / denom, "grad_norm": optax.tree.norm(grads),
               "trained_tokens": sums["weight"], "tokens": sums["tokens"]}
    w_reg = regression_weight(setup.draft_cfg, loss_cfg)
    loss = loss_cfg.step_weights[0] * (w_reg * sums["reg_sum"]
                                       + loss_cfg.w_cls * sums["cls_sum"])
    for k in range(2, loss_cfg.ttt_steps + 1):  # per-step means over that step's positions
      n_k = jnp.maximum(sums[f"weight_step{k}"], 1.0)
      metrics[f"loss_reg_step{k}"] = sums[f"reg_sum_step{k}"] / n_k
      metrics[f"loss_cls_step{k}"] = sums[f"cls_sum_step{k}"] / n_k
      metrics[f"top1_step{k}"] = sums[f"top1_sum_step{k}"] / n_k
      loss += loss_cfg.step_weights[k - 1] * (w_reg * sums[f"reg_sum_step{k}"]
                                              + loss_cfg.w_cls * sums[f"cls_sum_step{k}"])
    metrics["loss"] = loss / denom  # the objective draft_loss minimizes
    return TrainState(params, opt_state, state.step + 1), metrics

  batch_sh = {"input_ids": setup.batch_sharding(3, micro=True),
              "loss_mask": setup.batch_sharding(3, micro=True),
              "length": setup.batch_sharding(2, micro=True)}
  target_sh = jax.tree.map(lambda x: x.sharding, setup.target_params)
  return jax.jit(step_fn, in_shardings=(state_shardings, target_sh, batch_sh),
                 out_shardings=(state_shardings, replicated(setup.mesh)),
                 donate_argnums=(0,))


def make_agreement_fn(setup: TrainSetup, depths: int = 5, eval_loss: bool = True) -> Callable:
  """(params, target_params, batch [batch, seq]) -> sums of top-1/top-3 agreement per depth
  (feeding the draft's own features back, as at inference) and of the losses.

  Pass k (k = 1..depths) holds, at position j, the draft's k-th step of the chain anchored
  at a = j - k + 1: input feature = pass k-1's `regress` at j-1 (true f(j) for k = 1),
  input token t(j+1). Its query attends to pass-1 K/V at positions <= a (the committed
  prefix, true features), to pass-i K/V at position a + i - 1 for 1 < i < k (the chain so
  far), and to itself. All K/V live in one (depths * seq)-slot cache, pass i at slots
  [(i-1)*seq, i*seq). Agreement: the draft's top-1 (top-3) token from `predict` equals the
  target's argmax after token j+1; counted where position j is trained and a >= 0."""
  compute_dtype = jnp.dtype(setup.draft_cfg.dtype)
  loss_cfg = setup.loss_cfg

  def agreement(params, target_params, batch):
    target = nnx.merge(setup.target_graphdef, target_params)
    draft = nnx.merge(setup.draft_graphdef, _cast(params, compute_dtype))
    input_ids, lengths = batch["input_ids"], batch["length"]
    bsz, seq = input_ids.shape
    tgt = target_outputs(target, input_ids, batch["loss_mask"], lengths,
                         draft.cfg.feature_layers)
    embeddings = shifted_embeddings(target, input_ids)
    layer_cfg = draft.cfg.layer_config
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (bsz, seq))
    cos, sin = rope_tables(layer_cfg, positions)
    cache = KVCache.create(layer_cfg, bsz, depths * seq)
    j = jnp.arange(seq)
    s = jnp.arange(seq)
    feats = tgt.taps.astype(compute_dtype)  # pass 1 reads the target's taps (fused inside)
    next_feats = regression_targets(draft, tgt)
    out = {}
    for k in range(1, depths + 1):
      prefix = []
      for i in range(1, depths + 1):
        if i == k:  # this pass's own slots (write-then-attend): causal, or itself
          allowed = jnp.tril(jnp.ones((seq, seq), bool)) if k == 1 else jnp.eye(seq, dtype=bool)
        elif i == 1:
          allowed = s[None, :] <= (j - k + 1)[:, None]  # committed prefix
        elif 1 < i < k:
          allowed = s[None, :] == (j - k + i)[:, None]  # the chain's earlier steps
        else:
          allowed = jnp.zeros((seq, seq), bool)  # later passes
        prefix.append(allowed)
      mask = jnp.concatenate(prefix, axis=1)[None].repeat(bsz, 0)  # [batch, seq, depths*seq]
      slots = ((k - 1) * seq + positions).astype(jnp.int32)
      x = draft.fuse_inputs(feats, embeddings)
      predict, regress, cache = draft.layer(x, cache, AttentionInputs(cos, sin, mask, slots))
      cls, hit1, w_tok, top3 = token_terms(draft, target, predict, tgt, setup.hot_ids,
                                           loss_cfg.token_loss)
      valid = tgt.weights * ((j - k + 1) >= 0)[None].astype(jnp.float32)
      hit3 = jnp.any(top3 == tgt.next_token[..., None], axis=-1).astype(jnp.float32)
      out[f"top1_depth{k}"] = jnp.sum(hit1 * valid)
      out[f"top3_depth{k}"] = jnp.sum(hit3 * valid)
      out[f"count_depth{k}"] = jnp.sum(valid)
      if k == 1 and eval_loss:
        reg = jnp.mean(smooth_l1(regress.astype(jnp.float32), next_feats,
                                 loss_cfg.smooth_l1_beta), -1)
        out["reg_sum"] = jnp.sum(reg * tgt.weights)
        out["cls_sum"] = jnp.sum(cls * w_tok)
        out["weight"] = jnp.sum(tgt.weights)
      # Next pass: the feature fed back at j is this pass's regress at j-1.
      feats = jnp.pad(regress[:, :-1], ((0, 0), (1, 0), (0, 0))).astype(compute_dtype)
    return out

  batch_sh = {"input_ids": setup.batch_sharding(2), "loss_mask": setup.batch_sharding(2),
              "length": setup.batch_sharding(1)}
  target_sh = jax.tree.map(lambda x: x.sharding, setup.target_params)
  return jax.jit(agreement, in_shardings=(setup.draft_param_shardings(), target_sh, batch_sh),
                 out_shardings=replicated(setup.mesh))


def summarize_agreement(sums: dict, depths: int) -> dict:
  """Turns summed counts into rates."""
  out = {}
  for k in range(1, depths + 1):
    n = max(float(sums[f"count_depth{k}"]), 1.0)
    out[f"top1_depth{k}"] = float(sums[f"top1_depth{k}"]) / n
    out[f"top3_depth{k}"] = float(sums[f"top3_depth{k}"]) / n
  if "weight" in sums:
    w = max(float(sums["weight"]), 1.0)
    out["loss_reg"] = float(sums["reg_sum"]) / w
    out["loss_cls"] = float(sums["cls_sum"]) / w
  return out


def flops_per_step(target_cfg: ModelConfig, draft_cfg: DraftConfig, tokens: int, seq: int,
                   ttt_steps: int = 1) -> float:
  """Model FLOPs of one step: target forward (incl. its LM head for the soft targets) plus
  draft forward + backward (incl. the frozen LM head's forward and input-gradient), once
  per training-time-test step."""
  d, v = target_cfg.hidden_size, target_cfg.vocab_size
  target_body = target_cfg.num_params - v * d * (1 if target_cfg.tie_word_embeddings else 2)
  attn = 4 * seq * target_cfg.num_heads * target_cfg.head_dim  # per token per layer, QK + PV
  target_flops = tokens * (2 * target_body + 2 * d * v + target_cfg.num_layers * attn)
  draft_attn = 4 * seq * draft_cfg.num_heads * draft_cfg.head_dim
  draft_flops = tokens * (6 * draft_cfg.num_params + 3 * draft_attn + 4 * d * v)
  return float(target_flops + ttt_steps * draft_flops)


def stack_micro_batches(batch: dict, grad_accum: int) -> dict:
  """[global_batch, ...] -> [grad_accum, global_batch / grad_accum, ...] (numpy)."""
  out = {}
  for k in ("input_ids", "loss_mask", "length"):
    x = np.asarray(batch[k], np.int32)
    out[k] = x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:])
  return out


class PreemptionFlag:
  """Set by SIGTERM (preemption) or SIGINT (Ctrl-C): the loop saves once more and stops.

  `signal_name` says which came ("SIGTERM" / "SIGINT"). A second Ctrl-C while the last
  checkpoint is being saved gets Python's default behaviour (KeyboardInterrupt); a save it
  cuts short is never restored (Checkpointer commits a step only once complete)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    def handler(signum, frame):
      name = signal.Signals(signum).name
      if self.requested and signum == signal.SIGINT:
        raise KeyboardInterrupt
      logger.warning("%s received: saving a final checkpoint, then exiting", name)
      self.requested, self.signal_name = True, name
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  @property
  def interrupted(self) -> bool:
    """Ctrl-C (not a preemption) stopped the loop: the job should exit non-zero."""
    return self.signal_name == "SIGINT"


# ----------------------------------------------------------------------------- the loop


class Checkpointer:
  """Orbax CheckpointManager over <workdir>/checkpoints: async saves, last N kept.

  Each step directory holds the train state (draft params, optimizer state, step), the data
  iterator position and the run's config. A step is complete only once Orbax has written
  its commit_success.txt, so a half-written checkpoint is never listed or restored."""

  def __init__(self, workdir: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # COMMIT_FILE: a step counts only once its commit_success.txt exists, also on file
    # systems (or copies) where a directory rename is not atomic.
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True,
            atomicity_options=ocp.options.AtomicityOptions(
                mode=ocp.options.AtomicityMode.COMMIT_FILE)))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, meta: dict):
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state._asdict()),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: TrainState, shardings: TrainState
              ) -> tuple[TrainState, dict, dict]:
    ocp = self._ocp
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state._asdict(), shardings._asdict())
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return TrainState(**out["state"]), out["data"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    """The run metadata (config, draft config, input fingerprints) stored with `step`,
    without reading its arrays: checked before a restore whose tree might not match."""
    ocp = self._ocp
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for an unreadable item
      raise ConfigError(f"{self.directory}/{step}/meta: unreadable run metadata "
                        f"({type(e).__name__}: {str(e)[:200]}): use another workdir") from None
    meta = out["meta"]
    if not isinstance(meta, dict):
      raise ConfigError(f"{self.directory}/{step}/meta: not a JSON object: use another workdir")
    return meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class MetricsWriter:
  """Appends metrics to <workdir>/metrics.jsonl, and to TensorBoard event files when
  tensorboardX is installed. Only process 0 writes."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      self._drop_partial_last_line()
    if self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logger.info("tensorboardX not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    record = {"step": step, "split": split, "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:  # one whole line per record, on disk before we go on
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), step)
      self._tb.flush()

  def _drop_partial_last_line(self):
    """Cuts off a last line without its newline: an append that a crash or a full disk cut
    short (every record is written as one whole line); it is logged again on resume."""
    if not os.path.isfile(self.path):
      return
    with open(self.path, "rb") as f:
      data = f.read()
    end = data.rfind(b"\n") + 1  # bytes up to the last complete line
    if end < len(data):
      logger.warning("%s: dropping a partial last line (%d bytes) left by an interrupted "
                     "write", self.path, len(data) - end)
      os.truncate(self.path, end)

  def _read(self) -> list[tuple[str, dict]]:
    """(line, record) for every record; a corrupt complete line is one error naming it."""
    if not os.path.isfile(self.path):
      return []
    out = []
    with open(self.path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          record = json.loads(raw)
          if not isinstance(record, dict):
            raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
          raise ConfigError(f"{self.path}:{number}: corrupt metrics line; fix or remove it "
                            "before resuming") from None
        out.append((raw.decode("utf-8"), record))
    return out

  def truncate_after(self, step: int):
    """Drops records of steps after `step` (a resumed run logs them again)."""
    if not self.enabled or not os.path.isfile(self.path):
      return
    lines = self._read()
    kept = [line for line, record in lines if record.get("step", 0) <= step]
    if len(kept) != len(lines):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(self.path + ".tmp", self.path)

  def last_record(self) -> dict:
    """The last train record's metrics (for reporting a finished run), or {}."""
    train = [r for _, r in self._read() if r.get("split") == "train"]
    if not train:
      return {}
    return {k: v for k, v in train[-1].items() if k not in ("step", "split", "time")}

  def close(self):
    if self._tb is not None:
      self._tb.close()
