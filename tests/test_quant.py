"""Weight-only int8 drafts: the quantizer's error bound, the quantized draft's forward, and
lossless decoding with an int8 draft (greedy equality and the chi-square test)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fspad_jax import quant
from fspad_jax.config import ConfigError
from fspad_jax.draft import draft_config_from_target, init_draft, init_draft_cache
from fspad_jax.generate import VanillaGenerator
from fspad_jax.sampling import SamplingParams
from fspad_jax.sharding import make_mesh
from fspad_jax.speculative import SpecOptions, SpeculativeGenerator, cache_len_for
from test_speculative import (SAMPLED_PROMPT, SAMPLED_ROUNDS, SAMPLED_ROWS, assert_greedy_equal,
                              chi_square_pvalue, exact_first_tokens_distribution,
                              random_prompts, sample_first_tokens, small_vocab_target,
                              train_draft_on_own_samples)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_quantize_int8_error_bound():
  w = np.random.default_rng(0).normal(size=(64, 2, 24)).astype(np.float32)
  w[:, 0, 3] = 0.0  # an all-zero channel keeps scale 1 and values 0
  q, scale = quant.quantize_int8(w, (0,))
  assert q.dtype == np.int8 and scale.shape == (1, 2, 24)
  assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-7)
  assert np.all(q[:, 0, 3] == 0)
  assert np.abs(q).max() == 127


def test_bad_weight_dtype_is_one_line():
  with pytest.raises(ConfigError, match="draft.weight_dtype='fp4'"):
    quant.check_weight_dtype("fp4")


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_int8_draft_forward_is_close(kind):
  cfg, tg, tp = small_vocab_target(16, seed=1)
  dcfg = draft_config_from_target(cfg, kind)
  graphdef, params = nnx.split(init_draft(dcfg, seed=3))
  qgraphdef, qparams = quant.quantize_draft(graphdef, params)
  assert quant.weight_bytes(qparams) < 0.4 * quant.weight_bytes(params)  # f32 -> int8 + scales
  rng = np.random.default_rng(1)
  feats = jnp.asarray(rng.normal(size=(2, 5, cfg.hidden_size)), jnp.float32)
  embs = jnp.asarray(rng.normal(size=(2, 5, cfg.hidden_size)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))

  def run(g, p):
    out = nnx.merge(g, p)(feats, embs, pos, init_draft_cache(dcfg, 2, 8))
    return np.asarray(out.predict), np.asarray(out.regress)
  for a, b in zip(run(graphdef, params), run(qgraphdef, qparams)):
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max(), np.abs(a - b).max()
    assert np.abs(a - b).max() > 0  # the int8 path was taken


@pytest.fixture(scope="module")
def int8_small_vocab(mesh):
  cfg, tg, tp = small_vocab_target(16, seed=1)
  dg, dp = quant.quantize_draft(*train_draft_on_own_samples(cfg, tg, tp, mesh))
  return cfg, tg, tp, dg, dp


@pytest.mark.parametrize("hot", [False, True])
def test_greedy_equals_vanilla_int8_draft(int8_small_vocab, hot, mesh):
  cfg, tg, tp, dg, dp = int8_small_vocab
  hot_ids = np.asarray([0, 2, 3, 5, 8, 9, 11, 14], np.int32) if hot else None
  base = SpecOptions(max_new_tokens=20, depth=4, top_k=3, total_tokens=30, stop_token_ids=(3,))
  options = dataclasses.replace(base, cache_len=cache_len_for(12, base))
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh, hot_ids=hot_ids, weight_dtype="int8")
  prompt, lengths = random_prompts(52, 12, 16, seed=3)
  accepted = assert_greedy_equal(spec, VanillaGenerator(tg, tp, mesh), prompt, lengths, 4,
                                 options)
  # Half the vocabulary cold: only the hot half of the target's tokens can be drafted.
  assert accepted.mean() > (0.3 if hot else 1.0), np.bincount(accepted)
  assert accepted.max() == options.depth, np.bincount(accepted)


def test_sampling_matches_target_distribution_int8_draft(mesh):
  cfg, tg, tp = small_vocab_target(6, seed=11, scale=3.0)
  dcfg = draft_config_from_target(cfg, "fspad")
  dg, dp = quant.quantize_draft(*nnx.split(init_draft(dcfg, seed=12)))
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh, weight_dtype="int8")
  sampling = SamplingParams(temperature=0.7, top_p=0.9)
  counts, accepted = sample_first_tokens(spec, sampling)
  assert (accepted >= 1).mean() > 0.2
  exact = exact_first_tokens_distribution(cfg, tg, tp, SAMPLED_PROMPT, sampling)
  assert chi_square_pvalue(counts, exact, SAMPLED_ROWS * SAMPLED_ROUNDS) > 1e-3
