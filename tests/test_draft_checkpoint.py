"""Draft checkpoints: EAGLE/FSPAD layouts, round trips, safe .bin loading, a torch reference."""

import functools
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fspad_jax.draft import EAGLE_LAYOUT_KINDS, draft_config_from_target, init_draft, init_draft_cache
from fspad_jax.draft_checkpoint import (DraftCheckpointError, draft_tensor_mappings, load_draft,
                                        save_draft)
from fspad_jax.safetensors_io import SafetensorsFile, write_safetensors
from fspad_jax.sharding import make_mesh
from fspad_jax.tiny_checkpoint import tiny_config

TARGET = tiny_config(vocab_size=80, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=48)
D, F = TARGET.hidden_size, TARGET.intermediate_size
BATCH, SEQ = 1, 6


def random_draft(kind, seed=1, **overrides):
  """(cfg, graphdef, params) with every param random (norm weights near 1)."""
  cfg = draft_config_from_target(TARGET, kind, **overrides)
  graphdef, state = nnx.split(init_draft(cfg))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [(0.15 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)).astype(x.dtype)
         for k, x in zip(keys, leaves)]
  return cfg, graphdef, jax.tree.unflatten(treedef, new)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, features, embeddings):
  positions = jnp.broadcast_to(jnp.arange(features.shape[1], dtype=jnp.int32),
                               features.shape[:2])
  draft = nnx.merge(graphdef, params)
  cache = init_draft_cache(draft.cfg, features.shape[0], 8)
  out = draft(features, embeddings, positions, cache)
  return out.predict, out.regress


def inputs(seed=0):
  kf, ke = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kf, (BATCH, SEQ, D)),  # features [batch, seq, embed]
          jax.random.normal(ke, (BATCH, SEQ, D)))  # embeddings [batch, seq, embed]


def flat(params):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def rewrite_config(draft_dir, **changes):
  path = os.path.join(draft_dir, "config.json")
  with open(path) as f:
    raw = json.load(f)
  for k, v in changes.items():
    if v is None:
      raw.pop(k, None)
    else:
      raw[k] = v
  with open(path, "w") as f:
    json.dump(raw, f)


def read_tensors(draft_dir):
  st = SafetensorsFile(os.path.join(draft_dir, "model.safetensors"))
  return {n: np.array(st.view(n)) for n in st.names()}


@pytest.mark.parametrize("kind", EAGLE_LAYOUT_KINDS)
def test_round_trip(kind, tmp_path):
  cfg, graphdef, params = random_draft(kind)
  save_draft(str(tmp_path), cfg, params)
  with open(tmp_path / "config.json") as f:
    raw = json.load(f)
  assert raw["draft_kind"] == kind and raw["num_hidden_layers"] == 1 and raw["bias"] is True
  names = set(read_tensors(str(tmp_path)))
  assert names == {n for m in draft_tensor_mappings(cfg).values() for n in m.hf_names}
  assert ("fc.fc.weight" in names) == cfg.feature_sampling
  assert ("fc.weight" in names) == (not cfg.feature_sampling)

  cfg2, graphdef2, params2 = load_draft(str(tmp_path), TARGET)
  assert cfg2 == cfg
  a, b = flat(params), flat(params2)
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_array_equal(a[p], b[p], err_msg=str(p))
  feats, embs = inputs()
  for x, y in zip(forward(graphdef, params, feats, embs), forward(graphdef2, params2, feats, embs)):
    np.testing.assert_array_equal(x, y)

  # Official checkpoints have no "draft_kind": the kind comes from the tensor names.
  rewrite_config(str(tmp_path), draft_kind=None)
  assert load_draft(str(tmp_path))[0].kind == kind


def test_round_trip_bf16_sharded_and_embedding(tmp_path):
  cfg, _, params = random_draft("fspad")
  embedding = np.random.default_rng(0).normal(size=(TARGET.vocab_size, D)).astype(np.float32)
  save_draft(str(tmp_path), cfg, params, save_dtype="bfloat16", embedding=embedding)
  tensors = read_tensors(str(tmp_path))
  assert tensors["embed_tokens.weight"].shape == (TARGET.vocab_size, D)
  assert tensors["layers.0.mlp.down_proj.weight"].shape == (2 * D, F)  # PAD: [2d, d_ff]
  cfg2, _, params2 = load_draft(str(tmp_path), TARGET, dtype="bfloat16",
                                mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
  assert cfg2 == cfg.replace(dtype="bfloat16")
  a, b = flat(params), flat(params2)
  for p in a:
    assert b[p].dtype == jnp.bfloat16
    np.testing.assert_array_equal(a[p].astype(jnp.bfloat16), b[p], err_msg=str(p))


def test_fc_without_bias(tmp_path):
  cfg, graphdef, params = random_draft("eagle", fc_bias=False)
  save_draft(str(tmp_path), cfg, params)
  assert "fc.bias" not in read_tensors(str(tmp_path))
  cfg2, graphdef2, params2 = load_draft(str(tmp_path), TARGET)
  assert not cfg2.fc_bias
  feats, embs = inputs()
  np.testing.assert_array_equal(forward(graphdef, params, feats, embs)[0],
                                forward(graphdef2, params2, feats, embs)[0])
  rewrite_config(str(tmp_path), bias=True)  # config says bias, the file has none
  with pytest.raises(DraftCheckpointError, match="missing tensors .*fc.bias"):
    load_draft(str(tmp_path), TARGET)


def test_embedding_is_ignored_with_a_log_line(tmp_path, caplog):
  cfg, _, params = random_draft("eagle")
  save_draft(str(tmp_path), cfg, params,
             embedding=np.zeros((TARGET.vocab_size, D), np.float32))
  with caplog.at_level(logging.INFO, logger="fspad_jax.draft_checkpoint"):
    load_draft(str(tmp_path), TARGET)
  assert any("embed_tokens.weight" in r.getMessage() and "target" in r.getMessage()
             for r in caplog.records)


def test_missing_unknown_and_misshaped_tensors(tmp_path):
  cfg, _, params = random_draft("eagle")
  save_draft(str(tmp_path), cfg, params)
  tensors = read_tensors(str(tmp_path))
  path = str(tmp_path / "model.safetensors")

  broken = dict(tensors)
  del broken["layers.0.self_attn.k_proj.weight"]
  broken["layers.0.input_layernorm.weight"] = np.ones(D, np.float32)
  broken["medusa_head.0.weight"] = np.ones((2, 2), np.float32)
  write_safetensors(path, broken)
  with pytest.raises(DraftCheckpointError) as err:
    load_draft(str(tmp_path), TARGET)
  msg = str(err.value)
  for name in ("layers.0.self_attn.k_proj.weight", "layers.0.input_layernorm.weight",
               "medusa_head.0.weight"):
    assert name in msg
  assert "missing tensors (1)" in msg and "unexpected tensors (2)" in msg

  broken = dict(tensors)
  broken["layers.0.mlp.up_proj.weight"] = np.ones((F + 1, D), np.float32)
  write_safetensors(path, broken)
  with pytest.raises(DraftCheckpointError, match=r"'layers\.0\.mlp\.up_proj\.weight' has shape"):
    load_draft(str(tmp_path), TARGET)

  write_safetensors(path, tensors)
  rewrite_config(str(tmp_path), vocab_size=TARGET.vocab_size + 1)
  with pytest.raises(DraftCheckpointError, match="vocab_size"):
    load_draft(str(tmp_path), TARGET)


# --- pytorch_model.bin: only through torch.load(weights_only=True) ---------------------------


class _Payload:
  """Unpickling this creates a directory: proof that code ran."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def _save_bin(draft_dir, tensors, **extra):
  import torch
  state = {n: torch.from_numpy(np.array(a, np.float32)) for n, a in tensors.items()}
  state.update(extra)
  torch.save(state, os.path.join(draft_dir, "pytorch_model.bin"))


def test_bin_loads_and_code_never_runs(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  cfg, _, params = random_draft("pad_only")
  save_draft(str(tmp_path), cfg, params)
  tensors = read_tensors(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")

  # A plain tensor dict (bf16 too) loads.
  state = {n: torch.from_numpy(np.array(a)).to(torch.bfloat16) for n, a in tensors.items()}
  torch.save(state, tmp_path / "pytorch_model.bin")
  _, _, loaded = load_draft(str(tmp_path), TARGET)
  for p, value in flat(params).items():
    np.testing.assert_array_equal(value.astype(jnp.bfloat16).astype(np.float32),
                                  flat(loaded)[p], err_msg=str(p))

  # Without torch, a .bin is refused, not unpickled some other way.
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(DraftCheckpointError, match="torch is not installed"):
    load_draft(str(tmp_path), TARGET)
  monkeypatch.undo()

  # A pickled object that would run code on loading is refused, and nothing runs.
  marker = str(tmp_path / "code_ran")
  _save_bin(str(tmp_path), tensors, payload=_Payload(marker))
  with pytest.raises(DraftCheckpointError, match="refused"):
    load_draft(str(tmp_path), TARGET)
  assert not os.path.exists(marker)
  # The payload is real: an unsafe load would have run it.
  torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
  assert os.path.isdir(marker)


# --- An EAGLE/FSPAD checkpoint written independently with torch + transformers ---------------


def _torch_draft(kind, seed=0, qkv_bias=False, linear_factor=None, config_theta=10000.0):
  """Torch modules with the official names, and a reference forward in torch.

  qkv_bias: q/k/v projections with biases (EAGLE cnets1.py, "qkv_bias": true).
  linear_factor: linear rope scaling; the reference rotates with base 10000 whatever
  config_theta (written as config.json's rope_theta) says, as the official code does."""
  torch = pytest.importorskip("torch")
  from transformers import LlamaConfig
  from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,
                                                        LlamaRotaryEmbedding)
  torch.manual_seed(seed)
  config = LlamaConfig(vocab_size=TARGET.vocab_size, hidden_size=D, intermediate_size=F,
                       num_hidden_layers=1, num_attention_heads=TARGET.num_heads,
                       num_key_value_heads=TARGET.num_kv_heads, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=256,
                       rope_scaling=({"rope_type": "linear", "factor": linear_factor}
                                     if linear_factor else None))
  config._attn_implementation = "eager"
  fs = kind in ("fspad", "fs_only")
  pad = kind in ("fspad", "pad_only")
  modules = torch.nn.ModuleDict()
  linear = torch.nn.Linear(2 * D, D, bias=True)
  if fs:  # FSPAD's `Efc`: fc, post_attention_layernorm, mlp.{gate,up,down}_proj
    block = torch.nn.Module()
    block.fc = linear
    block.post_attention_layernorm = LlamaRMSNorm(D, eps=1e-5)
    block.mlp = torch.nn.Module()
    block.mlp.gate_proj = torch.nn.Linear(D, F, bias=False)
    block.mlp.up_proj = torch.nn.Linear(D, F, bias=False)
    block.mlp.down_proj = torch.nn.Linear(F, D, bias=False)
    modules["fc"] = block
  else:
    modules["fc"] = linear
  layer = LlamaDecoderLayer(config, layer_idx=0)
  layer.input_layernorm = torch.nn.Identity()  # EAGLE drops the input norm
  if pad:
    layer.mlp.down_proj = torch.nn.Linear(F, 2 * D, bias=False)
  if qkv_bias:  # biases on q/k/v only (o_proj keeps none)
    for name in ("q_proj", "k_proj", "v_proj"):
      old = getattr(layer.self_attn, name)
      setattr(layer.self_attn, name, torch.nn.Linear(old.in_features, old.out_features))
  modules["layers"] = torch.nn.ModuleList([layer])
  with torch.no_grad():
    for name, p in modules.named_parameters():
      if name.endswith("layernorm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  rotary = LlamaRotaryEmbedding(config)

  @torch.no_grad()
  def reference(feats, embs):
    """The drafts' forward, per their definitions, in torch (float32)."""
    e, f = torch.from_numpy(np.array(embs)), torch.from_numpy(np.array(feats))
    if fs:
      h = block.fc(torch.cat([e, f], -1))
      n = block.post_attention_layernorm(h)
      x = h + block.mlp.down_proj(torch.nn.functional.silu(block.mlp.gate_proj(e))
                                  * block.mlp.up_proj(n))
    else:
      x = linear(torch.cat([e, f], -1))
    seq = x.shape[1]
    positions = torch.arange(seq)[None]
    cos_sin = rotary(x, positions)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    if not pad:  # EAGLE: the transformers decoder layer itself, input norm replaced
      out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
      return out.numpy(), out.numpy()
    attn, _ = layer.self_attn(x, attention_mask=mask, position_embeddings=cos_sin)
    a = x + attn
    o = torch.cat([a, a], -1) + layer.mlp(layer.post_attention_layernorm(a))
    return o[..., :D].numpy(), o[..., D:].numpy()

  state = {"fc." + k: v for k, v in modules["fc"].state_dict().items()}
  state.update({"layers.0." + k: v for k, v in layer.state_dict().items()})
  state["embed_tokens.weight"] = torch.randn(TARGET.vocab_size, D)
  raw = {  # a transformers-4 style config, like the published EAGLE heads'
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bias": True,
      "hidden_act": "silu", "hidden_size": D, "intermediate_size": F,
      "num_attention_heads": TARGET.num_heads, "num_key_value_heads": TARGET.num_kv_heads,
      "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": config_theta,
      "rope_scaling": {"type": "linear", "factor": linear_factor} if linear_factor else None,
      "max_position_embeddings": 256, "vocab_size": TARGET.vocab_size,
      "torch_dtype": "float16", "transformers_version": "4.28.1", "use_cache": True,
      "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
      **({"qkv_bias": True} if qkv_bias else {}),
  }
  return state, raw, reference


@pytest.mark.parametrize("kind,fmt", [("eagle", "bin"), ("eagle", "safetensors"),
                                      ("fspad", "bin"), ("fs_only", "safetensors"),
                                      ("pad_only", "safetensors")])
def test_matches_torch_reference(kind, fmt, tmp_path):
  state, raw, reference = _torch_draft(kind)
  import torch
  if fmt == "bin":
    torch.save(state, tmp_path / "pytorch_model.bin")
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(raw, f)

  cfg, graphdef, params = load_draft(str(tmp_path), TARGET)
  assert cfg.kind == kind and cfg.rope.theta == 10000.0
  feats, embs = inputs(seed=2)
  predict, regress = forward(graphdef, params, feats, embs)
  want_predict, want_regress = reference(feats, embs)
  np.testing.assert_allclose(predict, want_predict, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(regress, want_regress, atol=1e-4, rtol=1e-4)


def _load_torch_draft(tmp_path, state, raw):
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(raw, f)
  return load_draft(str(tmp_path), TARGET)


def _assert_matches(graphdef, params, reference):
  feats, embs = inputs(seed=2)
  predict, regress = forward(graphdef, params, feats, embs)
  want_predict, want_regress = reference(feats, embs)
  np.testing.assert_allclose(predict, want_predict, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(regress, want_regress, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_qkv_bias_head_matches_torch_reference(kind, tmp_path):
  """A head with q/k/v biases (cnets1.py's "qkv_bias": true, Qwen2 heads) loads and matches;
  the biases are random, so dropping them would fail the comparison."""
  state, raw, reference = _torch_draft(kind, qkv_bias=True)
  assert float(state["layers.0.self_attn.k_proj.bias"].abs().sum()) > 0
  cfg, graphdef, params = _load_torch_draft(tmp_path, state, raw)
  assert cfg.qkv_bias
  _assert_matches(graphdef, params, reference)
  out = tmp_path / "export"
  save_draft(str(out), cfg, params)  # exports the biases under the same names
  tensors = read_tensors(str(out))
  for name in ("q", "k", "v"):
    np.testing.assert_allclose(tensors[f"layers.0.self_attn.{name}_proj.bias"],
                               state[f"layers.0.self_attn.{name}_proj.bias"].numpy(), atol=1e-6)
  assert load_draft(str(out), TARGET)[0].qkv_bias


def test_official_bias_false_follows_the_tensors(tmp_path):
  """Official FSPAD configs may say "bias": false while the code always builds the fc bias."""
  state, raw, reference = _torch_draft("fspad")
  cfg, graphdef, params = _load_torch_draft(tmp_path, state, {**raw, "bias": False})
  assert cfg.fc_bias
  _assert_matches(graphdef, params, reference)


def test_official_linear_rope_uses_base_10000(tmp_path):
  """Linear rope_scaling: the official code's rotary embedding ignores rope_theta (base
  10000); an official-layout head is imported that way. An export keeps its theta."""
  state, raw, reference = _torch_draft("eagle", linear_factor=4.0, config_theta=500000.0)
  cfg, graphdef, params = _load_torch_draft(tmp_path, state, raw)
  assert cfg.rope.rope_type == "linear" and cfg.rope.factor == 4.0
  _assert_matches(graphdef, params, reference)  # (with base 500000 it does not match)
  assert cfg.rope.theta == 10000.0
  own = cfg.replace(rope=cfg.rope.__class__(theta=500000.0, rope_type="linear", factor=4.0))
  save_draft(str(tmp_path / "own"), own, params)  # has "draft_kind": rope_theta as written
  assert load_draft(str(tmp_path / "own"), TARGET)[0].rope.theta == 500000.0


def test_train_checkpoint_with_the_older_fs_kernel_layout_decodes(tmp_path):
  """train.py checkpoints written before the feature-sampling kernel became [2, d, d_ff]
  (it was [d, 2, d_ff]) still load for decoding, transposed, to the same draft."""
  import dataclasses as dc
  import orbax.checkpoint as ocp
  from fspad_jax.draft_source import load_draft_for_decode
  cfg, graphdef, params = random_draft("fspad", seed=3)
  pure = nnx.to_pure_dict(params)
  old = jax.tree.map(np.asarray, pure)
  old["feature_sampling"]["gate_up_kernel"] = np.transpose(
      old["feature_sampling"]["gate_up_kernel"], (1, 0, 2))  # the older [d, 2, d_ff]
  step = tmp_path / "checkpoints" / "7"
  ocp.PyTreeCheckpointer().save(str(step / "state"), {"params": old})
  (step / "meta").mkdir()
  (step / "commit_success.txt").write_text("ok")
  raw = dc.asdict(cfg)
  with open(tmp_path / "draft_config.json", "w") as f:
    json.dump(raw, f)
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, _, loaded = load_draft_for_decode(str(tmp_path), TARGET, "fspad", mesh)
  for (path, a), (_, b) in zip(sorted(nnx.to_flat_state(params)),
                               sorted(nnx.to_flat_state(loaded))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_train_checkpoint_decodes_without_orbax_warnings(tmp_path, caplog):
  """A draft in train.py's layout (a CheckpointManager step: state/, meta/ and the step's
  _CHECKPOINT_METADATA one level above state/) loads for decoding without a warning: the
  feature-sampling layout check reads the tree metadata through the handler (a Checkpointer
  looked for _CHECKPOINT_METADATA inside state/ and logged 'Metadata file does not exist'
  once per load)."""
  import dataclasses as dc
  import logging
  import orbax.checkpoint as ocp
  from fspad_jax.draft_source import load_draft_for_decode
  cfg, graphdef, params = random_draft("fspad", seed=4)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  manager.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": nnx.to_pure_dict(params)}),
      meta=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  with open(tmp_path / "draft_config.json", "w") as f:
    json.dump(dc.asdict(cfg), f)
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with caplog.at_level(logging.WARNING):
    _, _, loaded = load_draft_for_decode(str(tmp_path), TARGET, "fspad", mesh)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [w for w in warnings if "Metadata file does not exist" in w], warnings
  for (path, a), (_, b) in zip(sorted(nnx.to_flat_state(params)),
                               sorted(nnx.to_flat_state(loaded))):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
