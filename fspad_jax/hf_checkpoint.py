"""Hugging Face model directories <-> fspad_jax target params.

Loading goes tensor by tensor straight into the sharded layout: for every parameter,
`jax.make_array_from_callback` asks for exactly the slices the local devices hold, and
each slice is cut from a memory-mapped safetensors view (transposed/reshaped lazily).
The whole model is never built on one device, and host memory holds at most one
parameter's local shards at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fspad_jax.config import ConfigError, ModelConfig, load_hf_config
from fspad_jax.model import abstract_model
from fspad_jax.safetensors_io import TensorIndex, write_safetensors
from fspad_jax.sharding import ShardingRules, to_host

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


class CheckpointError(ValueError):
  """A model directory whose tensors do not fit the config."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
  """How one fspad_jax parameter is made from Hugging Face tensors.

  `to_ours(views)` maps the HF arrays (in `hf_names` order) to our layout as a lazy numpy
  view; `to_hf(param)` maps our array back to the HF tensors."""

  hf_names: tuple[str, ...]
  to_ours: Callable[[Sequence[np.ndarray]], np.ndarray]
  to_hf: Callable[[np.ndarray], Sequence[np.ndarray]]


def _linear(out_shape):
  """HF Linear weight [out, in] -> kernel [in, *out_shape] (a transposed view)."""
  def to_ours(views):
    w = views[0]
    return w.T.reshape((w.shape[1],) + tuple(out_shape))
  def to_hf(x):
    return [x.reshape(x.shape[0], -1).T]
  return to_ours, to_hf


def _stacked_linear(out_shape):
  """Two HF Linear weights [out, in] -> kernel [in, 2, *out_shape] (k/v, gate/up fused)."""
  def to_ours(views):
    return _LazyStack([w.T.reshape((w.shape[1],) + tuple(out_shape)) for w in views], axis=1)
  def to_hf(x):
    return [x[:, i].reshape(x.shape[0], -1).T for i in range(x.shape[1])]
  return to_ours, to_hf


def _identity_reshape(shape):
  return (lambda views: views[0].reshape(shape)), (lambda x: [x.reshape(-1)])


class _LazyStack:
  """np.stack that slices its inputs before copying, so a shard reads only its bytes."""

  def __init__(self, parts, axis):
    self.parts, self.axis = parts, axis
    s = list(parts[0].shape)
    s.insert(axis, len(parts))
    self.shape = tuple(s)

  def __getitem__(self, idx):
    idx = tuple(idx) + (slice(None),) * (len(self.shape) - len(tuple(idx)))
    which = range(len(self.parts))[idx[self.axis]]
    rest = idx[:self.axis] + idx[self.axis + 1:]
    return np.stack([np.asarray(self.parts[i][rest]) for i in which], axis=self.axis)


def tensor_mappings(cfg: ModelConfig) -> dict[tuple, TensorMapping]:
  """Our parameter path -> TensorMapping, for every parameter of `Transformer(cfg)`."""
  h, kvh, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  same = ((lambda v: v[0]), (lambda x: [x]))
  m = {("embedding",): TensorMapping(("model.embed_tokens.weight",), *same),
       ("final_norm", "weight"): TensorMapping(("model.norm.weight",), *same)}
  if not cfg.tie_word_embeddings:
    m[("lm_head",)] = TensorMapping(("lm_head.weight",), *_linear((cfg.vocab_size,)))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    L = ("layers", i)
    m[L + ("input_norm", "weight")] = TensorMapping((p + "input_layernorm.weight",), *same)
    m[L + ("post_attn_norm", "weight")] = TensorMapping(
        (p + "post_attention_layernorm.weight",), *same)
    m[L + ("attn", "q_kernel")] = TensorMapping((a + "q_proj.weight",), *_linear((h, hd)))
    m[L + ("attn", "kv_kernel")] = TensorMapping(
        (a + "k_proj.weight", a + "v_proj.weight"), *_stacked_linear((kvh, hd)))
    m[L + ("attn", "o_kernel")] = TensorMapping(
        (a + "o_proj.weight",),
        lambda v: v[0].T.reshape(h, hd, d), lambda x: [x.reshape(h * hd, d).T])
    if cfg.qkv_bias:
      m[L + ("attn", "q_bias")] = TensorMapping((a + "q_proj.bias",), *_identity_reshape((h, hd)))
      m[L + ("attn", "kv_bias")] = TensorMapping(
          (a + "k_proj.bias", a + "v_proj.bias"),
          lambda v: _LazyStack([x.reshape(kvh, hd) for x in v], axis=0),
          lambda x: [x[0].reshape(-1), x[1].reshape(-1)])
    if cfg.o_bias:
      m[L + ("attn", "o_bias")] = TensorMapping((a + "o_proj.bias",), *same)
    m[L + ("mlp", "gate_up_kernel")] = TensorMapping(
        (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
        *_stacked_linear((cfg.intermediate_size,)))
    m[L + ("mlp", "down_kernel")] = TensorMapping((p + "mlp.down_proj.weight",),
                                                  *_linear((d,)))
  return m


# Tensors some checkpoints carry that the model does not use.
_HARMLESS_EXTRA = ("rotary_emb.inv_freq",)


def param_shardings(abstract_state: nnx.State, mesh, rules: ShardingRules) -> nnx.State:
  """The NamedSharding of every parameter, from its logical axes (same tree as the state)."""
  def one(var):
    return var.replace(rules.sharding(mesh, var.get_metadata()["logical_axes"], var.shape))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _check_tensors(index: TensorIndex, mappings: dict, cfg: ModelConfig, model_dir: str):
  expected = {n for mp in mappings.values() for n in mp.hf_names}
  present = set(index.names())
  missing = sorted(expected - present)
  unexpected = sorted(n for n in present - expected
                      if not n.endswith(_HARMLESS_EXTRA)
                      and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
  if problems:
    raise CheckpointError(f"{model_dir}: weights do not match config.json: "
                          + "; ".join(problems))


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _check_sizes(index: TensorIndex, cfg: ModelConfig, model_dir: str) -> None:
  """config.json's layer count and widths against the tensors present (headers only), before
  anything is built from them: a wrong num_hidden_layers or vocab_size fails in one line
  naming the key and the file, not after minutes of building a model of that size."""
  config_path = os.path.join(model_dir, "config.json")
  layers = {int(m.group(1)) for n in index.names() if (m := _LAYER_RE.match(n))}
  if cfg.num_layers > len(layers):  # (extra layers are listed as unexpected tensors)
    raise CheckpointError(
        f"{config_path}: num_hidden_layers={cfg.num_layers}, but the safetensors in "
        f"{model_dir} hold {len(layers)} layer(s)"
        + (f" numbered 0..{max(layers)}" if layers else ""))
  name = "model.embed_tokens.weight"
  if name in index:
    shape = index.shape(name)
    where = index.file(name).path
    if len(shape) != 2 or shape[1] != cfg.hidden_size:
      raise CheckpointError(f"{config_path}: hidden_size={cfg.hidden_size}, but {name} in "
                            f"{where} has shape {shape}")
    if shape[0] != cfg.vocab_size:
      raise CheckpointError(f"{config_path}: vocab_size={cfg.vocab_size}, but {name} in "
                            f"{where} has shape {shape}")


def check_checkpoint(model_dir: str, cfg: ModelConfig) -> TensorIndex:
  """Checks the tensors of `model_dir` (names, shapes, complete files) against `cfg` from
  the safetensors headers alone; returns the index. Raises CheckpointError / ConfigError."""
  index = TensorIndex(model_dir)
  _check_sizes(index, cfg, model_dir)
  mappings = tensor_mappings(cfg)
  _check_tensors(index, mappings, cfg, model_dir)
  abstract_state = nnx.state(abstract_model(cfg))
  for path, var in nnx.to_flat_state(abstract_state):
    mapping = mappings[path]
    expected = jax.eval_shape(lambda x: tuple(mapping.to_hf(x)),
                              jax.ShapeDtypeStruct(var.shape, jnp.float32))
    for name, want in zip(mapping.hf_names, expected):
      if index.shape(name) != tuple(want.shape):
        raise CheckpointError(
            f"{index.file(name).path}: shape mismatch for {name} {index.shape(name)}: "
            f"{os.path.join(model_dir, 'config.json')} implies {tuple(want.shape)}")
  return index


FINGERPRINT_SAMPLES = 16  # data blocks read per safetensors file by checkpoint_fingerprint
_SAMPLE_BYTES = 1 << 16


def checkpoint_fingerprint(model_dir: str) -> dict[str, str]:
  """A cheap identity of a model directory that survives a copy or move: sha256 of
  config.json, and of every safetensors file's size, header and FINGERPRINT_SAMPLES
  blocks of its data at fixed fractions of its length (so two checkpoints of the same
  shapes but other weights differ; ~1 MiB read per file). {"config": hex, "weights": hex}."""
  with open(os.path.join(model_dir, "config.json"), "rb") as f:
    config_digest = hashlib.sha256(f.read()).hexdigest()
  weights = hashlib.sha256()
  names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
  for name in names:
    path = os.path.join(model_dir, name)
    size = os.path.getsize(path)
    weights.update(f"{name}:{size}".encode())
    with open(path, "rb") as f:
      header_len = int.from_bytes(f.read(8), "little")
      weights.update(f.read(min(header_len, size)))
      data_start = 8 + header_len
      data_len = max(size - data_start, 0)
      for k in range(FINGERPRINT_SAMPLES):
        f.seek(data_start + data_len * k // FINGERPRINT_SAMPLES)
        weights.update(f.read(_SAMPLE_BYTES))
  return {"config": config_digest, "weights": weights.hexdigest()}


def load_params(model_dir: str, cfg: ModelConfig, mesh, rules: ShardingRules
                ) -> tuple[nnx.GraphDef, nnx.State]:
  """Loads safetensors weights into sharded params. Returns (graphdef, params)."""
  index = check_checkpoint(model_dir, cfg)
  mappings = tensor_mappings(cfg)
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  shardings = param_shardings(abstract_state, mesh, rules)
  dtype = NP_DTYPES[cfg.dtype]
  flat_abstract = dict(nnx.to_flat_state(abstract_state))
  flat_shardings = dict(nnx.to_flat_state(shardings))
  loaded = []
  for path, var in flat_abstract.items():
    mapping = mappings[path]
    ours = mapping.to_ours([index.view(n) for n in mapping.hf_names])
    sharding = flat_shardings[path].get_value()
    array = jax.make_array_from_callback(
        tuple(var.shape), sharding,
        lambda idx, ours=ours: np.ascontiguousarray(ours[idx]).astype(dtype))
    loaded.append((path, var.replace(array)))
  return graphdef, nnx.from_flat_state(loaded)


def load_target(model_dir: str, mesh, rules: ShardingRules | None = None,
                dtype: str = "float32") -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
  """config.json + safetensors of a Hugging Face model directory -> (cfg, graphdef, params)."""
  cfg = load_hf_config(model_dir, dtype=dtype)
  graphdef, params = load_params(model_dir, cfg, mesh, rules or ShardingRules())
  return cfg, graphdef, params


def hf_config_dict(cfg: ModelConfig) -> dict:
  """config.json for `cfg`, in the transformers 5 layout."""
  rope = {"rope_type": cfg.rope.rope_type, "rope_theta": cfg.rope.theta}
  if cfg.rope.rope_type == "linear":
    rope["factor"] = cfg.rope.factor
  elif cfg.rope.rope_type == "llama3":
    rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                high_freq_factor=cfg.rope.high_freq_factor,
                original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]
  out = {
      "architectures": [arch], "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings, "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": cfg.dtype,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                       else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None)),
  }
  if cfg.model_type == "llama":
    out["attention_bias"] = cfg.qkv_bias
    out["mlp_bias"] = False
  if cfg.model_type == "mistral":
    out["sliding_window"] = cfg.sliding_window
  return out


def to_hf_tensors(params: nnx.State, mappings: dict, dtype: str) -> dict[str, np.ndarray]:
  """Checkpoint tensors {hf name: host array in `dtype`} of params, through each
  parameter's TensorMapping (to_hf splits fused weights and transposes linears)."""
  np_dtype = NP_DTYPES[dtype]
  tensors = {}
  for path, var in nnx.to_flat_state(params):
    value = np.asarray(to_host(var.get_value())).astype(np.float32)
    for name, arr in zip(mappings[path].hf_names, mappings[path].to_hf(value)):
      tensors[name] = np.ascontiguousarray(arr).astype(np_dtype)
  return tensors


def save_target(model_dir: str, cfg: ModelConfig, params: nnx.State,
                save_dtype: str | None = None) -> None:
  """Writes config.json + model.safetensors that transformers (and load_target) can read."""
  os.makedirs(model_dir, exist_ok=True)
  tensors = to_hf_tensors(params, tensor_mappings(cfg), save_dtype or cfg.dtype)
  if jax.process_index() == 0:
    write_safetensors(os.path.join(model_dir, "model.safetensors"), tensors,
                      metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
      json.dump(hf_config_dict(cfg.replace(dtype=save_dtype or cfg.dtype)), f, indent=2)


def resolve_model_dir(path: str, key: str = "target.path") -> str:
  """A model given as a local directory, or as a repo id already in the local Hugging Face
  cache (never downloaded). Errors name the config key."""
  if not path:
    raise ConfigError(f"config key {key} is not set (pass --config.{key}=DIR)")
  if os.path.isdir(path):
    return path
  if path.count("/") == 1 and not path.startswith((".", "/", "~")):
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(repo_id=path, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
      pass
  raise ConfigError(f"config key {key}={path!r}: no such directory (nor a model in the "
                    f"local Hugging Face cache)")


# Chat templates for checkpoints that ship without one (config key target.chat_template).
CHAT_TEMPLATES = {
    # FastChat's "vicuna_v1.1" conversation, as Vicuna v1.1/v1.3/v1.5 were trained.
    "vicuna_v1.1": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = 'A chat between a curious "
        "user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user\\'s questions.' %}{% set turns = messages %}"
        "{% endif %}{{ bos_token }}{{ system }} {% for m in turns %}{% if m['role'] == 'user' %}"
        "USER: {{ m['content'] }} {% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
}


def load_tokenizer(model_dir: str, chat_template: str = ""):
  """The tokenizer (and chat template) saved beside the weights, without network access.

  chat_template: '' keeps the tokenizer's own; a name in CHAT_TEMPLATES, a path to a
  .jinja file, or a Jinja string replaces it."""
  from transformers import AutoTokenizer
  try:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{model_dir}: no usable tokenizer ({e})") from None
  if chat_template:
    if chat_template in CHAT_TEMPLATES:
      chat_template = CHAT_TEMPLATES[chat_template]
    elif os.path.isfile(chat_template):
      with open(chat_template) as f:
        chat_template = f.read()
    elif "{%" not in chat_template and "{{" not in chat_template:
      raise ConfigError(f"chat template {chat_template!r}: not a known name "
                        f"({', '.join(CHAT_TEMPLATES)}), a file, or a Jinja template")
    tokenizer.chat_template = chat_template
  return tokenizer
