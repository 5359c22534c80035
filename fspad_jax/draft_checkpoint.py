"""Draft checkpoints <-> the PyTorch ecosystem: EAGLE-1/2 heads and the official FSPAD code.

A draft directory holds `config.json` (a LlamaConfig-like dict) and the weights as
`model.safetensors` (or sharded with `model.safetensors.index.json`) or `pytorch_model.bin`
(or `pytorch_model.bin.index.json`). Pickle-based `.bin` files are read only through
`torch.load(path, map_location="cpu", weights_only=True)`, which refuses anything but tensors
and plain containers; without torch they are refused. Loading never executes code.

State-dict names (torch Linear weights are [out, in]; d = hidden, f = intermediate):
  plain fc ('eagle', 'pad_only'; EAGLE `cnets.py`, FSPAD `cnets_fspad_wofs.py`):
    fc.weight [d, 2d] (input cat(embedding, feature)), fc.bias [d] (config "bias", default on)
  FS block ('fspad', 'fs_only'; FSPAD `cnets_fspad.py`, `cnets_mlplin.py`: module `Efc` as `fc`):
    fc.fc.weight [d, 2d], fc.fc.bias [d]          h = W_fc [e; f] + b
    fc.post_attention_layernorm.weight [d]        RMSNorm(h)
    fc.mlp.gate_proj.weight [f, d]                reads the embedding e
    fc.mlp.up_proj.weight [f, d]                  reads RMSNorm(h)
    fc.mlp.down_proj.weight [d, f]
  decoder layer (all kinds; no input_layernorm):
    layers.0.self_attn.{q,k,v,o}_proj.weight, layers.0.post_attention_layernorm.weight,
    layers.0.self_attn.{q,k,v}_proj.bias when present (EAGLE's cnets1.py with
      config "qkv_bias": true, e.g. heads for Qwen2 targets),
    layers.0.mlp.{gate,up}_proj.weight [f, d],
    layers.0.mlp.down_proj.weight [d, f], or [2d, f] with PAD ('fspad', 'pad_only'):
      rows [:d] give `predict` (LM head), rows [d:] give `regress` (fed back).
  ignored, with a log line: embed_tokens.weight (the target's embedding is used) and
  *.rotary_emb.inv_freq.
These FSPAD names were read from Luc4Gui/FSPAD (commit 1c2df5e2d14afd3041540e6aeae4b0047c13b6a1),
eagle/model/cnets_fspad.py (FS + PAD), cnets_fspad_wofs.py (PAD only) and cnets_mlplin.py
(FS only); that code loads them with `load_state_dict(strict=True)` from `pytorch_model.bin`.

config.json: hidden_size, num_attention_heads, num_key_value_heads, intermediate_size,
rms_norm_eps, rope_theta/rope_scaling (or rope_parameters), vocab_size, num_hidden_layers
(must be 1), "bias" (EAGLE's fc-bias flag), "qkv_bias". Biases follow the tensors present (a
flag that says false loses to a bias tensor: the official FSPAD code always builds the fc
bias); a flag that says true with its tensor absent is a missing tensor. Exports add
"draft_kind" (one of DRAFT_KINDS); official checkpoints have no such key, so the kind is
inferred from the tensors (`fc.fc.*` present: FS; down_proj with 2d rows: PAD).

RoPE of official-layout heads (no "draft_kind"): with linear `rope_scaling`, the official
EAGLE/FSPAD code builds its LlamaLinearScalingRotaryEmbedding without passing rope_theta, so
it rotates with base 10000 whatever rope_theta says; those heads are imported with base
10000 too (`official_rope`). Heads this project exported carry "draft_kind" and keep
rope_theta (how they were trained); the official code would run such a head (linear
scaling, rope_theta != 10000) with base 10000, so export warns about it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from fspad_jax.config import ConfigError, ModelConfig, _parse_rope, read_config_json
from fspad_jax.draft import DRAFT_KINDS, EAGLE_LAYOUT_KINDS, DraftConfig, abstract_draft
from fspad_jax.hot_vocab import validate_hot_ids
from fspad_jax.hf_checkpoint import (NP_DTYPES, CheckpointError, TensorMapping, _LazyStack,
                                     _identity_reshape, _linear, _stacked_linear,
                                     param_shardings, to_hf_tensors)
from fspad_jax.safetensors_io import TensorIndex, write_safetensors
from fspad_jax.sharding import ShardingRules, to_host

logger = logging.getLogger(__name__)

LAYER_PREFIX = "layers.0."
EMBEDDING_NAME = "embed_tokens.weight"
# EAGLE-3's hot-vocabulary maps: target id = draft id + d2t[draft id]; t2d[target id] is true
# for the target ids the draft covers. A draft that has them proposes only those tokens.
D2T_NAME, T2D_NAME = "d2t", "t2d"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class DraftCheckpointError(CheckpointError):
  """A draft directory that cannot be loaded exactly."""


# ---------------------------------------------------------------------------------------------
# Name mapping


def _fc_mapping(names: tuple[str, ...], d: int) -> TensorMapping:
  """fc weight [d, 2d] (in = cat(e, f)) <-> our kernel [2, d, d]."""
  return TensorMapping(names, lambda v: v[0].T.reshape(2, d, d),
                       lambda x: [x.reshape(2 * d, d).T])


def draft_tensor_mappings(cfg: DraftConfig) -> dict[tuple, TensorMapping]:
  """Our parameter path -> TensorMapping (torch state-dict names), for `Draft(cfg)`."""
  d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f = cfg.intermediate_size
  same = ((lambda v: v[0]), (lambda x: [x]))
  fc = "fc.fc." if cfg.feature_sampling else "fc."
  m = {("fc", "kernel"): _fc_mapping((fc + "weight",), d)}
  if cfg.fc_bias:
    m[("fc", "bias")] = TensorMapping((fc + "bias",), *same)
  if cfg.feature_sampling:
    fs = ("feature_sampling",)
    m[fs + ("norm", "weight")] = TensorMapping(("fc.post_attention_layernorm.weight",), *same)
    m[fs + ("gate_up_kernel",)] = TensorMapping(
        ("fc.mlp.gate_proj.weight", "fc.mlp.up_proj.weight"),
        lambda v: _LazyStack([w.T for w in v], axis=0), lambda x: [x[0].T, x[1].T])  # [2, d, f]
    m[fs + ("down_kernel",)] = TensorMapping(("fc.mlp.down_proj.weight",), *_linear((d,)))
  p, a, L = LAYER_PREFIX, LAYER_PREFIX + "self_attn.", ("layer",)
  m[L + ("attn", "q_kernel")] = TensorMapping((a + "q_proj.weight",), *_linear((h, hd)))
  m[L + ("attn", "kv_kernel")] = TensorMapping(
      (a + "k_proj.weight", a + "v_proj.weight"), *_stacked_linear((kvh, hd)))
  m[L + ("attn", "o_kernel")] = TensorMapping(
      (a + "o_proj.weight",), lambda v: v[0].T.reshape(h, hd, d),
      lambda x: [x.reshape(h * hd, d).T])
  if cfg.qkv_bias:  # q_proj.bias [h*hd] <-> [h, hd]; k/v_proj.bias [kvh*hd] <-> [2, kvh, hd]
    m[L + ("attn", "q_bias")] = TensorMapping((a + "q_proj.bias",), *_identity_reshape((h, hd)))
    m[L + ("attn", "kv_bias")] = TensorMapping(
        (a + "k_proj.bias", a + "v_proj.bias"),
        lambda v: _LazyStack([x.reshape(kvh, hd) for x in v], axis=0),
        lambda x: [x[0].reshape(-1), x[1].reshape(-1)])
  m[L + ("post_attn_norm", "weight")] = TensorMapping(
      (p + "post_attention_layernorm.weight",), *same)
  m[L + ("mlp", "gate_up_kernel")] = TensorMapping(
      (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), *_stacked_linear((f,)))
  d_out = 2 * d if cfg.partial_alignment else d
  m[L + ("mlp", "down_kernel")] = TensorMapping((p + "mlp.down_proj.weight",),
                                                *_linear((d_out,)))
  return m


# ---------------------------------------------------------------------------------------------
# Reading tensors


class _ArrayDict:
  """In-memory tensors with TensorIndex's reading interface."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays

  def names(self) -> list[str]:
    return list(self._arrays)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._arrays[name].shape)

  def view(self, name: str) -> np.ndarray:
    return self._arrays[name]


def _torch_to_numpy(name: str, tensor, path: str) -> np.ndarray:
  import torch
  if not isinstance(tensor, torch.Tensor):
    raise DraftCheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, "
                               f"not a tensor")
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return tensor.view(torch.int16).numpy().view(NP_DTYPES["bfloat16"])
  return tensor.numpy()


def load_pickled_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.bin` state dict via `torch.load(weights_only=True)` only; never plain pickle."""
  try:
    import torch
  except ImportError:
    raise DraftCheckpointError(
        f"{path}: this is a pickle-based PyTorch checkpoint; fspad_jax reads those only with "
        f"torch.load(weights_only=True), and torch is not installed. Install torch or "
        f"convert the file to model.safetensors.") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError for forbidden globals, RuntimeError, ...
    raise DraftCheckpointError(
        f"{path}: refused: torch.load(weights_only=True) could not read it safely (the file "
        f"holds something other than tensors, which unpickling could execute): "
        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  if not isinstance(state, Mapping):
    raise DraftCheckpointError(f"{path}: expected a state dict (name -> tensor), got a "
                               f"{type(state).__name__}")
  return {str(k): _torch_to_numpy(str(k), v, path) for k, v in state.items()}


def read_draft_tensors(draft_dir: str):
  """All tensors of a draft directory: an object with names(), shape(name), view(name)."""
  if not os.path.isdir(draft_dir):
    raise FileNotFoundError(f"draft directory {draft_dir!r} does not exist")
  if any(os.path.isfile(os.path.join(draft_dir, n))
         for n in ("model.safetensors", "model.safetensors.index.json")):
    return TensorIndex(draft_dir)
  single = os.path.join(draft_dir, "pytorch_model.bin")
  index_path = os.path.join(draft_dir, "pytorch_model.bin.index.json")
  if os.path.isfile(single):
    return _ArrayDict(load_pickled_state_dict(single))
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise DraftCheckpointError(f"{index_path}: no 'weight_map' object")
    arrays: dict[str, np.ndarray] = {}
    for fname in sorted(set(weight_map.values())):
      arrays.update(load_pickled_state_dict(os.path.join(draft_dir, fname)))
    return _ArrayDict(arrays)
  raise DraftCheckpointError(
      f"{draft_dir!r} has no model.safetensors, model.safetensors.index.json, "
      f"pytorch_model.bin or pytorch_model.bin.index.json (it has: "
      f"{', '.join(sorted(os.listdir(draft_dir))) or 'nothing'})")


# ---------------------------------------------------------------------------------------------
# Config


def infer_draft_kind(tensors, hidden_size: int) -> str:
  """The kind from the tensor names: `fc.fc.*` means FS; a [2d, f] down_proj means PAD."""
  names = set(tensors.names())
  fs = "fc.fc.weight" in names
  down = LAYER_PREFIX + "mlp.down_proj.weight"
  pad = down in names and tensors.shape(down)[0] == 2 * hidden_size
  return {(False, False): "eagle", (True, True): "fspad", (True, False): "fs_only",
          (False, True): "pad_only"}[(fs, pad)]


def official_rope(raw: dict[str, Any], source: str):
  """The rotary embedding that EAGLE's and FSPAD's own draft code builds from config.json.

  For linear `rope_scaling` that code (cnets.py / cnets1.py: LlamaLinearScalingRotaryEmbedding)
  passes no base, so it rotates with base 10000 whatever `rope_theta` says; the heads were
  trained (and run) that way, so an imported head of the official layout gets base 10000.
  Without scaling it uses `rope_theta`, as we do."""
  rope = _parse_rope(raw, source)
  if rope.rope_type == "linear" and rope.theta != 10000.0:
    logger.info("%s: linear rope_scaling with rope_theta=%s: using base 10000, as the official "
                "EAGLE/FSPAD draft code does for linear scaling", source, rope.theta)
    rope = dataclasses.replace(rope, theta=10000.0)
  return rope


def parse_draft_config(raw: dict[str, Any], kind: str, source: str = "config.json",
                       dtype: str = "float32", fc_bias: bool | None = None,
                       qkv_bias: bool | None = None) -> DraftConfig:
  """A draft config.json dict -> DraftConfig, refusing what the draft code does not run.

  fc_bias / qkv_bias: whether the weights hold the fc bias / q,k,v biases (None: unknown,
  then config.json's "bias" (default true) / "qkv_bias" (default false) decide). The
  tensors present win over a flag that says false (the official FSPAD code always builds
  the fc bias and ignores "bias"); a flag that says true with the tensor absent leaves it
  expected, so loading reports it missing. A config without "draft_kind" (the official
  layout) gets the official code's rotary embedding (official_rope)."""
  for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
    if key not in raw:
      raise ConfigError(f"{source}: required key {key!r} is missing")
  layers = int(raw.get("num_hidden_layers", 1))
  if layers != 1:
    raise ConfigError(f"{source}: num_hidden_layers={layers}: EAGLE/FSPAD drafts have exactly "
                      f"one decoder layer")
  act = raw.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
  for key in ("attention_bias", "mlp_bias"):
    if raw.get(key):
      raise ConfigError(f"{source}: {key}=true is not supported in a draft layer")
  hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
  bias_flag = raw.get("bias")
  if fc_bias is None:
    fc_bias = True if bias_flag is None else bool(bias_flag)
  elif fc_bias and bias_flag is not None and not bias_flag:
    logger.info("%s: \"bias\": false, but the weights hold the fc bias: using it, as the "
                "official FSPAD code does", source)
  else:
    fc_bias = fc_bias or bool(bias_flag)
  qkv_flag = bool(raw.get("qkv_bias", False))
  qkv_bias = qkv_flag if qkv_bias is None else (qkv_bias or qkv_flag)
  rope = _parse_rope(raw, source) if "draft_kind" in raw else official_rope(raw, source)
  return DraftConfig(
      kind=kind, hidden_size=hidden, num_heads=heads,
      num_kv_heads=int(raw.get("num_key_value_heads") or heads),
      head_dim=int(raw.get("head_dim") or hidden // heads),
      intermediate_size=int(raw["intermediate_size"]),
      rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope=rope,
      dtype=dtype, fc_bias=fc_bias, qkv_bias=qkv_bias,
      vocab_size=int(raw.get("vocab_size") or 0),
      max_position_embeddings=int(raw.get("max_position_embeddings", 2048)))


def draft_config_dict(cfg: DraftConfig) -> dict:
  """config.json for a draft: LlamaConfig keys in the transformers 4 layout (which EAGLE's
  and FSPAD's code read), plus "bias" and "draft_kind"."""
  r = cfg.rope
  if r.rope_type == "linear" and r.theta != 10000.0:
    logger.warning("draft export: linear rope scaling with rope_theta=%s; the official EAGLE/"
                   "FSPAD code runs linear scaling with base 10000, so it would not reproduce "
                   "this draft (fspad_jax loads it as trained)", r.theta)
  scaling = None
  if r.rope_type == "linear":
    scaling = {"type": "linear", "rope_type": "linear", "factor": r.factor}
  elif r.rope_type == "llama3":
    scaling = {"type": "llama3", "rope_type": "llama3", "factor": r.factor,
               "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
               "original_max_position_embeddings": r.original_max_position_embeddings}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "draft_kind": cfg.kind,
      "bias": cfg.fc_bias, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": r.theta, "rope_scaling": scaling,
      "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
      "torch_dtype": cfg.dtype,
      **({"qkv_bias": True} if cfg.qkv_bias else {}),
      **({"draft_vocab_size": cfg.hot_vocab_size} if cfg.hot_vocab_size else {}),
  }


# ---------------------------------------------------------------------------------------------
# Loading and saving


def _check_names(tensors, mappings: dict, draft_dir: str, kind: str) -> None:
  expected = {n for mp in mappings.values() for n in mp.hf_names}
  present = set(tensors.names()) - {D2T_NAME, T2D_NAME}
  if EMBEDDING_NAME in present:
    logger.info("%s: ignoring %s %s: the draft uses the target's token embedding", draft_dir,
                EMBEDDING_NAME, tensors.shape(EMBEDDING_NAME))
  missing = sorted(expected - present)
  unexpected = sorted(n for n in present - expected
                      if n != EMBEDDING_NAME and not n.endswith(_IGNORED_SUFFIXES))
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
  if any(n.startswith("midlayer.") for n in unexpected):
    problems.append("(midlayer.* tensors are EAGLE-3's layout, which is not supported)")
  if problems:
    raise DraftCheckpointError(
        f"{draft_dir}: weights do not match a {kind!r} draft: " + "; ".join(problems))


def load_draft(draft_dir: str, target_cfg: ModelConfig | None = None, *, kind: str | None = None,
               dtype: str | None = None, mesh=None, rules: ShardingRules | None = None
               ) -> tuple[DraftConfig, nnx.GraphDef, nnx.State]:
  """Loads a draft directory (EAGLE, FSPAD or fspad_jax layout). Returns (cfg, graphdef, params).

  kind: forces the draft kind (default: config.json's "draft_kind", else inferred from the
  tensor names). target_cfg: checked for a matching hidden and vocabulary size; its dtype is
  the default `dtype` (else float32). mesh/rules: place params sharded by their logical axes
  (default: the default device).
  """
  raw, path = read_config_json(draft_dir, "draft")
  tensors = read_draft_tensors(draft_dir)
  if kind is None:
    kind = raw.get("draft_kind") or infer_draft_kind(tensors, int(raw.get("hidden_size", 0)))
    if "draft_kind" not in raw:
      logger.info("%s: no draft_kind in config.json; inferred %r from the tensor names",
                  draft_dir, kind)
  if kind not in DRAFT_KINDS:
    raise ConfigError(f"{path}: draft_kind={kind!r}: expected one of {DRAFT_KINDS}")
  fc_bias_name = "fc.fc.bias" if kind in ("fspad", "fs_only") else "fc.bias"
  names = set(tensors.names())
  dtype = dtype or (target_cfg.dtype if target_cfg is not None else "float32")
  cfg = parse_draft_config(
      raw, kind, source=path, dtype=dtype, fc_bias=fc_bias_name in names,
      qkv_bias=any(LAYER_PREFIX + f"self_attn.{x}_proj.bias" in names for x in "qkv"))
  if target_cfg is not None:
    check_fits_target(cfg, target_cfg, path)
    if not cfg.vocab_size:
      cfg = cfg.replace(vocab_size=target_cfg.vocab_size)

  hot = read_hot_ids(draft_dir, tensors, target_cfg.vocab_size if target_cfg else None)
  declared = raw.get("draft_vocab_size")
  if declared is not None and (hot is None or int(declared) != hot.size):
    raise DraftCheckpointError(f"{path}: draft_vocab_size={declared}, but the weights have "
                               f"{'no d2t map' if hot is None else f'a d2t map of {hot.size} ids'}")
  if hot is not None:
    cfg = cfg.replace(hot_vocab_size=int(hot.size))
  mappings = draft_tensor_mappings(cfg)
  _check_names(tensors, mappings, draft_dir, kind)
  graphdef, state = place_mapped_params(cfg, mappings, tensors, draft_dir, mesh, rules)
  return cfg, graphdef, state


def check_fits_target(cfg: DraftConfig, target_cfg, path: str) -> None:
  """A draft config read from `path` must have the target's hidden size and (when it says)
  vocabulary: one DraftCheckpointError line otherwise."""
  if cfg.hidden_size != target_cfg.hidden_size:
    raise DraftCheckpointError(f"{path}: hidden_size={cfg.hidden_size}, but the target's is "
                               f"{target_cfg.hidden_size}")
  if cfg.vocab_size and cfg.vocab_size != target_cfg.vocab_size:
    raise DraftCheckpointError(f"{path}: vocab_size={cfg.vocab_size}, but the target's is "
                               f"{target_cfg.vocab_size}: this draft belongs to another model")


def place_mapped_params(cfg: DraftConfig, mappings: dict, tensors, draft_dir: str, mesh=None,
                        rules: ShardingRules | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """The draft's params read from `tensors` through `mappings` (our param path -> its torch
  tensors and transforms), each shape checked first (one line naming the tensor), in
  cfg.dtype, sharded over `mesh` when given (each device reads only its slice)."""
  graphdef, abstract_state = nnx.split(abstract_draft(cfg))
  np_dtype = NP_DTYPES[cfg.dtype]
  flat_shardings = None
  if mesh is not None:
    flat_shardings = dict(nnx.to_flat_state(
        param_shardings(abstract_state, mesh, rules or ShardingRules())))
  loaded = []
  for p, var in nnx.to_flat_state(abstract_state):
    mapping = mappings[p]
    # Expected torch shapes, from a zero-strided stand-in of our param (no memory).
    stand_in = np.broadcast_to(np.zeros((), np.int8), tuple(var.shape))
    for name, want in zip(mapping.hf_names, mapping.to_hf(stand_in)):
      if tensors.shape(name) != tuple(want.shape):
        raise DraftCheckpointError(
            f"{draft_dir}: tensor {name!r} has shape {list(tensors.shape(name))}, but "
            f"config.json implies {list(want.shape)} for a {cfg.kind!r} draft")
    ours = mapping.to_ours([tensors.view(n) for n in mapping.hf_names])
    if flat_shardings is None:
      array = jax.device_put(np.asarray(ours[(slice(None),) * len(var.shape)]).astype(np_dtype))
    else:
      array = jax.make_array_from_callback(
          tuple(var.shape), flat_shardings[p].get_value(),
          lambda idx, ours=ours: np.ascontiguousarray(ours[idx]).astype(np_dtype))
    loaded.append((p, var.replace(array)))
  return graphdef, nnx.from_flat_state(loaded)


def read_hot_ids(draft_dir: str, tensors=None, vocab_size: int | None = None
                 ) -> np.ndarray | None:
  """The draft directory's hot vocabulary from EAGLE-3's `d2t` (and `t2d`, checked against it
  when present), or None when it has none. Refuses maps that do not fit the target."""
  tensors = tensors if tensors is not None else read_draft_tensors(draft_dir)
  names = set(tensors.names())
  if D2T_NAME not in names:
    if T2D_NAME in names:
      raise DraftCheckpointError(f"{draft_dir}: tensor {T2D_NAME!r} without {D2T_NAME!r}")
    return None
  d2t = np.asarray(tensors.view(D2T_NAME))
  if d2t.ndim != 1 or not np.issubdtype(d2t.dtype, np.integer):
    raise DraftCheckpointError(f"{draft_dir}: tensor {D2T_NAME!r} must be 1-D integers, got "
                               f"{d2t.dtype} {list(d2t.shape)}")
  ids = np.arange(d2t.size) + d2t.astype(np.int64)
  try:
    ids = validate_hot_ids(ids, vocab_size or int(ids.max()) + 1, f"{draft_dir}: tensor 'd2t'")
  except ConfigError as e:
    raise DraftCheckpointError(str(e)) from None
  if T2D_NAME in names:
    t2d = np.asarray(tensors.view(T2D_NAME)).astype(bool)
    if t2d.ndim != 1 or (vocab_size and t2d.size != vocab_size) or not np.array_equal(
        np.flatnonzero(t2d), np.sort(ids)):
      raise DraftCheckpointError(f"{draft_dir}: tensor {T2D_NAME!r} does not mark the ids that "
                                 f"{D2T_NAME!r} maps to")
  return ids


def save_draft(draft_dir: str, cfg: DraftConfig, params: nnx.State,
               save_dtype: str | None = None, embedding: np.ndarray | None = None,
               hot_ids: np.ndarray | None = None) -> None:
  """Writes config.json + model.safetensors in the EAGLE/FSPAD layout (module docstring).

  'eagle' drafts load in engines that serve EAGLE-1/2 heads; the other kinds carry the
  official FSPAD names and `"draft_kind"`. `embedding` ([vocab, embed], the target's table)
  is written as `embed_tokens.weight` for loaders that require it (EAGLE's and FSPAD's own
  code load with strict=True); fspad_jax ignores it on loading. `hot_ids` (a hot vocabulary,
  fspad_jax.hot_vocab) are written as EAGLE-3's `d2t` offsets and `t2d` mask.
  """
  if cfg.kind not in EAGLE_LAYOUT_KINDS or cfg.num_features > 1:
    raise ConfigError(f"a {cfg.kind!r} draft of {cfg.num_features} feature layer(s) has no "
                      "EAGLE-1/2 / FSPAD layout (eagle3: eagle3_checkpoint.save_eagle3_draft)")
  os.makedirs(draft_dir, exist_ok=True)
  np_dtype = NP_DTYPES[save_dtype or cfg.dtype]
  tensors = to_hf_tensors(params, draft_tensor_mappings(cfg), save_dtype or cfg.dtype)
  if embedding is not None:
    embedding = np.asarray(to_host(embedding) if isinstance(embedding, jax.Array) else embedding)
    if embedding.ndim != 2 or embedding.shape[1] != cfg.hidden_size:
      raise DraftCheckpointError(f"embedding has shape {embedding.shape}; expected "
                                 f"[vocab, {cfg.hidden_size}]")
    tensors[EMBEDDING_NAME] = np.ascontiguousarray(embedding.astype(np.float32).astype(np_dtype))
  if hot_ids is not None:
    ids = validate_hot_ids(hot_ids, cfg.vocab_size or int(np.max(hot_ids)) + 1, "hot_ids")
    tensors[D2T_NAME] = (ids - np.arange(ids.size)).astype(np.int64)
    if cfg.vocab_size:
      tensors[T2D_NAME] = np.isin(np.arange(cfg.vocab_size), ids)
    cfg = cfg.replace(hot_vocab_size=int(ids.size))
  if jax.process_index() == 0:
    write_safetensors(os.path.join(draft_dir, "model.safetensors"), tensors,
                      metadata={"format": "pt"})
    out_cfg = cfg.replace(dtype=save_dtype or cfg.dtype)
    if embedding is not None and not out_cfg.vocab_size:
      out_cfg = out_cfg.replace(vocab_size=int(embedding.shape[0]))
    with open(os.path.join(draft_dir, "config.json"), "w") as f:
      json.dump(draft_config_dict(out_cfg), f, indent=2)
