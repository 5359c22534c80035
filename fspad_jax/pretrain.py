"""Pretrains a small Llama-3-style target from scratch on chat-rendered conversations.

  >>> cfg = target_model_config(vocab_size=len(tokenizer), hidden_size=256, ...)
  >>> result = pretrain(cfg, "train.jsonl", "tokenizer/", "target/", "work/",
  ...                   PretrainOptions(steps=2000, max_len=512, dtype="bfloat16"))

The data path is the draft trainer's: `fspad_jax.data.prepare_dataset` renders every
ShareGPT conversation with the tokenizer's chat template (Llama-3 headers, <|eot_id|>)
into fixed-length rows with an assistant loss mask, and `TrainBatches` reads them back.
The model is fspad_jax's own `Transformer`; the loss is next-token cross-entropy on every
real token (loss_on="all": position j predicts token j+1 for j + 1 < length) or on the
assistant tokens only (loss_on="assistant": where loss_mask[j+1] = 1).

One jitted step: float32 master weights, optionally cast to bfloat16 for the forward and
backward pass (dtype="bfloat16"; logits and the loss stay float32), global-norm gradient
clipping, AdamW (no weight decay on norms) under linear warmup + cosine decay. The batch is
split over all local devices (data parallel, weights replicated). Orbax checkpoints (train
state + data position) every `checkpoint_every` steps make the run resumable: rerunning with
the same workdir continues; a deadline or SIGTERM saves and returns early (`done` False).
The result is a complete Hugging Face model directory (config.json, model.safetensors, the
tokenizer with its chat template) written by `hf_checkpoint.save_target`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fspad_jax import console
from fspad_jax import data as data_lib
from fspad_jax import train_lib
from fspad_jax.config import ModelConfig, RopeConfig
from fspad_jax.hf_checkpoint import save_target
from fspad_jax.model import Transformer, abstract_model, init_model
from fspad_jax.sharding import host_to_global, make_mesh, replicated

logger = logging.getLogger(__name__)
Array = jax.Array

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
LOSS_ON = ("all", "assistant")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
  """Optimization and bookkeeping of one pretraining run."""

  steps: int = 1000
  batch_size: int = 16  # global, split over the local devices
  max_len: int = 512  # row length (conversations are truncated / right-padded)
  learning_rate: float = 1e-3  # peak
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio at `steps`
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1  # on matrices only
  clip_norm: float = 1.0  # global gradient norm; 0 = off
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (master weights float32)
  loss_on: str = "all"  # all | assistant
  seed: int = 0  # init and data order
  val_fraction: float = 0.01  # conversations kept out of training by prepare_dataset
  log_every: int = 20
  eval_every: int = 0  # 0 = only at the end
  eval_batches: int = 8  # 0 = the whole validation split
  checkpoint_every: int = 200
  keep_checkpoints: int = 2

  def __post_init__(self):
    if self.loss_on not in LOSS_ON:
      raise ValueError(f"loss_on={self.loss_on!r}: expected one of {LOSS_ON}")
    if self.dtype not in COMPUTE_DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: expected one of {COMPUTE_DTYPES}")
    if self.steps < 1 or self.batch_size < 1 or self.max_len < 2:
      raise ValueError("steps, batch_size must be >= 1 and max_len >= 2")


def target_model_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                        num_kv_heads: int, intermediate_size: int, head_dim: int = 0,
                        rope_theta: float = 500000.0, max_position_embeddings: int = 2048,
                        tie_word_embeddings: bool = False, bos_token_id: int | None = 0,
                        eos_token_ids: tuple[int, ...] = (4,)) -> ModelConfig:
  """A Llama-3-shaped ModelConfig (GQA, RoPE theta 500k, SiLU MLP, RMSNorm 1e-5).

  The default bos/eos ids are those of tiny_checkpoint.build_tokenizer's special tokens
  (<|begin_of_text|> = 0, <|eot_id|> = 4)."""
  return ModelConfig(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim or hidden_size // num_heads, rms_norm_eps=1e-5,
      rope=RopeConfig(theta=float(rope_theta)), tie_word_embeddings=tie_word_embeddings,
      max_position_embeddings=max_position_embeddings, model_type="llama",
      bos_token_id=bos_token_id, eos_token_ids=tuple(eos_token_ids), dtype="float32")


def flops_per_token(cfg: ModelConfig, seq: int) -> float:
  """Training FLOPs per token (forward + backward): 6 x matmul params (the embedding lookup
  excluded, the LM head included) + causal attention scores and values."""
  d, v = cfg.hidden_size, cfg.vocab_size
  matmul = cfg.num_params - v * d  # every parameter but the lookup table (approx.)
  attn = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim  # 2 x (QK + PV) x 3 / 2
  return 6.0 * matmul + attn


# ----------------------------------------------------------------------------- math


def make_optimizer(opts: PretrainOptions) -> tuple[optax.GradientTransformation, Callable]:
  """clip_by_global_norm -> AdamW(warmup + cosine); no decay on vectors (norm weights)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opts.learning_rate, warmup_steps=max(opts.warmup_steps, 1),
      decay_steps=max(opts.steps, opts.warmup_steps + 1),
      end_value=opts.learning_rate * opts.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  optimizer = optax.chain(
      optax.clip_by_global_norm(opts.clip_norm) if opts.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=opts.b1, b2=opts.b2, weight_decay=opts.weight_decay,
                  mask=decay_mask))
  return optimizer, schedule


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def loss_weights(batch: dict, loss_on: str) -> Array:
  """[batch, seq] float32: 1 where position j's prediction of token j+1 is trained."""
  input_ids, lengths = batch["input_ids"], batch["length"]
  seq = input_ids.shape[1]
  inside = (jnp.arange(seq)[None] + 1) < lengths[:, None]  # token j+1 is real
  if loss_on == "assistant":
    inside &= jnp.pad(batch["loss_mask"][:, 1:], ((0, 0), (0, 1))) > 0
  return inside.astype(jnp.float32)


def lm_loss_sums(model: Transformer, batch: dict, loss_on: str) -> dict:
  """Sums of next-token cross-entropy and top-1 hits over the trained positions."""
  input_ids = batch["input_ids"]  # [batch, seq]
  b, seq = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
  feats, _ = model.features(input_ids, positions, None)  # [batch, seq, embed]
  logits = model.logits(feats)  # [batch, seq, vocab] float32
  targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))  # token j+1 at j
  logz = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  w = loss_weights(batch, loss_on)
  hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"ce_sum": jnp.sum((logz - picked) * w), "hit_sum": jnp.sum(hit * w),
          "weight": jnp.sum(w), "tokens": jnp.sum(batch["length"]).astype(jnp.float32)}


def _batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def make_train_step(graphdef, optimizer, opts: PretrainOptions, mesh) -> Callable:
  """(state, batch) -> (state, metrics): one jit; state donated; batch split over devices."""
  compute = jnp.dtype(opts.dtype)

  def step_fn(state: train_lib.TrainState, batch):
    def loss_fn(params):
      sums = lm_loss_sums(nnx.merge(graphdef, _cast(params, compute)), batch, opts.loss_on)
      return sums["ce_sum"] / jnp.maximum(sums["weight"], 1.0), sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": sums["hit_sum"] / jnp.maximum(sums["weight"], 1.0),
               "grad_norm": optax.tree.norm(grads), "trained_tokens": sums["weight"],
               "tokens": sums["tokens"]}
    return train_lib.TrainState(params, opt_state, state.step + 1), metrics

  rep = replicated(mesh)
  return jax.jit(step_fn, in_shardings=(rep, _batch_sharding(mesh)), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def make_eval_fn(graphdef, opts: PretrainOptions, mesh) -> Callable:
  """(params, batch) -> loss sums (float32 compute, as the saved model is used)."""
  def eval_fn(params, batch):
    return lm_loss_sums(nnx.merge(graphdef, params), batch, opts.loss_on)
  rep = replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(rep, _batch_sharding(mesh)), out_shardings=rep)


def init_state(cfg: ModelConfig, optimizer, seed: int, mesh) -> train_lib.TrainState:
  def init():
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, seed)))
    return train_lib.TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
  return jax.jit(init, out_shardings=replicated(mesh))()


# ----------------------------------------------------------------------------- loop


def _place(batch: dict, mesh) -> dict:
  """Host batch -> global arrays, rows split over the devices."""
  return {k: host_to_global(np.asarray(batch[k], np.int32), _batch_sharding(mesh))
          for k in ("input_ids", "loss_mask", "length")}


def evaluate(eval_fn, params, prepared_dir: str, opts: PretrainOptions, mesh) -> dict:
  """Mean loss / perplexity / top-1 accuracy over (up to eval_batches of) validation."""
  try:
    batches = data_lib.TrainBatches(prepared_dir, "validation", opts.batch_size,
                                    shuffle=False, num_epochs=1, drop_remainder=False,
                                    shard_index=0, shard_count=1)
  except ValueError as e:
    logger.warning("no pretraining evaluation: %s", e)
    return {}
  totals = None
  for i, batch in enumerate(batches):
    if opts.eval_batches and i >= opts.eval_batches:
      break
    pad = opts.batch_size - batch["length"].shape[0]
    if pad:  # empty rows (length 0) weigh nothing
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    sums = jax.device_get(eval_fn(params, _place(batch, mesh)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  if not totals:
    return {}
  w = max(float(totals["weight"]), 1.0)
  loss = float(totals["ce_sum"]) / w
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
          "val_accuracy": float(totals["hit_sum"]) / w, "val_tokens": float(totals["weight"])}


def copy_tokenizer(tokenizer_dir: str, out_dir: str) -> None:
  """Copies the tokenizer files (byte for byte: same fingerprint for prepared data)."""
  os.makedirs(out_dir, exist_ok=True)
  copied = 0
  for name in TOKENIZER_FILES:
    src = os.path.join(tokenizer_dir, name)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out_dir, name))
      copied += 1
  if not copied:
    raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({TOKENIZER_FILES})")


def save_model_dir(out_dir: str, cfg: ModelConfig, params: dict, tokenizer_dir: str,
                   extra: dict | None = None) -> str:
  """Writes the HF model directory: config.json, model.safetensors, tokenizer (+ chat
  template), generation_config.json (eos = <|eot_id|>) and pretrain.json (`extra`)."""
  state = nnx.state(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, jax.device_get(params))
  save_target(out_dir, cfg, state)
  copy_tokenizer(tokenizer_dir, out_dir)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
               "do_sample": False}, f, indent=2)
  if extra is not None:
    with open(os.path.join(out_dir, "pretrain.json"), "w") as f:
      json.dump(extra, f, indent=2)
  return out_dir


def pretrain(cfg: ModelConfig, data_path: str, tokenizer_dir: str, out_dir: str,
             workdir: str, opts: PretrainOptions, prepared_dir: str | None = None,
             progress: bool = True, deadline: float | None = None) -> dict:
  """Trains (or resumes) the target; at the last step writes the model to out_dir.

  data_path: ShareGPT JSON/JSONL; tokenizer_dir: a saved tokenizer with a chat template;
  workdir: checkpoints + metrics.jsonl; prepared_dir: where prepare_dataset caches rows
  (default <workdir>/data). deadline: a time.monotonic() value after which the loop saves
  and returns. Returns the last metrics plus {"step", "done", "out_dir"}."""
  os.makedirs(workdir, exist_ok=True)
  prepared_root = prepared_dir or os.path.join(workdir, "data")
  prepared, report = data_lib.prepare_dataset(data_path, tokenizer_dir, opts.max_len,
                                              prepared_root, val_fraction=opts.val_fraction)
  logger.debug("pretraining data %s: %s", prepared, json.dumps(report))  # logged there
  mesh = make_mesh((-1, 1, 1))
  if opts.batch_size % mesh.size:
    raise ValueError(f"batch_size={opts.batch_size} is not divisible by the {mesh.size} "
                     f"local devices")
  optimizer, schedule = make_optimizer(opts)
  graphdef, _ = nnx.split(abstract_model(cfg))
  step_fn = make_train_step(graphdef, optimizer, opts, mesh)
  eval_fn = make_eval_fn(graphdef, opts, mesh)
  batches = data_lib.TrainBatches(prepared, "train", opts.batch_size, seed=opts.seed,
                                  shard_index=0, shard_count=1)
  ckpt = train_lib.Checkpointer(workdir, keep=opts.keep_checkpoints)
  abstract = jax.eval_shape(lambda: init_state(cfg, optimizer, opts.seed, mesh))
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  meta = {"model_config": dataclasses.asdict(cfg), "options": dataclasses.asdict(opts),
          "data_path": os.path.abspath(data_path)}
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state, _ = ckpt.restore(latest, abstract, shardings)
    batches.set_state(data_state)
    logger.info("resumed pretraining from %s step %d", ckpt.directory, latest)
  else:
    state = init_state(cfg, optimizer, opts.seed, mesh)
  writer = train_lib.MetricsWriter(workdir, tensorboard=False)
  fpt = flops_per_token(cfg, opts.max_len)
  step = int(jax.device_get(state.step))
  bar = console.progress(opts.steps, "pretrain", "step", enabled=progress, initial=step)
  last: dict[str, Any] = {}
  # Throughput windows exclude the first step of this process (it compiles).
  window = {"t": None, "tokens": 0.0, "steps": 0}
  total = {"t": 0.0, "tokens": 0.0, "steps": 0}
  stopped_early = False
  with train_lib.PreemptionFlag() as preempt:
    while step < opts.steps:
      batch = next(batches)
      state, metrics = step_fn(state, _place(batch, mesh))
      step += 1
      bar.update(1)
      if window["t"] is None:  # first step: wait for it (compile), then start the clock
        jax.block_until_ready(metrics)
        window["t"] = time.perf_counter()
      else:
        window["tokens"] += float(batch["length"].sum())
        window["steps"] += 1
      if step % opts.log_every == 0 or step == opts.steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - window["t"]
        if window["steps"]:
          m["tokens_per_s"] = window["tokens"] / dt
          m["padded_tokens_per_s"] = window["steps"] * opts.batch_size * opts.max_len / dt
          m["model_tflops_per_s"] = m["padded_tokens_per_s"] * fpt / 1e12
          for k in ("t", "tokens", "steps"):
            total[k] += dt if k == "t" else window[k]
        m["learning_rate"] = float(schedule(step - 1))
        writer.write(step, "train", m)
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m.get('tokens_per_s', 0):.0f}")
        last.update(m)
        window = {"t": time.perf_counter(), "tokens": 0.0, "steps": 0}
      if opts.eval_every and step % opts.eval_every == 0 and step < opts.steps:
        ev = evaluate(eval_fn, state.params, prepared, opts, mesh)
        writer.write(step, "eval", ev)
        last.update(ev)
        window["t"] = time.perf_counter()
      out_of_time = deadline is not None and time.monotonic() > deadline
      if step % opts.checkpoint_every == 0 or step == opts.steps or preempt.requested \
          or out_of_time:
        ckpt.save(step, state, batches.get_state(), meta)
      if (preempt.requested or out_of_time) and step < opts.steps:
        logger.warning("pretraining stopped at step %d/%d (%s): rerun to resume", step,
                       opts.steps, "SIGTERM" if preempt.requested else "deadline")
        stopped_early = True
        break
  bar.close()
  ckpt.close()
  result = {**last, "step": step, "done": step >= opts.steps and not stopped_early,
            "out_dir": out_dir, "num_params": cfg.num_params,
            "flops_per_token": fpt, "data": {k: report[k] for k in
                                             ("records", "train", "validation", "truncated")}}
  if total["t"]:
    result["mean_tokens_per_s"] = total["tokens"] / total["t"]
    result["mean_padded_tokens_per_s"] = total["steps"] * opts.batch_size * opts.max_len / \
        total["t"]
  if result["done"]:
    ev = evaluate(eval_fn, state.params, prepared, opts, mesh)
    writer.write(step, "eval", ev)
    result.update(ev)
    save_model_dir(out_dir, cfg, state.params, tokenizer_dir, extra=result)
    logger.info("pretrained target written to %s: validation loss %.3f (ppl %.1f)", out_dir,
                result.get("val_loss", float("nan")), result.get("val_ppl", float("nan")))
  writer.close()
  return result
