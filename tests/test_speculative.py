"""Speculative decoding is lossless: greedy output equals vanilla token for token, and sampled
output follows the target's distribution (chi-square against exact enumeration)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from fspad_jax.config import ModelConfig, RopeConfig
from fspad_jax.draft import draft_config_from_target, init_draft
from fspad_jax.generate import GenerateOptions, VanillaGenerator
from fspad_jax.model import init_model
from fspad_jax.sampling import SamplingParams, processed_probs
from fspad_jax.sharding import make_mesh
from fspad_jax.speculative import (FINISH_CACHE_FULL, SpecOptions, SpeculativeGenerator,
                                   cache_len_for)
from fspad_jax.target import Target


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def small_vocab_target(vocab: int, seed: int, scale: float = 6.0) -> ModelConfig:
  """A target whose vocabulary is so small that a K-wide tree covers much of it: even a
  random draft gets long runs accepted, exercising multi-token commits."""
  cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0))
  graphdef, params = nnx.split(init_model(cfg, seed=seed))
  params = jax.tree.map(lambda x: x if x.ndim == 1 else x * scale, params)
  return cfg, graphdef, params


def random_draft(target_cfg, kind: str, seed: int):
  dcfg = draft_config_from_target(target_cfg, kind)
  return nnx.split(init_draft(dcfg, seed=seed))


def random_prompts(num: int, max_len: int, vocab: int, seed: int):
  rs = np.random.RandomState(seed)
  lengths = rs.randint(1, max_len + 1, num).astype(np.int32)
  prompt = np.zeros((num, max_len), np.int32)
  for i, n in enumerate(lengths):
    prompt[i, :n] = rs.randint(0, vocab, n)
  return prompt, lengths


def assert_greedy_equal(spec_gen, vanilla_gen, prompt, lengths, batch, options):
  """Decodes all prompts `batch` at a time with both methods; outputs must be identical."""
  vanilla_opts = GenerateOptions(max_new_tokens=options.max_new_tokens,
                                 stop_token_ids=options.stop_token_ids,
                                 cache_len=options.cache_len)
  accepted = []
  for i in range(0, len(prompt), batch):
    p, n = prompt[i:i + batch], lengths[i:i + batch]
    spec = spec_gen(p, n, options)
    van = vanilla_gen(p, n, vanilla_opts)
    for r in range(len(p)):
      got = spec.tokens[r, :spec.num_tokens[r]].tolist()
      want = van.tokens[r, :van.num_tokens[r]].tolist()
      assert got == want, f"prompt {i + r}: speculative {got} != vanilla {want}"
      assert spec.finish_reason[r] == van.finish_reason[r], f"prompt {i + r}"
      steps = spec.accept_history[r][spec.accept_history[r] >= 0]
      assert len(steps) == spec.steps[r]
      # Every step commits accepted + 1 tokens, except that a stop token or the token
      # budget may cut the last one short.
      assert spec.num_tokens[r] <= 1 + np.sum(steps + 1)
      assert spec.num_tokens[r] > np.sum(steps[:-1] + 1) if len(steps) else True
      accepted.extend(steps.tolist())
  return np.asarray(accepted)


def train_draft_on_own_samples(cfg, graphdef, params, mesh, kind="fspad", steps=300):
  """Trains a draft (train_lib's jitted step) on the target's own sampled continuations."""
  from fspad_jax import train_lib
  from fspad_jax.draft import abstract_draft
  from fspad_jax.sharding import ShardingRules
  seq, batch = 32, 16
  vanilla = VanillaGenerator(graphdef, params, mesh)
  rows = []
  for s in range(8):
    prompt, lengths = random_prompts(64, 4, cfg.vocab_size, seed=100 + s)
    out = vanilla(prompt, lengths, GenerateOptions(
        max_new_tokens=seq - 4, sampling=SamplingParams(temperature=1.0), cache_len=40), seed=s)
    rows += [np.concatenate([prompt[i, :lengths[i]], out.tokens[i]])[:seq] for i in range(64)]
  data = np.stack([np.pad(r, (0, seq - len(r))) for r in rows]).astype(np.int32)
  dcfg = draft_config_from_target(cfg, kind)
  draft_graphdef, _ = nnx.split(abstract_draft(dcfg))
  optimizer, schedule = train_lib.make_optimizer(train_lib.OptimConfig(
      learning_rate=3e-3, warmup_steps=10, total_steps=steps, clip="global_norm",
      clip_value=1.0))
  setup = train_lib.TrainSetup(cfg, graphdef, params, dcfg, draft_graphdef, mesh,
                               ShardingRules(), optimizer, schedule,
                               train_lib.LossConfig(noise=0.0), grad_accum=1)
  state = train_lib.init_train_state(setup, seed=0)
  step = train_lib.make_train_step(setup, setup.state_shardings(state), batch, seq)
  rs = np.random.RandomState(0)
  for _ in range(steps):
    idx = rs.randint(0, len(data), batch)
    state, _ = step(state, params, {"input_ids": data[idx][None],
                                    "loss_mask": np.ones((1, batch, seq), np.int32),
                                    "length": np.full((1, batch), seq, np.int32)})
  return draft_graphdef, state.params


@pytest.fixture(scope="module")
def small_vocab(mesh):
  """16-token target, a draft trained on it (long accepted runs) and a random draft."""
  cfg, tg, tp = small_vocab_target(16, seed=1)
  return cfg, tg, tp, {"trained": train_draft_on_own_samples(cfg, tg, tp, mesh),
                       "random": random_draft(cfg, "fspad", seed=2)}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("draft_kind", ["trained", "random"])
def test_greedy_equals_vanilla_small_vocab(small_vocab, draft_kind, batch, mesh):
  """Full-width trees over a 16-token vocabulary, stop tokens inside accepted runs."""
  cfg, tg, tp, drafts = small_vocab
  dg, dp = drafts[draft_kind]
  base = SpecOptions(max_new_tokens=20, depth=4, top_k=3, total_tokens=30,
                     stop_token_ids=(3,))
  options = dataclasses.replace(base, cache_len=cache_len_for(12, base))
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh)
  prompt, lengths = random_prompts(52, 12, 16, seed=3)
  accepted = assert_greedy_equal(spec, VanillaGenerator(tg, tp, mesh), prompt, lengths,
                                 batch, options)
  if draft_kind == "trained":  # multi-token commits up to the full depth
    assert accepted.mean() > 1.5 and accepted.max() == options.depth, np.bincount(accepted)
  else:
    assert accepted.mean() > 0.1 and accepted.max() >= 2, np.bincount(accepted)


def test_greedy_equals_vanilla_eagle_draft(mesh):
  cfg, tg, tp = small_vocab_target(16, seed=1)
  dg, dp = random_draft(cfg, "eagle", seed=4)
  base = SpecOptions(max_new_tokens=20, depth=3, top_k=4, total_tokens=12)
  options = dataclasses.replace(base, cache_len=cache_len_for(12, base))
  prompt, lengths = random_prompts(52, 12, 16, seed=6)
  accepted = assert_greedy_equal(SpeculativeGenerator(tg, tp, dg, dp, mesh),
                                 VanillaGenerator(tg, tp, mesh), prompt, lengths, 4, options)
  assert accepted.max() >= 1


@pytest.fixture(scope="module")
def trained_draft(tmp_path_factory):
  """A tiny HF target and an fspad draft trained on it by the training pipeline."""
  from fspad_jax import trainer
  from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations
  from fspad_jax.config import load_repo_config
  root = tmp_path_factory.mktemp("trained")
  model_dir = make_tiny_checkpoint(str(root / "model"))
  data = make_tiny_conversations(str(root / "conv.jsonl"), 120)
  config = load_repo_config("tiny")
  config.target.path = model_dir
  config.data.path = data
  config.data.max_len = 64
  config.train.steps = 60
  config.train.log_every = 30
  config.train.eval_every = 0
  config.train.tensorboard = False
  workdir = str(root / "work")
  trainer.train(config, workdir, progress=False)
  return model_dir, workdir


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("draft_kind", ["trained", "random"])
def test_greedy_equals_vanilla_tiny_checkpoint(trained_draft, draft_kind, batch, mesh):
  """The tiny HF checkpoint (512-token vocabulary) with a trained and an untrained draft."""
  from fspad_jax.draft_source import load_draft_for_decode
  model_dir, workdir = trained_draft
  target = Target.from_pretrained(model_dir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  if draft_kind == "trained":
    _, dg, dp = load_draft_for_decode(workdir, target.cfg, "fspad", target.mesh)
  else:
    dg, dp = random_draft(target.cfg, "fspad", seed=5)
  options = SpecOptions(max_new_tokens=16, depth=5, top_k=4, total_tokens=16,
                        stop_token_ids=target.cfg.eos_token_ids,
                        cache_len=cache_len_for(10, SpecOptions(max_new_tokens=16, depth=5,
                                                                top_k=4, total_tokens=16)))
  spec = SpeculativeGenerator(target.graphdef, target.params, dg, dp, target.mesh)
  prompt, lengths = random_prompts(52, 10, target.cfg.vocab_size, seed=7)
  accepted = assert_greedy_equal(spec, target.vanilla_generator(), prompt, lengths, batch,
                                 options)
  if draft_kind == "trained":  # random-id prompts are far from its chat training data
    assert accepted.max() >= 1


def test_cache_full_stops_cleanly(mesh):
  cfg, tg, tp = small_vocab_target(16, seed=1)
  dg, dp = random_draft(cfg, "fspad", seed=2)
  options = SpecOptions(max_new_tokens=40, depth=3, top_k=3, total_tokens=6, cache_len=24)
  prompt, lengths = random_prompts(4, 8, 16, seed=4)
  out = SpeculativeGenerator(tg, tp, dg, dp, mesh)(prompt, lengths, options)
  assert np.all(out.finish_reason == FINISH_CACHE_FULL)
  vanilla = VanillaGenerator(tg, tp, mesh)(prompt, lengths, GenerateOptions(
      max_new_tokens=24, cache_len=32))
  for r in range(4):  # what it produced before stopping is still the greedy output
    n = out.num_tokens[r]
    assert 1 <= n <= 24 - lengths[r]
    assert out.tokens[r, :n].tolist() == vanilla.tokens[r, :n].tolist()


# ----------------------------------------------------------------------------- sampling


def exact_first_tokens_distribution(cfg, graphdef, params, prompt, sampling, num_tokens=3):
  """P(first num_tokens generated tokens) under the target with `sampling`, by enumeration."""
  model = nnx.merge(graphdef, params)
  vocab = cfg.vocab_size

  def next_probs(prefixes):  # [n, len] -> [n, vocab]
    prefixes = jnp.asarray(prefixes, jnp.int32)
    n, length = prefixes.shape
    positions = jnp.broadcast_to(jnp.arange(length), (n, length))
    logits, _, _ = model(prefixes, positions, None)
    return np.asarray(processed_probs(logits[:, -1], sampling), np.float64)

  joint = {(): 1.0}
  for _ in range(num_tokens):
    keys = list(joint)
    probs = next_probs([list(prompt) + list(k) for k in keys])
    joint = {k + (t,): joint[k] * probs[i, t] for i, k in enumerate(keys)
             for t in range(vocab) if joint[k] * probs[i, t] > 0}
  return joint


def chi_square_pvalue(counts: dict, expected_probs: dict, total: int, min_expected=5.0):
  """Pearson chi-square p-value; cells with small expectation are pooled into one."""
  cells = sorted(expected_probs, key=lambda k: -expected_probs[k])
  observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
  for k in cells:
    e = expected_probs[k] * total
    if e >= min_expected:
      observed.append(counts.get(k, 0))
      expected.append(e)
    else:
      pooled_o += counts.get(k, 0)
      pooled_e += e
  unexpected = sum(v for k, v in counts.items() if k not in expected_probs)
  assert unexpected == 0, f"{unexpected} samples have zero probability under the target"
  if pooled_e > 0:
    observed.append(pooled_o)
    expected.append(pooled_e)
  observed, expected = np.asarray(observed, float), np.asarray(expected, float)
  expected *= observed.sum() / expected.sum()
  return stats.chisquare(observed, expected).pvalue


@pytest.fixture(scope="module")
def sampling_setup(mesh):
  cfg, tg, tp = small_vocab_target(6, seed=11, scale=3.0)
  dg, dp = random_draft(cfg, "fspad", seed=12)
  return cfg, tg, tp, SpeculativeGenerator(tg, tp, dg, dp, mesh)


SAMPLED_PROMPT, SAMPLED_ROWS, SAMPLED_ROUNDS = [2, 5, 1], 2000, 10  # 20,000 samples


def sample_first_tokens(spec, sampling: SamplingParams):
  """The first 3 tokens after SAMPLED_PROMPT, sampled SAMPLED_ROWS x SAMPLED_ROUNDS times
  (a depth-3 / top-k-3 / 8-node tree). Returns (counts {tokens: n}, first-step accepts)."""
  options = SpecOptions(max_new_tokens=3, sampling=sampling, depth=3, top_k=3,
                        total_tokens=8, cache_len=32)
  prompt = np.tile(np.asarray(SAMPLED_PROMPT, np.int32), (SAMPLED_ROWS, 1))
  counts, accepted = {}, []
  for seed in range(SAMPLED_ROUNDS):
    out = spec(prompt, np.full(SAMPLED_ROWS, len(SAMPLED_PROMPT)), options, seed=seed)
    assert np.all(out.num_tokens == 3)
    for row in map(tuple, out.tokens[:, :3].tolist()):
      counts[row] = counts.get(row, 0) + 1
    accepted.append(out.accept_history[:, 0])
  return counts, np.concatenate(accepted)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_matches_target_distribution(sampling_setup, temperature, top_p):
  cfg, tg, tp, spec = sampling_setup
  sampling = SamplingParams(temperature=temperature, top_p=top_p)
  prompt = SAMPLED_PROMPT
  counts, accepted = sample_first_tokens(spec, sampling)
  assert (accepted >= 1).mean() > 0.2 and (accepted == 2).any()  # verification was exercised
  total = SAMPLED_ROWS * SAMPLED_ROUNDS
  exact = exact_first_tokens_distribution(cfg, tg, tp, prompt, sampling)
  assert abs(sum(exact.values()) - 1.0) < 1e-6
  p_value = chi_square_pvalue(counts, exact, total)
  assert p_value > 1e-3, p_value
  # The test has power: the same samples are rejected against another temperature's law.
  other = SamplingParams(temperature=0.5 if temperature == 1.0 else 1.0, top_p=top_p)
  wrong = exact_first_tokens_distribution(cfg, tg, tp, prompt, other)
  observed_outside = sum(v for k, v in counts.items() if k not in wrong)
  assert observed_outside > 0 or chi_square_pvalue(counts, wrong, total) < 1e-6


# ----------------------------------------------------------------------------- hot vocabulary

HOT_IDS = np.asarray([0, 2, 3, 5, 8, 9, 11, 14], np.int32)  # half of a 16-token vocabulary


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_vanilla_hot_vocabulary(small_vocab, batch, mesh):
  """A draft restricted to half the vocabulary: it can only propose hot tokens, so every cold
  token of the output (the target's argmax outside the hot set) must come from the verifier's
  bonus; the output is still vanilla's, token for token."""
  cfg, tg, tp, drafts = small_vocab
  dg, dp = drafts["trained"]
  base = SpecOptions(max_new_tokens=20, depth=4, top_k=3, total_tokens=30, stop_token_ids=(3,))
  options = dataclasses.replace(base, cache_len=cache_len_for(12, base))
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh, hot_ids=HOT_IDS)
  vanilla = VanillaGenerator(tg, tp, mesh)
  prompt, lengths = random_prompts(52, 12, 16, seed=8)
  accepted = assert_greedy_equal(spec, vanilla, prompt, lengths, batch, options)
  out = vanilla(prompt, lengths, GenerateOptions(max_new_tokens=20, stop_token_ids=(3,),
                                                 cache_len=options.cache_len))
  emitted = out.tokens[out.tokens >= 0]
  cold = ~np.isin(emitted, HOT_IDS)
  assert cold.mean() > 0.1, "the test needs target argmaxes outside the hot set"
  assert accepted.max() >= 2, np.bincount(accepted)


def test_hot_vocabulary_drafts_only_hot_tokens(small_vocab, mesh):
  """The tree's draft tokens all lie in the hot set (the LM head was sliced to it)."""
  from fspad_jax import speculative as spec_lib
  from fspad_jax.hot_vocab import make_draft_vocab
  cfg, tg, tp, drafts = small_vocab
  dg, dp = drafts["random"]
  options = SpecOptions(max_new_tokens=8, depth=3, top_k=4, total_tokens=10, cache_len=64)
  prompt, lengths = random_prompts(4, 12, 16, seed=9)

  def tree_tokens(tp, dp, prompt, lengths):
    target, draft = nnx.merge(tg, tp), nnx.merge(dg, dp)
    vocab = make_draft_vocab(target, HOT_IDS)
    state = spec_lib.init_state(draft, target, prompt, lengths, jax.random.key(0), options,
                                vocab)
    return spec_lib.build_tree(draft, target, state, options, vocab)[0].tokens[:, 1:]
  tokens = np.asarray(jax.jit(tree_tokens)(tp, dp, prompt, lengths))
  assert np.isin(tokens, HOT_IDS).all(), tokens


def test_sampling_matches_target_distribution_hot_vocabulary(sampling_setup, mesh):
  """Chi-square with a draft that only knows 3 of the 6 tokens (T=1)."""
  cfg, tg, tp, _ = sampling_setup
  dg, dp = random_draft(cfg, "fspad", seed=12)
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh, hot_ids=np.asarray([1, 2, 4], np.int32))
  sampling = SamplingParams(temperature=1.0)
  counts, accepted = sample_first_tokens(spec, sampling)
  assert (accepted >= 1).mean() > 0.1  # hot drafts were accepted
  exact = exact_first_tokens_distribution(cfg, tg, tp, SAMPLED_PROMPT, sampling)
  assert any(t not in (1, 2, 4) for k, v in counts.items() for t in k)  # cold tokens emitted
  assert chi_square_pvalue(counts, exact, SAMPLED_ROWS * SAMPLED_ROUNDS) > 1e-3
