"""Hot-vocabulary drafting: selection, storage, one-line refusals, EAGLE-3 `d2t` export and
import, and a train.py run with draft.vocab_size whose decoding equals vanilla."""

import dataclasses
import json
import os
import types

import numpy as np
import pytest
from flax import nnx

from fspad_jax import hot_vocab
from fspad_jax.config import ConfigError, load_repo_config
from fspad_jax.draft import draft_config_from_target, init_draft
from fspad_jax.draft_checkpoint import (DraftCheckpointError, load_draft, read_hot_ids,
                                        save_draft)
from fspad_jax.safetensors_io import SafetensorsFile, write_safetensors
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations, tiny_config


def test_count_and_select():
  ex = [types.SimpleNamespace(input_ids=np.array([1, 2, 2, 3, 7]), loss_mask=np.array([0, 1, 1, 1, 0])),
        types.SimpleNamespace(input_ids=np.array([3, 3, 5]), loss_mask=np.array([1, 1, 1]))]
  counts = hot_vocab.count_assistant_tokens(ex, 8)
  np.testing.assert_array_equal(counts, [0, 0, 2, 3, 0, 1, 0, 0])  # masked 1 and 7 not counted
  # count descending, ties to the lower id (0 before 1 ...), returned ascending
  np.testing.assert_array_equal(hot_vocab.select_hot_ids(counts, 3), [2, 3, 5])
  np.testing.assert_array_equal(hot_vocab.select_hot_ids(counts, 4), [0, 2, 3, 5])


@pytest.mark.parametrize("n", [-1, 9, 2.5, True, "3"])
def test_bad_vocab_size_is_one_line(n):
  with pytest.raises(ConfigError, match=r"config key draft.vocab_size=.*0\.\.8") as e:
    hot_vocab.check_hot_vocab_size(n, 8)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("ids,match", [([1, 9], "outside the target's vocabulary"),
                                       ([1, 1], "repeats"), ([[1, 2]], "1-D"),
                                       ([0.5], "integer")])
def test_bad_stored_ids(tmp_path, ids, match):
  np.save(tmp_path / hot_vocab.HOT_IDS_FILE, np.asarray(ids))
  with pytest.raises(ConfigError, match=match):
    hot_vocab.load_hot_ids(str(tmp_path), 8)


def test_store_and_load(tmp_path):
  assert hot_vocab.load_hot_ids(str(tmp_path), 8) is None
  with pytest.raises(ConfigError, match="hot_vocab.npy is missing"):
    hot_vocab.load_hot_ids(str(tmp_path), 8, expected=3)
  hot_vocab.save_hot_ids(str(tmp_path), np.array([1, 4, 6]))
  np.testing.assert_array_equal(hot_vocab.load_hot_ids(str(tmp_path), 8, expected=3), [1, 4, 6])
  with pytest.raises(ConfigError, match="3 hot ids, but the draft config says 4"):
    hot_vocab.load_hot_ids(str(tmp_path), 8, expected=4)


TARGET = tiny_config(vocab_size=80, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=48)


def test_d2t_round_trip(tmp_path):
  """Export writes EAGLE-3's d2t (target = draft + d2t) and t2d; import reads them back."""
  cfg = draft_config_from_target(TARGET, "fspad")
  params = nnx.state(init_draft(cfg, seed=1))
  ids = np.array([0, 3, 4, 10, 42, 79], np.int32)
  save_draft(str(tmp_path), cfg, params, hot_ids=ids)
  f = SafetensorsFile(os.path.join(tmp_path, "model.safetensors"))
  d2t = np.asarray(f.view("d2t"))
  np.testing.assert_array_equal(np.arange(len(ids)) + d2t, ids)
  assert np.asarray(f.view("t2d")).sum() == len(ids)
  with open(tmp_path / "config.json") as fh:
    assert json.load(fh)["draft_vocab_size"] == len(ids)
  cfg2, _, params2 = load_draft(str(tmp_path), TARGET)
  assert cfg2.hot_vocab_size == len(ids)
  np.testing.assert_array_equal(read_hot_ids(str(tmp_path), vocab_size=80), ids)
  for a, b in zip(*(nnx.to_flat_state(p) for p in (params, params2))):
    np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))


def _rewrite(path, **changes):
  f = SafetensorsFile(os.path.join(path, "model.safetensors"))
  tensors = {n: np.asarray(f.view(n)) for n in f.names()}
  tensors.update(changes)
  tensors = {k: v for k, v in tensors.items() if v is not None}
  write_safetensors(os.path.join(path, "model.safetensors"), tensors)


def test_bad_d2t_is_refused(tmp_path):
  cfg = draft_config_from_target(TARGET, "fspad")
  save_draft(str(tmp_path), cfg, nnx.state(init_draft(cfg, seed=1)),
             hot_ids=np.array([1, 2, 3], np.int32))
  _rewrite(tmp_path, d2t=np.array([1, 1, 100], np.int64))
  with pytest.raises(DraftCheckpointError, match="tensor 'd2t': hot token id 102 is outside"):
    load_draft(str(tmp_path), TARGET)
  _rewrite(tmp_path, d2t=np.array([1, 1, 1], np.int64), t2d=np.zeros(80, bool))
  with pytest.raises(DraftCheckpointError, match="tensor 't2d' does not mark"):
    load_draft(str(tmp_path), TARGET)
  _rewrite(tmp_path, d2t=None, t2d=None)
  with pytest.raises(DraftCheckpointError, match="draft_vocab_size=3, but the weights have no d2t"):
    load_draft(str(tmp_path), TARGET)


def test_train_with_hot_vocabulary_then_decode(tmp_path):
  """train.py's library with draft.vocab_size and the hot token loss: the ids are the data's
  most frequent assistant tokens, stored in the workdir; decoding with them equals vanilla
  (greedy); a size larger than the vocabulary, a bad train.token_loss and "hot" without a hot
  vocabulary are refused in one line before anything loads."""
  from fspad_jax import trainer
  from fspad_jax.decode_lib import run_decode
  target = make_tiny_checkpoint(str(tmp_path / "model"))
  config = load_repo_config("tiny")
  config.target.path = target
  config.data.path = make_tiny_conversations(str(tmp_path / "conv.jsonl"), num=48)
  config.data.max_len = 64
  t = config.train
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.warmup_steps = 6, 6, 0, 6, 2
  t.tensorboard = False
  config.draft.vocab_size = 10 ** 6
  with pytest.raises(ConfigError, match="draft.vocab_size=1000000"):
    trainer.train(config, str(tmp_path / "bad"), progress=False)
  config.train.token_loss = "hot"  # EAGLE-3's hot loss; "full" without a hot vocabulary
  config.draft.vocab_size = 0
  with pytest.raises(ConfigError, match=r"^config key train.token_loss='hot' needs"):
    trainer.train(config, str(tmp_path / "bad"), progress=False)
  config.train.token_loss = "hott"
  with pytest.raises(ConfigError, match=r"^config key train.token_loss='hott': expected one"):
    trainer.train(config, str(tmp_path / "bad"), progress=False)
  config.train.token_loss = "hot"
  config.draft.vocab_size = 128
  workdir = str(tmp_path / "work")
  trainer.train(config, workdir, progress=False)
  vocab = 512
  ids = hot_vocab.load_hot_ids(workdir, vocab, expected=128)
  prepared = [os.path.join(r, hot_vocab.TOKEN_COUNTS_FILE)
              for r, _, files in os.walk(os.path.join(workdir, "data"))
              if hot_vocab.TOKEN_COUNTS_FILE in files]
  counts = np.load(prepared[0])
  assert counts[ids].min() >= np.delete(counts, ids).max()  # the most frequent ones
  with open(os.path.join(workdir, "draft_config.json")) as f:
    assert json.load(f)["hot_vocab_size"] == 128

  prompts = tmp_path / "in.jsonl"
  prompts.write_text("".join(json.dumps({"id": i, "input_ids": list(range(1 + i, 9 + i))}) + "\n"
                             for i in range(6)))
  results = {}
  for method in ("vanilla", "fspad"):
    dconfig = load_repo_config("tiny")
    dconfig.target.path = target
    dconfig.draft.path = workdir if method == "fspad" else ""
    dconfig.decode.method = method
    dconfig.decode.max_new_tokens = 12
    dconfig.decode.batch_size = 3
    out = str(tmp_path / f"{method}.jsonl")
    run_decode(dconfig, str(prompts), out, progress=False)
    with open(out) as f:
      results[method] = {r["id"]: r["output_ids"] for r in map(json.loads, f)}
  assert results["fspad"] == results["vanilla"]


# ----------------------------------------------------------------------- the hot token loss


def test_hot_token_loss_matches_plain_reference():
  """train.token_loss="hot" (EAGLE-3's recipe) == a numpy reference: the draft's softmax over
  the target LM head's hot rows against the target's next-token distribution restricted to the
  hot ids and renormalized, summed where the target's argmax is hot; "full" keeps the softmax
  over the whole vocabulary at every trained position. Top-1 is the hot argmax either way
  (what decoding proposes), as target ids."""
  import jax
  import jax.numpy as jnp
  from fspad_jax import train_lib, ttt
  from fspad_jax.model import init_model
  cfg = tiny_config(vocab_size=128, hidden_size=32, intermediate_size=64)
  target = init_model(cfg, seed=3)
  draft = init_draft(draft_config_from_target(cfg, "fspad", hot_vocab_size=24), seed=4)
  rs = np.random.RandomState(0)
  rows, seq = 3, 10
  ids = rs.randint(0, cfg.vocab_size, (rows, seq)).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.ones((rows, seq), jnp.int32),
           "length": jnp.asarray([seq, seq - 2, seq], jnp.int32)}
  tgt = train_lib.target_outputs(target, batch["input_ids"], batch["loss_mask"],
                                 batch["length"])
  argmax = np.asarray(tgt.next_token)
  # Hot ids: the target's argmax at every other position, plus random others (so both
  # hot-argmax and cold-argmax positions occur), 24 in all.
  hot = set(argmax.reshape(-1)[::2].tolist())
  hot |= set(rs.permutation(cfg.vocab_size)[:24].tolist())
  hot = np.sort(np.asarray(sorted(hot)[:24], np.int32))
  assert len(hot) == 24
  is_hot = np.isin(argmax, hot)
  weights = np.asarray(tgt.weights, np.float64)
  assert 0 < (is_hot * weights).sum() < weights.sum()

  loss_cfg = train_lib.LossConfig(noise=0.0, w_reg=0.0, w_cls=1.0, token_loss="hot")
  loss_fn = lambda c: jax.jit(lambda b: train_lib.draft_loss(draft, target, b,
                                                             jax.random.key(0), c, hot))(batch)
  loss, sums = loss_fn(loss_cfg)
  # Reference: step 1 is the teacher-forced draft pass on the true features.
  steps = ttt.unrolled_forward(
      draft, tgt.features, train_lib.shifted_embeddings(target, batch["input_ids"]), 1)
  predict = np.asarray(steps[0].predict, np.float64)  # [rows, seq, embed]
  head = np.asarray(target.logits(jnp.eye(cfg.hidden_size)), np.float64)  # [embed, vocab]
  probs = np.asarray(tgt.next_probs, np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  hot_logits = predict @ head[:, hot]  # [rows, seq, 24]
  p_hot = probs[..., hot] / probs[..., hot].sum(-1, keepdims=True)
  ce_hot = -(p_hot * log_softmax(hot_logits)).sum(-1)
  ce_full = -(probs * log_softmax(predict @ head)).sum(-1)
  top1 = hot[hot_logits.argmax(-1)] == argmax
  np.testing.assert_allclose(float(sums["cls_sum"]), (ce_hot * weights * is_hot).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(loss), (ce_hot * weights * is_hot).sum() / weights.sum(),
                             rtol=1e-5)
  assert float(sums["top1_sum"]) == (top1 * weights).sum()
  _, sums_full = loss_fn(dataclasses.replace(loss_cfg, token_loss="full"))
  np.testing.assert_allclose(float(sums_full["cls_sum"]), (ce_full * weights).sum(), rtol=1e-5)
  assert float(sums_full["top1_sum"]) == (top1 * weights).sum()  # decoding's hot top-1
  assert abs(float(sums_full["cls_sum"]) - float(sums["cls_sum"])) > 1.0  # they differ
