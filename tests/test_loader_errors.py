"""Bad model directories fail with errors that name the problem."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from fspad_jax.config import ConfigError, parse_hf_config
from fspad_jax.hf_checkpoint import CheckpointError, load_target, load_tokenizer
from fspad_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from fspad_jax.sharding import make_mesh
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("good")),
                              tiny_config(vocab_size=300, num_layers=1))


def _copy(good_dir, tmp_path):
  d = tmp_path / "model"
  shutil.copytree(good_dir, d)
  return d


def _edit_config(d, **changes):
  raw = json.load(open(d / "config.json"))
  for k, v in changes.items():
    if v is None:
      raw.pop(k, None)
    else:
      raw[k] = v
  json.dump(raw, open(d / "config.json", "w"))


def _rewrite_tensors(d, edit):
  f = SafetensorsFile(str(d / "model.safetensors"))
  tensors = {n: np.array(f.view(n)) for n in f.names()}
  del f
  edit(tensors)
  write_safetensors(str(d / "model.safetensors"), tensors)


def test_good_checkpoint_loads_with_tokenizer(good_dir, mesh):
  cfg, _, params = load_target(good_dir, mesh)
  assert cfg.vocab_size == 300 and cfg.num_layers == 1
  tok = load_tokenizer(good_dir)
  assert tok.chat_template and tok.eos_token_id in cfg.eos_token_ids


def test_not_a_model_directory(tmp_path, mesh):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_target(str(tmp_path / "nope"), mesh)
  with pytest.raises(ConfigError, match="not a model directory: it has no config.json"):
    load_target(str(tmp_path), mesh)


def test_no_weights_and_pickle_refused(good_dir, tmp_path, mesh):
  d = _copy(good_dir, tmp_path)
  os.remove(d / "model.safetensors")
  with pytest.raises(SafetensorsError, match="no model.safetensors"):
    load_target(str(d), mesh)
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
  with pytest.raises(SafetensorsError, match="pickle-based weights"):
    load_target(str(d), mesh)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "unsupported rope type 'dynamic'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "yarn", "factor": 4}},
     "unsupported rope type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"logit_softcapping": 30.0}, r"unsupported config attribute\(s\) \['logit_softcapping'\]"),
    ({"num_hidden_layers": None}, "required key 'num_hidden_layers' is missing"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "llama3 rope scaling lacks key 'low_freq_factor'"),
])
def test_unsupported_config(good_dir, tmp_path, mesh, changes, message):
  d = _copy(good_dir, tmp_path)
  _edit_config(d, **changes)
  with pytest.raises(ConfigError, match=message):
    load_target(str(d), mesh)


def test_missing_and_unexpected_tensors_are_listed(good_dir, tmp_path, mesh):
  d = _copy(good_dir, tmp_path)
  def edit(t):
    del t["model.layers.0.mlp.down_proj.weight"]
    del t["lm_head.weight"]
    t["model.layers.7.extra.weight"] = np.zeros(3, np.float32)
  _rewrite_tensors(d, edit)
  with pytest.raises(CheckpointError) as e:
    load_target(str(d), mesh)
  msg = str(e.value)
  assert "missing tensors (2): lm_head.weight, model.layers.0.mlp.down_proj.weight" in msg
  assert "unexpected tensors (1): model.layers.7.extra.weight" in msg


def test_shape_mismatch_names_the_tensor(good_dir, tmp_path, mesh):
  d = _copy(good_dir, tmp_path)
  def edit(t):
    t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:8]
  _rewrite_tensors(d, edit)
  with pytest.raises(CheckpointError, match=r"shape mismatch for model.layers.0.self_attn"
                                            r".q_proj.weight \(8, 64\)"):
    load_target(str(d), mesh)


def test_corrupt_index_names_the_shard(good_dir, tmp_path, mesh):
  d = _copy(good_dir, tmp_path)
  json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}},
            open(d / "model.safetensors.index.json", "w"))
  with pytest.raises(SafetensorsError, match="lists shard 'model-00002-of-00002.safetensors'"):
    load_target(str(d), mesh)


def test_transformers4_and_5_layouts_parse_identically():
  base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
  v4 = parse_hf_config({**base, "rope_theta": 500000.0,
                        "rope_scaling": {"rope_type": "llama3", **scaling}})
  v4_old_key = parse_hf_config({**base, "rope_theta": 500000.0,
                                "rope_scaling": {"type": "llama3", **scaling}})
  v5 = parse_hf_config({**base, "rope_parameters": {"rope_type": "llama3",
                                                    "rope_theta": 500000.0, **scaling}})
  assert v4 == v5 == v4_old_key and v5.rope.rope_type == "llama3" and v5.rope.theta == 5e5
