"""Training-time test (fspad_jax/ttt.py): the unrolled training forward equals decoding run
step by step, its loss, its config keys, and resuming with another ttt_steps.

The reference is the inference path itself: speculative.draft_prefill over the committed
prefix (true features), then, as speculative.build_tree drafts a chain (top-1 per level, with
the data's tokens), one draft.layer call per level at position n + level - 1 fed the parent's
`regress`, its K/V written in the cache's scratch area and its mask the committed prefix plus
its ancestors' scratch slots and its own.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fspad_jax import data as data_lib
from fspad_jax import speculative, train_lib, trainer, ttt
from fspad_jax.config import ConfigError, load_repo_config
from fspad_jax.draft import (DRAFT_KINDS, draft_config_from_target, init_draft,
                             init_draft_cache, token_logits)
from fspad_jax.model import AttentionInputs, init_model, rope_tables
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations, tiny_config

ROWS, SEQ, STEPS = 3, 12, 4


def randomized(params, seed=1, scale=0.15):
  """Every float param random (norm weights near 1): a draft far from its initialization."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)).astype(x.dtype)
      for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    vocab_size=256)
  return init_model(cfg, seed=5)


@pytest.fixture(scope="module")
def batch(model):
  rs = np.random.RandomState(0)
  ids = rs.randint(3, model.cfg.vocab_size, (ROWS, SEQ)).astype(np.int32)
  lengths = np.array([SEQ, SEQ - 3, SEQ], np.int32)
  loss_mask = (np.arange(SEQ)[None] >= np.array([[2], [4], [0]])).astype(np.int32)
  return {"input_ids": ids, "loss_mask": loss_mask, "length": lengths}


def make_draft(model, kind):
  dcfg = draft_config_from_target(model.cfg, kind, dtype="float32")
  graphdef, params = nnx.split(init_draft(dcfg))
  return nnx.merge(graphdef, randomized(params, seed=DRAFT_KINDS.index(kind) + 1))


def decode_chain(draft, model, feats, ids, anchors, steps: int):
  """The draft's first `steps` chain steps after committing tokens 0..anchors[r] in row r,
  computed the way speculative decoding does. feats [rows, SEQ, embed], ids [rows, SEQ],
  anchors [rows] int32 (a position past the row's end reads its last token). Returns per step
  (log-probs [rows, vocab], regress [rows, embed])."""
  rows, vocab = ids.shape[0], model.cfg.vocab_size
  lengths = (anchors + 1).astype(jnp.int32)  # committed tokens n
  scratch = steps  # a chain: one scratch slot per level
  cache = init_draft_cache(draft.cfg, rows, SEQ + scratch)
  token_at = lambda pos: jnp.take_along_axis(ids, jnp.minimum(pos, SEQ - 1)[:, None], 1)
  # Step 1: draft_prefill over the prompt t(0..n-1) and the first token t(n); its root
  # candidates, all `vocab` of them, give the full distribution.
  root_tokens, root_logp, feature, cache = speculative.draft_prefill(
      draft, model, feats, ids, lengths, token_at(lengths)[:, 0], cache, top_k=vocab)
  logp = jnp.zeros((rows, vocab)).at[jnp.arange(rows)[:, None], root_tokens].set(root_logp)
  results = [(logp, feature)]
  # Levels 1..steps-1: build_tree's per-level call, the chain's node fed its parent's regress.
  layer_cfg = draft.cfg.layer_config
  max_len = cache.max_len
  scratch_base = max_len - scratch
  slots = jnp.arange(max_len)
  for level in range(1, steps):
    pos = anchors + level  # [rows]: n + level - 1
    prefix = slots[None, None, :] < lengths[:, None, None]
    seen = (slots >= scratch_base) & (slots <= scratch_base + level - 1)  # ancestors + own
    mask = prefix | seen[None, None, :]  # [rows, 1, max_len]
    cos, sin = rope_tables(layer_cfg, pos[:, None].astype(jnp.int32))
    write = jnp.full((rows, 1), scratch_base + level - 1, jnp.int32)
    # The data's token at this depth, t(pos+1), as the chain's drafted token.
    x = draft.fuse_inputs(feature[:, None], model.embed(token_at(pos + 1)))
    predict, regress, cache = draft.layer(x, cache, AttentionInputs(cos, sin, mask, write))
    feature = regress[:, 0]
    logits = token_logits(draft, model, predict[:, 0])  # own head for 'eagle3'
    results.append((jax.nn.log_softmax(logits, -1), feature))
  return results


def jit_chain(draft, model, steps):
  """decode_chain jitted for this draft, target and depth: (features, ids, anchors) -> ..."""
  return jax.jit(lambda f, i, a: decode_chain(draft, model, f, i, a, steps))


def assert_close(actual, desired, what):
  """Equal up to float32 rounding, relative to the largest entry (activations of a random
  draft reach ~30 and its rounding differences grow with depth)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  err = np.abs(actual - desired).max() / max(1.0, np.abs(desired).max())
  assert err < 1e-4, f"{what}: max difference {err:.2e} of the largest entry"


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_unrolled_forward_matches_decoding_step_by_step(model, batch, kind):
  """ttt.unrolled_forward's step k at position anchor + k - 1 == the k-th draft step after
  committing 0..anchor in speculative decoding: log-probs and regress, every step."""
  draft = make_draft(model, kind)
  ids = jnp.asarray(batch["input_ids"])
  positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (ROWS, SEQ))
  feats, _ = model.features(ids, positions, None)
  emb = train_lib.shifted_embeddings(model, ids)
  steps = jax.jit(lambda f, e: ttt.unrolled_forward(draft, f, e, STEPS))(feats, emb)
  chain = jit_chain(draft, model, STEPS)
  changed = 0
  for anchors in ([0, 3, 7], [5, 1, 0], [2, 6, 4]):
    anchors = np.asarray(anchors, np.int32)
    rows = np.arange(ROWS)
    for k, (logp, regress) in enumerate(chain(feats, ids, jnp.asarray(anchors)), start=1):
      j = anchors + k - 1  # [rows]
      where = f"{kind} anchors {anchors.tolist()} step {k}"
      unrolled = steps[k - 1]
      assert_close(unrolled.regress[rows, j], regress, where + " regress")
      logits = token_logits(draft, model, unrolled.predict[rows, j])
      assert_close(jax.nn.log_softmax(logits, -1),
                   logp, where + " log-probs")
      changed += int(np.abs(unrolled.regress[rows, j] - steps[0].regress[rows, j]).max() > 1e-2)
  assert changed >= 3 * (STEPS - 1)  # fed-back features differ from teacher forcing


def smooth_l1(d, beta=1.0):
  d = np.abs(d)
  return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


@pytest.mark.parametrize("kind,weights,noise", [("fspad", (1.0, 0.5, 0.25), 0.0),
                                                ("eagle", (), 0.3)])
def test_ttt_loss_matches_decoding_reference(model, batch, kind, weights, noise):
  """draft_loss with ttt_steps=3 == sum_k weight_k (w_reg SmoothL1 + w_cls softCE) / N, with
  each step's outputs taken from decode_chain (the inference path) at every anchor, the
  chain fed the noised true features at step 1, in numpy."""
  steps, w_reg, w_cls = 3, 1.0, 0.3
  draft = make_draft(model, kind)
  rng = jax.random.key(3)
  loss_cfg = train_lib.LossConfig(w_reg=w_reg, w_cls=w_cls, noise=noise, ttt_steps=steps,
                                  ttt_weights=weights)
  placed = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, sums = jax.jit(lambda b: train_lib.draft_loss(draft, model, b, rng, loss_cfg))(placed)
  assert set(sums) == set(loss_cfg.sum_keys())

  ids = placed["input_ids"]
  tgt = train_lib.target_outputs(model, ids, placed["loss_mask"], placed["length"])
  feats = np.asarray(tgt.features, np.float64)
  draft_in = tgt.features + (jax.random.uniform(rng, tgt.features.shape) - 0.5) * (
      noise * 512.0 / SEQ)
  f_next = np.concatenate([feats[:, 1:], np.zeros_like(feats[:, :1])], 1)
  probs, trained = np.asarray(tgt.next_probs, np.float64), np.asarray(tgt.weights) > 0
  chain = jit_chain(draft, model, steps)
  totals = np.zeros((steps, 4))  # reg, cls, top1, count per step
  for anchor in range(SEQ - 1):
    anchors = np.full((ROWS,), anchor, np.int32)
    for k, (logp, regress) in enumerate(chain(draft_in, ids, jnp.asarray(anchors)), start=1):
      j = anchor + k - 1
      if j >= SEQ - 1:  # never trained (no next token)
        continue
      on = trained[:, j]
      logp = np.asarray(logp, np.float64)
      reg = smooth_l1(np.asarray(regress, np.float64) - f_next[:, j]).mean(-1)
      ce = -(probs[:, j] * logp).sum(-1)
      top1 = logp.argmax(-1) == probs[:, j].argmax(-1)
      totals[k - 1] += [(reg * on).sum(), (ce * on).sum(), (top1 * on).sum(), on.sum()]
  for k in range(1, steps + 1):
    suffix = "" if k == 1 else f"_step{k}"
    for i, name in enumerate(("reg_sum", "cls_sum", "top1_sum", "weight")):
      np.testing.assert_allclose(float(sums[name + suffix]), totals[k - 1, i], rtol=5e-5,
                                 atol=1e-5, err_msg=name + suffix)
  step_w = weights or (1.0, 0.8, 0.64)
  expected = sum(w * (w_reg * t[0] + w_cls * t[1]) for w, t in zip(step_w, totals))
  np.testing.assert_allclose(float(loss), expected / totals[0, 3], rtol=5e-5)
  assert totals[2, 3] < totals[0, 3]  # step 3 skips positions j < 2 (no anchor)


def test_ttt_1_is_teacher_forcing(model, batch):
  """ttt_steps=1 gives the pre-TTT loss: a plain causal Draft.__call__ pass, weight 1."""
  draft = make_draft(model, "fspad")
  placed = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, sums = train_lib.draft_loss(draft, model, placed, jax.random.key(0),
                                    train_lib.LossConfig(noise=0.0))
  assert set(sums) == {"reg_sum", "cls_sum", "top1_sum", "weight", "tokens"}
  tgt = train_lib.target_outputs(model, placed["input_ids"], placed["loss_mask"],
                                 placed["length"])
  positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (ROWS, SEQ))
  out = draft(tgt.features, train_lib.shifted_embeddings(model, placed["input_ids"]),
              positions, init_draft_cache(draft.cfg, ROWS, SEQ))
  f_next = jnp.pad(tgt.features[:, 1:], ((0, 0), (0, 1), (0, 0)))
  reg = jnp.mean(train_lib.smooth_l1(out.regress, f_next, 1.0), -1)
  np.testing.assert_allclose(sums["reg_sum"], jnp.sum(reg * tgt.weights), rtol=1e-5)


def test_step_weights_and_their_errors():
  assert ttt.step_weights(1) == (1.0,)
  np.testing.assert_allclose(ttt.step_weights(3), (1.0, 0.8, 0.64))
  assert ttt.step_weights(2, (1, 0)) == (1.0, 0.0)
  bad = [(0, ()), (2.0, ()), (True, ()), ("2", ()), (2, (1.0,)), (2, (1.0, -0.1)),
         (2, (1.0, float("nan"))), (2, (0.0, 0.0)), (1, (float("inf"),)), (1, ("1",))]
  for steps, weights in bad:
    with pytest.raises(ConfigError) as e:
      ttt.step_weights(steps, weights)
    msg = str(e.value)
    assert "\n" not in msg and ("train.ttt_steps" in msg or "train.ttt_weights" in msg), msg


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("ttt")
  cfg = tiny_config(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
  model_dir = make_tiny_checkpoint(str(root / "model"), cfg, seed=2)
  data = make_tiny_conversations(str(root / "conversations.jsonl"), num=60)
  prepared = str(root / "prepared")
  data_lib.prepare_dataset(data, model_dir, 32, prepared, val_fraction=0.1)
  return {"model": model_dir, "data": data, "prepared": prepared}


def loop_config(assets, **train):
  config = load_repo_config("tiny")
  config.target.path, config.data.path = assets["model"], assets["data"]
  config.data.max_len, config.data.prepared_dir = 32, assets["prepared"]
  config.train.update({"eval_every": 0, "tensorboard": False, "depths": 1, "global_batch": 4,
                       "log_every": 2, "checkpoint_every": 2, "warmup_steps": 0, **train})
  return config


def test_validate_config_refuses_bad_ttt_keys(assets):
  for key, value in (("ttt_steps", 0), ("ttt_weights", (1.0, -1.0))):
    config = loop_config(assets, ttt_steps=2)
    config.train[key] = value
    with pytest.raises(ConfigError, match=f"train.{key}"):
      trainer.validate_config(config)


def test_resume_with_another_ttt_steps(assets, tmp_path, caplog):
  """A checkpoint trained with ttt_steps=1 resumes with 3 (only the loss changes): it warns
  once, continues from the saved step and logs the per-step losses."""
  trainer.train(loop_config(assets, steps=2), str(tmp_path), progress=False)
  with caplog.at_level(logging.WARNING, logger="fspad_jax.trainer"):
    trainer.train(loop_config(assets, steps=4, ttt_steps=3), str(tmp_path), progress=False)
  warnings = [r.getMessage() for r in caplog.records if "ttt_steps" in r.getMessage()]
  assert len(warnings) == 1 and "(1, ()) -> (3, ())" in warnings[0], warnings
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4]
  assert "loss_cls_step3" not in records[0] and np.isfinite(records[1]["loss_cls_step3"])
  assert records[1]["loss"] > records[1]["loss_reg"] + 0.1 * records[1]["loss_cls"]
