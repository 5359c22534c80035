"""Top-k over the vocabulary stays XLA's TopK kernel: slicing a top-k's result again (the
agreement eval's top-1, the top-k sampling filter's k-th value) made XLA sort every whole
vocabulary row instead, 14-32x slower on CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fspad_jax import train_lib
from fspad_jax.config import ModelConfig
from fspad_jax.draft import abstract_draft, draft_config_from_target
from fspad_jax.model import init_model
from fspad_jax.sampling import SamplingParams, processed_probs
from fspad_jax.sharding import ShardingRules, make_mesh

VOCAB = 512


def vocab_sorts(compiled_text: str, vocab: int) -> list[str]:
  """`sort` instructions of an optimized HLO module whose rows are `vocab` wide."""
  return [line for line in compiled_text.splitlines()
          if re.search(r"\bsort\(", line) and re.search(rf"\[[\d,]*\b{vocab}\]", line)]


def test_top_k_filter_is_not_a_vocabulary_sort():
  logits = jax.ShapeDtypeStruct((8, VOCAB), jnp.float32)
  text = jax.jit(lambda l: processed_probs(l, SamplingParams(temperature=0.8, top_k=20))
                 ).lower(logits).compile().as_text()
  assert not vocab_sorts(text, VOCAB)
  # And it still keeps exactly the top 20 (ties with the 20th kept).
  x = np.random.RandomState(1).randn(8, VOCAB).astype(np.float32)
  probs = np.asarray(processed_probs(jnp.asarray(x), SamplingParams(temperature=0.8, top_k=20)))
  kth = np.sort(x, axis=-1)[:, -20][:, None]
  np.testing.assert_array_equal(probs > 0, x >= kth)


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_agreement_eval_is_not_a_vocabulary_sort(kind):
  cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  tg, tp = nnx.split(init_model(cfg, seed=0))
  dcfg = draft_config_from_target(cfg, kind)
  optimizer, schedule = train_lib.make_optimizer(train_lib.OptimConfig(
      learning_rate=1e-3, warmup_steps=1, total_steps=2))
  setup = train_lib.TrainSetup(cfg, tg, tp, dcfg, nnx.split(abstract_draft(dcfg))[0],
                               make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                               ShardingRules(), optimizer, schedule, train_lib.LossConfig(),
                               grad_accum=1)
  state = train_lib.init_train_state(setup, seed=0)
  batch = {"input_ids": jax.ShapeDtypeStruct((4, 24), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((4, 24), jnp.int32),
           "length": jax.ShapeDtypeStruct((4,), jnp.int32)}
  text = train_lib.make_agreement_fn(setup, depths=3).lower(
      state.params, tp, batch).compile().as_text()
  assert not vocab_sorts(text, VOCAB)
  assert "TopK" in text
