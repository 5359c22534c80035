"""The JAX target equals transformers' torch model on the same weights (float32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fspad_jax.generate import GenerateOptions, VanillaGenerator
from fspad_jax.hf_checkpoint import load_target
from fspad_jax.model import KVCache
from fspad_jax.sharding import make_mesh
from flax import nnx
from reference_models import FAMILIES, VOCAB, make_reference_model, save_reference_model

TOL = 1e-4


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """(family name, torch model, directory written by save_pretrained)."""
  model = make_reference_model(request.param)
  path = save_reference_model(model, str(tmp_path_factory.mktemp(request.param)))
  return request.param, model, path


def _positions(batch, seq, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + seq, dtype=jnp.int32), (batch, seq))


def _torch_forward(model, tokens):
  with torch.no_grad():
    out = model(torch.tensor(tokens), output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def test_logits_and_features_match_torch(family, mesh):
  name, torch_model, path = family
  cfg, graphdef, params = load_target(path, mesh)
  model = nnx.merge(graphdef, params)
  tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 12))
  ref_logits, ref_feats = _torch_forward(torch_model, tokens)
  logits, feats, _ = model(jnp.asarray(tokens), _positions(2, 12), KVCache.create(cfg, 2, 16))
  assert np.abs(np.asarray(logits) - ref_logits).max() <= TOL, name
  assert np.abs(np.asarray(feats) - ref_feats).max() <= TOL, name
  if name == "mistral":
    assert cfg.sliding_window == 6 and tokens.shape[1] > 6  # the window was exercised


def test_incremental_decoding_equals_full_forward(family, mesh):
  _, _, path = family
  cfg, graphdef, params = load_target(path, mesh)
  model = nnx.merge(graphdef, params)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (2, 10)))
  full_logits, full_feats, _ = model(tokens, _positions(2, 10), KVCache.create(cfg, 2, 16))
  cache = KVCache.create(cfg, 2, 16)
  _, _, cache = model(tokens[:, :4], _positions(2, 4), cache)  # prefill 4
  cache = cache.replace(lengths=cache.lengths + 4)
  step_logits, step_feats = [], []
  for t in range(4, 10):
    lg, ft, cache = model(tokens[:, t:t + 1], _positions(2, 1, t), cache)
    cache = cache.replace(lengths=cache.lengths + 1)
    step_logits.append(lg)
    step_feats.append(ft)
  np.testing.assert_allclose(np.concatenate(step_logits, 1), full_logits[:, 4:], atol=TOL)
  np.testing.assert_allclose(np.concatenate(step_feats, 1), full_feats[:, 4:], atol=TOL)


def test_tree_mask_block_equals_each_path(family, mesh):
  """A block with an ancestor mask gives each node the logits of its root-to-node path."""
  _, _, path = family
  cfg, graphdef, params = load_target(path, mesh)
  model = nnx.merge(graphdef, params)
  rs = np.random.RandomState(3)
  prefix = rs.randint(0, VOCAB, (1, 5))
  #        0
  #      /   \
  #     1     2
  #    / \     \
  #   3   4     5
  #   |
  #   6
  parents = [-1, 0, 0, 1, 1, 2, 3]
  depth = [0, 1, 1, 2, 2, 2, 3]
  n = len(parents)
  tree_tokens = rs.randint(0, VOCAB, (1, n))
  ancestors = np.zeros((n, n), bool)
  for i in range(n):
    j = i
    while j >= 0:
      ancestors[i, j] = True
      j = parents[j]
  cache = KVCache.create(cfg, 1, 32)
  _, _, cache = model(jnp.asarray(prefix), _positions(1, 5), cache)
  cache = cache.replace(lengths=cache.lengths + 5)
  positions = jnp.asarray(5 + np.array(depth))[None]
  tree_logits, _, _ = model(jnp.asarray(tree_tokens), positions, cache,
                            block_mask=jnp.asarray(ancestors)[None])
  for i in range(n):
    path_nodes = [j for j in range(n) if ancestors[i, j]]  # ancestors precede i
    seq = np.concatenate([prefix[0], tree_tokens[0, path_nodes]])[None]
    ref, _, _ = model(jnp.asarray(seq), _positions(1, seq.shape[1]), KVCache.create(cfg, 1, 32))
    np.testing.assert_allclose(tree_logits[0, i], ref[0, -1], atol=TOL)


def test_greedy_generate_matches_transformers(family, mesh):
  name, torch_model, path = family
  cfg, graphdef, params = load_target(path, mesh)
  gen = VanillaGenerator(graphdef, params, mesh)
  rs = np.random.RandomState(4)
  lengths = np.array([3, 9, 6])
  prompt = np.zeros((3, 9), np.int32)
  for i, n in enumerate(lengths):
    prompt[i, :n] = rs.randint(5, VOCAB, n)
  out = gen(prompt, lengths, GenerateOptions(max_new_tokens=10, cache_len=32))
  for i, n in enumerate(lengths):
    ref = torch_model.generate(torch.tensor(prompt[i:i + 1, :n]), max_new_tokens=10,
                               do_sample=False, eos_token_id=None, pad_token_id=1)
    assert out.tokens[i, :out.num_tokens[i]].tolist() == ref[0, n:].tolist(), (name, i)


@pytest.mark.parametrize("variant", ["bf16_weights", "fp16_sharded", "transformers4_config"])
def test_checkpoint_variants_load(variant, tmp_path, mesh):
  """bf16 / fp16 files, multi-shard index, and the transformers 4 config layout."""
  torch_model = make_reference_model("llama3")
  tokens = np.random.RandomState(5).randint(0, VOCAB, (1, 8))
  if variant == "bf16_weights":
    save_reference_model(torch_model, str(tmp_path), dtype=torch.bfloat16)
  elif variant == "fp16_sharded":
    save_reference_model(torch_model, str(tmp_path), dtype=torch.float16, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
  else:
    save_reference_model(torch_model, str(tmp_path), transformers4_layout=True)
    raw = json.load(open(tmp_path / "config.json"))
    assert "rope_parameters" not in raw and raw["rope_scaling"]["rope_type"] == "llama3"
  ref_model = make_reference_model("llama3")  # float32 reference on the saved weights
  if variant != "transformers4_config":
    ref_model.load_state_dict({k: v.float() for k, v in torch_model.state_dict().items()})
  ref_logits, _ = _torch_forward(ref_model, tokens)
  cfg, graphdef, params = load_target(str(tmp_path), mesh)
  assert cfg.rope.rope_type == "llama3"
  logits, _, _ = nnx.merge(graphdef, params)(jnp.asarray(tokens), _positions(1, 8),
                                             KVCache.create(cfg, 1, 8))
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=TOL)


def test_bf16_path_runs_and_tracks_float32(tmp_path, mesh):
  torch_model = make_reference_model("llama3")
  save_reference_model(torch_model, str(tmp_path))
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, VOCAB, (2, 8)))
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg, graphdef, params = load_target(str(tmp_path), mesh, dtype=dtype)
    model = nnx.merge(graphdef, params)
    assert model.layers[0].attn.q_kernel[...].dtype == jnp.dtype(dtype)
    logits, feats, cache = model(tokens, _positions(2, 8), KVCache.create(cfg, 2, 8))
    assert cache.kv[0].dtype == jnp.dtype(dtype) and feats.dtype == jnp.dtype(dtype)
    out[dtype] = np.asarray(logits, np.float32)
  assert np.isfinite(out["bfloat16"]).all()
  assert np.abs(out["bfloat16"] - out["float32"]).max() < 0.1


def test_cacheless_forward_equals_cached(family, mesh):
  """Training runs the target without a KV cache; it must compute the same thing."""
  _, _, path = family
  cfg, graphdef, params = load_target(path, mesh)
  model = nnx.merge(graphdef, params)
  tokens = jnp.asarray(np.random.RandomState(7).randint(0, VOCAB, (2, 9)))
  cached, _, _ = model(tokens, _positions(2, 9), KVCache.create(cfg, 2, 16))
  plain, _, none_cache = model(tokens, _positions(2, 9), None)
  assert none_cache is None
  np.testing.assert_allclose(np.asarray(plain), np.asarray(cached), atol=1e-5)
