"""Multi-layer target features, the 'eagle3' and 'fspad3' draft kinds, and EAGLE-3 checkpoint
interop (fspad_jax.eagle3_checkpoint against a torch reference of the EAGLE-3 head)."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from test_speculative import (SAMPLED_PROMPT, SAMPLED_ROUNDS, SAMPLED_ROWS,  # noqa: E402
                              assert_greedy_equal, chi_square_pvalue,
                              exact_first_tokens_distribution, random_prompts,
                              sample_first_tokens)

from fspad_jax import train_lib, ttt  # noqa: E402
from fspad_jax.config import ConfigError, ModelConfig, RopeConfig  # noqa: E402
from fspad_jax.draft import (abstract_draft, draft_config_from_target,  # noqa: E402
                             eagle3_feature_layers, init_draft)
from fspad_jax.draft_checkpoint import DraftCheckpointError  # noqa: E402
from fspad_jax.eagle3_checkpoint import load_eagle3_draft, save_eagle3_draft  # noqa: E402
from fspad_jax.generate import VanillaGenerator  # noqa: E402
from fspad_jax.model import KVCache, init_model, make_attention_inputs  # noqa: E402
from fspad_jax.sampling import SamplingParams  # noqa: E402
from fspad_jax.sharding import ShardingRules, make_mesh  # noqa: E402
from fspad_jax.speculative import SpecOptions, SpeculativeGenerator, cache_len_for  # noqa: E402

LAYERS3 = (1, 2, 3)  # low / mid / high of a 4-layer target
HOT_IDS = np.asarray([0, 2, 3, 5, 8, 9, 11, 14], np.int32)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def four_layer_target(vocab=16, seed=1, scale=6.0):
  cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0))
  graphdef, params = nnx.split(init_model(cfg, seed=seed))
  params = jax.tree.map(lambda x: x if x.ndim == 1 else x * scale, params)
  return cfg, graphdef, params


@pytest.fixture(scope="module")
def target():
  return four_layer_target()


def random_draft(cfg, kind, seed, **overrides):
  dcfg = draft_config_from_target(cfg, kind, **overrides)
  return (dcfg, *nnx.split(init_draft(dcfg, seed=seed)))


# ------------------------------------------------------------------- target forward: the taps


def test_taps_equal_separately_computed_layers(target):
  """features_and_taps returns hidden_states[i] of a layer-by-layer forward, in the order
  given, in training (no cache) and against a cache (prefill, then a tree-like block)."""
  cfg, tg, tp = target
  model = nnx.merge(tg, tp)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 16, (2, 7)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  att = make_attention_inputs(cfg, positions, None, 0, None, None)
  x, hidden = model.embed(tokens), []
  hidden.append(x)
  for i, layer in enumerate(model.layers):
    x, _ = layer(x, None, i, att)
    hidden.append(x)
  final = model.final_norm(x)
  layers = (3, 0, 1, -1)
  feats, taps, _ = model.features_and_taps(tokens, positions, None, layers)
  want = jnp.concatenate([hidden[3], hidden[0], hidden[1], final], -1)
  np.testing.assert_array_equal(np.asarray(feats), np.asarray(final))
  np.testing.assert_allclose(np.asarray(taps), np.asarray(want), atol=1e-6)
  # Default: one layer, the final feature, the same array as `features`.
  _, taps1, _ = model.features_and_taps(tokens, positions, None, (-1,))
  np.testing.assert_array_equal(np.asarray(taps1), np.asarray(feats))
  # With a cache: prefill 4 tokens, then the last 3 as a block; same taps as training.
  cache = KVCache.create(cfg, 2, 16)
  _, t_pre, cache = model.features_and_taps(tokens[:, :4], positions[:, :4], cache, LAYERS3)
  cache = cache.replace(lengths=jnp.full((2,), 4, jnp.int32))
  _, t_blk, _ = model.features_and_taps(tokens[:, 4:], positions[:, 4:], cache, LAYERS3)
  _, t_all, _ = model.features_and_taps(tokens, positions, None, LAYERS3)
  np.testing.assert_allclose(np.asarray(jnp.concatenate([t_pre, t_blk], 1)),
                             np.asarray(t_all), atol=2e-5)


def test_feature_layer_refusals(target):
  cfg = target[0]
  with pytest.raises(ConfigError, match=r"draft.feature_layers=\[1, 9\]: feature layer 9"):
    draft_config_from_target(cfg, "fspad", feature_layers=(1, 9))
  with pytest.raises(ConfigError, match="names a layer twice"):
    draft_config_from_target(cfg, "fspad", feature_layers=(4, -1))
  assert draft_config_from_target(cfg, "fspad").feature_layers == (-1,)
  assert draft_config_from_target(cfg, "fspad3").feature_layers == eagle3_feature_layers(4)
  assert eagle3_feature_layers(32) == (2, 16, 29)  # EAGLE-3's choice for Llama-3.1-8B


# --------------------------------------------------------------------- today's drafts unchanged


def test_default_feature_layers_keep_todays_params_and_loss(target):
  """A default draft has exactly the params it had before (no fusion fc), and its loss is the
  pre-multi-layer formula on the target's final feature."""
  cfg, tg, tp = target
  dcfg, dg, dp = random_draft(cfg, "fspad", seed=3)
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(dp)}
  assert not any(p.startswith("feature_fc") for p in paths)
  assert {"fc/kernel", "fc/bias", "layer/mlp/down_kernel"} <= paths
  batch = {"input_ids": jnp.asarray(np.random.RandomState(1).randint(0, 16, (2, 12)), jnp.int32),
           "loss_mask": jnp.ones((2, 12), jnp.int32), "length": jnp.asarray([12, 9], jnp.int32)}
  loss_cfg = train_lib.LossConfig(noise=0.3)
  rng = jax.random.key(5)
  model, draft = nnx.merge(tg, tp), nnx.merge(dg, dp)
  loss, _ = train_lib.draft_loss(draft, model, batch, rng, loss_cfg)
  # The formula as it was: features + noise in, f(j+1) regressed, soft CE on the target head.
  feats, _ = model.features(batch["input_ids"], jnp.broadcast_to(jnp.arange(12), (2, 12)), None)
  noise = (jax.random.uniform(rng, feats.shape) - 0.5) * 0.3 * 512.0 / 12
  predict, regress = ttt.unrolled_forward(  # ttt_steps 1: the plain causal pass
      draft, feats + noise, train_lib.shifted_embeddings(model, batch["input_ids"]), 1)[0]
  tgt = train_lib.target_outputs(model, batch["input_ids"], batch["loss_mask"], batch["length"])
  nxt = jnp.pad(feats[:, 1:], ((0, 0), (0, 1), (0, 0)))
  reg = jnp.mean(train_lib.smooth_l1(regress, nxt, 1.0), -1)
  cls = -jnp.sum(tgt.next_probs * jax.nn.log_softmax(model.logits(predict), -1), -1)
  want = (jnp.sum(reg * tgt.weights) + 0.1 * jnp.sum(cls * tgt.weights)) / jnp.sum(tgt.weights)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


# ------------------------------------------------------ what the fused draft regresses / feeds


def test_fused_regression_target_and_fed_back_space(target):
  """With several layers, `regress(j)` is trained toward fuse(taps(j+1)) computed by the draft's
  own fc under stop_gradient, and the fed-back feature (width d) enters without the fc."""
  cfg, tg, tp = target
  dcfg, dg, dp = random_draft(cfg, "fspad3", seed=4, feature_layers=LAYERS3)
  model = nnx.merge(tg, tp)
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 16, (2, 9)), jnp.int32)
  tgt = train_lib.target_outputs(model, ids, jnp.ones_like(ids), jnp.full((2,), 9),
                                 dcfg.feature_layers)
  assert tgt.taps.shape == (2, 9, 3 * cfg.hidden_size)

  def target_sum(params):
    return jnp.sum(train_lib.regression_targets(nnx.merge(dg, params), tgt))
  value, grads = jax.value_and_grad(target_sum)(dp)
  draft = nnx.merge(dg, dp)
  want = jnp.pad(draft.feature_fc(tgt.taps)[:, 1:], ((0, 0), (0, 1), (0, 0)))
  np.testing.assert_allclose(float(value), float(jnp.sum(want)), rtol=1e-5)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))  # stop_gradient
  fused = draft.fuse_features(tgt.taps)
  np.testing.assert_array_equal(np.asarray(draft.fuse_features(fused)), np.asarray(fused))
  emb = model.embed(ids)
  np.testing.assert_array_equal(np.asarray(draft.fuse_inputs(tgt.taps, emb)),
                                np.asarray(draft.fuse_inputs(fused, emb)))


# ------------------------------------------------------------------------- lossless decoding


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["eagle3", "fspad3"])
def test_greedy_equals_vanilla_new_kinds(target, kind, batch, mesh):
  cfg, tg, tp = target
  hot = HOT_IDS if kind == "eagle3" else None
  dcfg, dg, dp = random_draft(cfg, kind, seed=5, feature_layers=LAYERS3,
                              hot_vocab_size=0 if hot is None else len(hot))
  base = SpecOptions(max_new_tokens=16, depth=4, top_k=3, total_tokens=20, stop_token_ids=(3,))
  options = dataclasses.replace(base, cache_len=cache_len_for(10, base))
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh, hot_ids=hot)
  prompt, lengths = random_prompts(4 if batch == 1 else 8, 10, 16, seed=7)
  accepted = assert_greedy_equal(spec, VanillaGenerator(tg, tp, mesh), prompt, lengths, batch,
                                 options)
  assert accepted.max() >= 1, np.bincount(accepted)


def test_own_head_needs_its_hot_ids(target, mesh):
  cfg, tg, tp = target
  _, dg, dp = random_draft(cfg, "eagle3", seed=5, hot_vocab_size=len(HOT_IDS))
  with pytest.raises(ValueError, match="needs 8 hot ids, got none"):
    SpeculativeGenerator(tg, tp, dg, dp, mesh)


def test_sampling_matches_target_distribution_eagle3(mesh):
  """Chi-square (T=1) with an 'eagle3' draft over 3 of 6 tokens, fusing 3 layers."""
  cfg, tg, tp = four_layer_target(vocab=6, seed=11, scale=3.0)
  hot = np.asarray([1, 2, 4], np.int32)
  _, dg, dp = random_draft(cfg, "eagle3", seed=12, feature_layers=LAYERS3, hot_vocab_size=3)
  spec = SpeculativeGenerator(tg, tp, dg, dp, mesh, hot_ids=hot)
  sampling = SamplingParams(temperature=1.0)
  counts, accepted = sample_first_tokens(spec, sampling)
  assert (accepted >= 1).mean() > 0.1
  exact = exact_first_tokens_distribution(cfg, tg, tp, SAMPLED_PROMPT, sampling)
  assert chi_square_pvalue(counts, exact, SAMPLED_ROWS * SAMPLED_ROUNDS) > 1e-3


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["eagle3", "fspad3"])
def test_new_kinds_train(target, kind, mesh):
  """A few jitted train steps lower the loss; eagle3 trains on the hot vocabulary only, with
  no regression term in its loss."""
  cfg, tg, tp = target
  hot = HOT_IDS if kind == "eagle3" else None
  dcfg = draft_config_from_target(cfg, kind, feature_layers=LAYERS3,
                                  hot_vocab_size=0 if hot is None else len(hot))
  optimizer, schedule = train_lib.make_optimizer(train_lib.OptimConfig(
      learning_rate=1e-2, warmup_steps=1, total_steps=6, clip="global_norm", clip_value=1.0))
  setup = train_lib.TrainSetup(cfg, tg, tp, dcfg, nnx.split(abstract_draft(dcfg))[0], mesh,
                               ShardingRules(), optimizer, schedule,
                               train_lib.LossConfig(noise=0.0), grad_accum=1, hot_ids=hot)
  state = train_lib.init_train_state(setup, seed=0)
  step = train_lib.make_train_step(setup, setup.state_shardings(state), 4, 16)
  data = np.random.RandomState(3).randint(0, 16, (1, 4, 16)).astype(np.int32)
  batch = {"input_ids": data, "loss_mask": np.ones_like(data),
           "length": np.full((1, 4), 16, np.int32)}
  losses = []  # the token loss (fspad3's regression target moves with its fusion fc)
  for _ in range(6):
    state, metrics = step(state, tp, batch)
    losses.append(float(metrics["loss_cls"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  if kind == "eagle3":
    np.testing.assert_allclose(float(metrics["loss"]), 0.1 * float(metrics["loss_cls"]),
                               rtol=1e-6)
  if kind != "eagle3":
    return
  # Per-depth agreement maps the own head's top-3 back to target ids.
  agreement = train_lib.make_agreement_fn(setup, depths=2)(
      state.params, tp, {k: v[0] for k, v in batch.items()})
  rates = train_lib.summarize_agreement(jax.device_get(agreement), 2)
  assert 0.0 <= rates["top1_depth2"] <= rates["top3_depth2"] <= 1.0


def test_fusion_init_last_starts_as_the_single_layer_draft(target, mesh):
  """train.fusion_init="last": the fusion fc starts as the identity on the deepest tapped
  layer (here the final feature) and zero elsewhere, so fspad3's initial loss equals a
  single-layer fspad draft's with the same other weights."""
  cfg, tg, tp = target
  optimizer, schedule = train_lib.make_optimizer(train_lib.OptimConfig(
      learning_rate=1e-2, warmup_steps=1, total_steps=2))

  def setup_for(dcfg, fusion_init):
    return train_lib.TrainSetup(cfg, tg, tp, dcfg, nnx.split(abstract_draft(dcfg))[0], mesh,
                                ShardingRules(), optimizer, schedule,
                                train_lib.LossConfig(noise=0.0), grad_accum=1,
                                fusion_init=fusion_init)

  multi = draft_config_from_target(cfg, "fspad3", feature_layers=(1, -1, 2))
  single = draft_config_from_target(cfg, "fspad")
  params = train_lib.init_train_state(setup_for(multi, "last"), seed=0).params
  kernel = np.asarray(params["feature_fc"]["kernel"])  # [3, embed, embed]
  np.testing.assert_array_equal(kernel[1], np.eye(cfg.hidden_size))
  assert not kernel[0].any() and not kernel[2].any()
  random_kernel = train_lib.init_train_state(setup_for(multi, "random"), 0).params
  assert np.asarray(random_kernel["feature_fc"]["kernel"])[0].any()  # the default: EAGLE-3's

  data = np.random.RandomState(5).randint(0, 16, (4, 16)).astype(np.int32)
  batch = {"input_ids": data, "loss_mask": np.ones_like(data),
           "length": np.full((4,), 16, np.int32)}
  target_model = nnx.merge(tg, tp)
  losses = []
  for dcfg, p in ((multi, params), (single, {k: v for k, v in params.items()
                                             if k != "feature_fc"})):
    draft = nnx.merge(nnx.split(abstract_draft(dcfg))[0], p)
    loss, sums = train_lib.draft_loss(draft, target_model, batch, jax.random.key(0),
                                      train_lib.LossConfig(noise=0.0))
    losses.append((float(loss), float(sums["reg_sum"]), float(sums["cls_sum"])))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_fusion_lr_scale_scales_only_the_fusion_fc(target, mesh):
  """train.fusion_lr_scale: the fusion fc's steps are scaled (0 freezes it), every other
  param trains as before."""
  cfg, tg, tp = target
  dcfg = draft_config_from_target(cfg, "fspad3", feature_layers=LAYERS3)
  data = np.random.RandomState(3).randint(0, 16, (1, 4, 16)).astype(np.int32)
  batch = {"input_ids": data, "loss_mask": np.ones_like(data),
           "length": np.full((1, 4), 16, np.int32)}
  moved = {}
  for scale in (1.0, 0.5, 0.0):
    optimizer, schedule = train_lib.make_optimizer(train_lib.OptimConfig(
        learning_rate=1e-2, warmup_steps=0, decay="constant", fusion_lr_scale=scale))
    setup = train_lib.TrainSetup(cfg, tg, tp, dcfg, nnx.split(abstract_draft(dcfg))[0], mesh,
                                 ShardingRules(), optimizer, schedule,
                                 train_lib.LossConfig(noise=0.0), grad_accum=1)
    state = train_lib.init_train_state(setup, seed=0)
    before = jax.device_get(state.params)
    step = train_lib.make_train_step(setup, setup.state_shardings(state), 4, 16)
    state, _ = step(state, tp, batch)
    after = jax.device_get(state.params)
    delta = lambda key: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                                     after[key], before[key])
    moved[scale] = (delta("feature_fc")["kernel"], delta("layer"))
  np.testing.assert_allclose(moved[0.5][0], 0.5 * moved[1.0][0], rtol=1e-4, atol=1e-9)
  assert np.abs(moved[1.0][0]).max() > 1e-3 and not moved[0.0][0].any()
  for scale in (0.5, 0.0):  # the rest of the draft takes the same first step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 moved[scale][1], moved[1.0][1])


# ------------------------------------------------------------------- EAGLE-3 checkpoint interop

import reference_models  # noqa: E402  (torch; imported late so the JAX tests need none of it)

E3_TARGET = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=8,
                        num_heads=4, num_kv_heads=2, head_dim=8, rope=RopeConfig(theta=10000.0))


def eagle3_forward(cfg, graphdef, params, features, embeddings):
  draft = nnx.merge(graphdef, params)
  b, s = embeddings.shape[:2]
  out = draft(jnp.asarray(features), jnp.asarray(embeddings),
              jnp.broadcast_to(jnp.arange(s), (b, s)), KVCache.create(cfg.layer_config, b, s))
  return np.asarray(out.regress), np.asarray(draft.logits(out.predict))


@pytest.fixture(scope="module")
def eagle3_reference(tmp_path_factory):
  model = reference_models.make_eagle3_reference(vocab=64, draft_vocab=24)
  path = reference_models.save_eagle3_reference(model, str(tmp_path_factory.mktemp("e3")))
  return model, path


def _torch_outputs(model, features, embeddings):
  import torch
  with torch.no_grad():
    pos = torch.arange(embeddings.shape[1])[None].repeat(embeddings.shape[0], 1)
    out, logits = model(torch.tensor(features), torch.tensor(embeddings), pos)
  return out.numpy(), logits.numpy()


def test_published_eagle3_head_matches_torch_reference(eagle3_reference):
  """A head saved as published (no layer ids: EAGLE-3's default for the target) loads, and
  its forward matches the torch reference on target taps and on a fed-back feature."""
  model, path = eagle3_reference
  cfg, graphdef, params = load_eagle3_draft(path, E3_TARGET, dtype="float32")
  assert cfg.kind == "eagle3" and cfg.feature_layers == eagle3_feature_layers(8) == (2, 4, 5)
  assert cfg.hot_vocab_size == 24 and cfg.num_features == 3
  rs = np.random.RandomState(0)
  taps = rs.randn(2, 5, 96).astype(np.float32)
  emb = rs.randn(2, 5, 32).astype(np.float32)
  for feats in (taps, taps[..., :32] * 2.0):  # target taps, then a d-wide fed-back feature
    ours = eagle3_forward(cfg, graphdef, params, feats, emb)
    ref = _torch_outputs(model, feats, emb)
    np.testing.assert_allclose(ours[0], ref[0], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(ours[1], ref[1], atol=2e-4, rtol=2e-4)
  from fspad_jax.draft_checkpoint import read_hot_ids
  np.testing.assert_array_equal(read_hot_ids(path, vocab_size=64),
                                np.flatnonzero(model.t2d.numpy()))


def test_eagle3_export_round_trip(eagle3_reference, tmp_path):
  """Import -> export -> import gives identical params and outputs; the export loads into the
  torch reference with strict=True and gives the same outputs there."""
  import torch
  from safetensors.torch import load_file
  model, path = eagle3_reference
  cfg, graphdef, params = load_eagle3_draft(path, E3_TARGET, dtype="float32")
  from fspad_jax.draft_checkpoint import read_hot_ids
  hot = read_hot_ids(path, vocab_size=64)
  out_dir = str(tmp_path / "export")
  save_eagle3_draft(out_dir, cfg, params, target_num_layers=8, hot_ids=hot)
  with open(os.path.join(out_dir, "config.json")) as f:
    exported = json.load(f)
  assert exported["architectures"] == ["LlamaForCausalLMEagle3"]
  assert exported["draft_vocab_size"] == 24
  assert exported["eagle_aux_hidden_state_layer_ids"] == list(cfg.feature_layers)
  cfg2, graphdef2, params2 = load_eagle3_draft(out_dir, E3_TARGET, dtype="float32")
  assert cfg2 == cfg
  for (p, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(params2)):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(p))
  reloaded = reference_models.make_eagle3_reference(vocab=64, draft_vocab=24, seed=9)
  reloaded.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=True)
  assert torch.equal(reloaded.d2t, model.d2t) and torch.equal(reloaded.t2d, model.t2d)
  rs = np.random.RandomState(1)
  taps, emb = rs.randn(1, 4, 96).astype(np.float32), rs.randn(1, 4, 32).astype(np.float32)
  ours = eagle3_forward(cfg2, graphdef2, params2, taps, emb)
  for a, b in zip(ours, _torch_outputs(reloaded, taps, emb)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def test_trained_style_eagle3_exports_and_decodes_through_draft_source(tmp_path, mesh):
  """Our own eagle3 draft exports and loads back for decode.method=eagle3 (with its d2t hot
  ids); decode.method=fspad refuses it in one line."""
  from fspad_jax.draft_source import load_draft_for_decode, load_draft_hot_ids
  dcfg = draft_config_from_target(E3_TARGET, "eagle3", hot_vocab_size=8)
  graphdef, params = nnx.split(init_draft(dcfg, seed=2))
  hot = np.asarray([1, 4, 9, 16, 25, 36, 49, 63], np.int32)
  out_dir = str(tmp_path / "ours")
  save_eagle3_draft(out_dir, dcfg, params, target_num_layers=8, hot_ids=hot)
  cfg, _, loaded = load_draft_for_decode(out_dir, E3_TARGET, "eagle3", mesh)
  assert cfg == dcfg.replace(max_position_embeddings=cfg.max_position_embeddings)
  np.testing.assert_array_equal(load_draft_hot_ids(out_dir, cfg, E3_TARGET), hot)
  with pytest.raises(ConfigError, match=r"an 'eagle3' draft, but decode.method='fspad'"):
    load_draft_for_decode(out_dir, E3_TARGET, "fspad", mesh)


def _rewrite(path, out, edit):
  """Copies a head directory, editing its tensors {name: array} or config (edit(t, c))."""
  from fspad_jax.safetensors_io import write_safetensors
  from safetensors.numpy import load_file
  os.makedirs(out, exist_ok=True)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  edit(tensors, config)
  write_safetensors(os.path.join(out, "model.safetensors"), tensors)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f)
  return out


@pytest.mark.parametrize("edit,message", [
    (lambda t, c: t.pop("midlayer.hidden_norm.weight"),
     "missing tensor(s) midlayer.hidden_norm.weight"),
    (lambda t, c: t.update({"midlayer.extra.weight": np.zeros(3, np.float32)}),
     "unexpected tensor(s) midlayer.extra.weight"),
    (lambda t, c: t.update({"lm_head.weight": np.zeros((24, 16), np.float32)}),
     "tensor 'lm_head.weight' has shape [24, 16], but config.json implies [24, 32] "
     "for a 'eagle3' draft"),
    (lambda t, c: t.update({"fc.weight": np.zeros((32, 64), np.float32)}),
     "tensor 'fc.weight' (32, 64) fuses 2 target layers"),
    (lambda t, c: t.update({"d2t": t["d2t"] + 100}), "tensor 'd2t'"),
    (lambda t, c: c.update({"draft_vocab_size": 30}), "draft_vocab_size=30"),
    (lambda t, c: c.update({"eagle_aux_hidden_state_layer_ids": [1, 2, 9]}),
     "eagle_aux_hidden_state_layer_ids"),
])
def test_bad_eagle3_files_refused_in_one_line(eagle3_reference, tmp_path, edit, message):
  _, path = eagle3_reference
  bad = _rewrite(path, str(tmp_path / "bad"), edit)
  with pytest.raises((DraftCheckpointError, ConfigError)) as e:
    load_eagle3_draft(bad, E3_TARGET, dtype="float32")
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_kind_has_a_decode_method():
  from fspad_jax.decoding.engine import METHODS
  from fspad_jax.draft import DRAFT_KINDS
  from fspad_jax.draft_source import METHOD_KINDS
  from fspad_jax.pipeline import KIND_METHOD
  inverted = {k: m for m, kinds in METHOD_KINDS.items() for k in kinds}
  assert inverted == KIND_METHOD and set(inverted) == set(DRAFT_KINDS)
  assert set(METHOD_KINDS) < set(METHODS)
