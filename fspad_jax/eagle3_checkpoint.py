"""EAGLE-3 draft heads <-> fspad_jax 'eagle3' drafts (import of published heads, export).

Layout, as SafeAILab/EAGLE's eagle/model/cnets.py (`Model`, `LlamaDecoderLayeremb`) builds it
and its published heads (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B) store it; torch Linear
weights are [out, in]; d = hidden, f = intermediate, k = target layers fused (3), N = draft
vocabulary, V = the target's:
  fc.weight [d, k*d]                          fused feature = W [h_low; h_mid; h_high], no bias
  midlayer.input_layernorm.weight [d]          RMSNorm of the token embedding
  midlayer.hidden_norm.weight [d]              RMSNorm of the fused (or fed-back) feature
  midlayer.self_attn.{q,k,v}_proj.weight [*, 2d]   attention reads [norm(e); norm(f)]
  midlayer.self_attn.o_proj.weight [d, heads*head_dim]
  midlayer.post_attention_layernorm.weight [d], midlayer.mlp.{gate,up}_proj [f, d],
  midlayer.mlp.down_proj [d, f]
  norm.weight [d]                              before the head
  lm_head.weight [N, d]                        the draft's own LM head
  d2t [N] int64 (target id = draft id + d2t[id]), t2d [V] bool (ids the draft covers)
  embed_tokens.weight [V, d]: optional, ignored (the target's embedding is used).
config.json: a LlamaConfig with num_hidden_layers 1 and "draft_vocab_size"; exports add
"architectures": ["LlamaForCausalLMEagle3"] (SGLang's and vLLM's name for this head),
"draft_kind": "eagle3" and vLLM's "eagle_aux_hidden_state_layer_ids" (the target layers, in
Transformer.features_and_taps indexing = vLLM's: the input of decoder layer i). A published
head without that key reads EAGLE-3's default layers for the target (draft.eagle3_feature_layers).

Every refusal is one line naming the file and the tensor (or key).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from fspad_jax.config import ConfigError, ModelConfig, read_config_json
from fspad_jax.draft import DraftConfig, check_feature_layers, eagle3_feature_layers
from fspad_jax.draft_checkpoint import (D2T_NAME, EMBEDDING_NAME, T2D_NAME, DraftCheckpointError,
                                        check_fits_target, draft_config_dict, parse_draft_config,
                                        place_mapped_params, read_draft_tensors, read_hot_ids)
from fspad_jax.hf_checkpoint import TensorMapping, _linear, _stacked_linear, to_hf_tensors
from fspad_jax.model import resolve_feature_layers
from fspad_jax.safetensors_io import write_safetensors
from fspad_jax.sharding import ShardingRules

ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYER_IDS_KEY = "eagle_aux_hidden_state_layer_ids"
MID = "midlayer."
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def eagle3_tensor_mappings(cfg: DraftConfig) -> dict[tuple, TensorMapping]:
  """Our 'eagle3' parameter path -> TensorMapping (EAGLE-3 state-dict names)."""
  d, h, kvh, hd, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, \
      cfg.num_features
  f = cfg.intermediate_size
  same = ((lambda v: v[0]), (lambda x: [x]))
  a, L = MID + "self_attn.", ("layer",)
  m = {
      L + ("input_norm", "weight"): TensorMapping((MID + "input_layernorm.weight",), *same),
      L + ("hidden_norm", "weight"): TensorMapping((MID + "hidden_norm.weight",), *same),
      L + ("attn", "q_kernel"): TensorMapping((a + "q_proj.weight",), *_linear((h, hd))),
      L + ("attn", "kv_kernel"): TensorMapping((a + "k_proj.weight", a + "v_proj.weight"),
                                               *_stacked_linear((kvh, hd))),
      L + ("attn", "o_kernel"): TensorMapping(
          (a + "o_proj.weight",), lambda v: v[0].T.reshape(h, hd, d),
          lambda x: [x.reshape(h * hd, d).T]),
      L + ("post_attn_norm", "weight"): TensorMapping(
          (MID + "post_attention_layernorm.weight",), *same),
      L + ("mlp", "gate_up_kernel"): TensorMapping(
          (MID + "mlp.gate_proj.weight", MID + "mlp.up_proj.weight"), *_stacked_linear((f,))),
      L + ("mlp", "down_kernel"): TensorMapping((MID + "mlp.down_proj.weight",),
                                                *_linear((d,))),
      L + ("final_norm", "weight"): TensorMapping(("norm.weight",), *same),
      ("lm_head",): TensorMapping(("lm_head.weight",), lambda v: v[0].T, lambda x: [x.T]),
  }
  if k > 1:  # fc.weight [d, k*d] <-> kernel [k, d, d]
    m[("feature_fc", "kernel")] = TensorMapping(
        ("fc.weight",), lambda v: v[0].T.reshape(k, d, d), lambda x: [x.reshape(k * d, d).T])
  return m


def is_eagle3_dir(path: str) -> bool:
  """An EAGLE-3 head: config.json says so, or (published heads say nothing) the tensors have
  EAGLE-3's `midlayer.*` names."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    return False
  with open(cfg_path) as f:
    try:
      raw = json.load(f)
    except ValueError:
      return False
  if raw.get("draft_kind") is not None:
    return raw["draft_kind"] == "eagle3"
  if any("Eagle3" in str(a) for a in raw.get("architectures") or ()):
    return True
  try:
    return any(n.startswith(MID) for n in read_draft_tensors(path).names())
  except (DraftCheckpointError, OSError):
    return False


def load_eagle3_draft(draft_dir: str, target_cfg: ModelConfig, *, dtype: str | None = None,
                      mesh=None, rules: ShardingRules | None = None
                      ) -> tuple[DraftConfig, nnx.GraphDef, nnx.State]:
  """Loads an EAGLE-3 head as an 'eagle3' draft for `target_cfg`. Returns (cfg, graphdef,
  params); its hot ids are draft_checkpoint.read_hot_ids(draft_dir) (d2t)."""
  raw, path = read_config_json(draft_dir, "draft")
  tensors = read_draft_tensors(draft_dir)
  names = set(tensors.names())
  dtype = dtype or target_cfg.dtype
  cfg = parse_draft_config(raw, "eagle3", source=path, dtype=dtype, fc_bias=False)
  check_fits_target(cfg, target_cfg, path)
  d = cfg.hidden_size
  # Feature layers: the config's, else EAGLE-3's default for this target; fc.weight says k.
  layers = raw.get(LAYER_IDS_KEY)
  layers = tuple(int(i) for i in layers) if layers else eagle3_feature_layers(
      target_cfg.num_layers)
  k = tensors.shape("fc.weight")[1] // d if "fc.weight" in names else 1
  if k != len(layers):
    raise DraftCheckpointError(
        f"{draft_dir}: tensor 'fc.weight' {'absent' if k == 1 else tensors.shape('fc.weight')} "
        f"fuses {k} target layers, but the feature layers are {list(layers)}"
        f"{'' if raw.get(LAYER_IDS_KEY) else ' (EAGLE-3 default)'}")
  hot = read_hot_ids(draft_dir, tensors, target_cfg.vocab_size)
  if hot is not None and np.array_equal(hot, np.arange(target_cfg.vocab_size)):
    hot = None  # a full-vocabulary head: no hot map needed
  cfg = cfg.replace(vocab_size=target_cfg.vocab_size, feature_layers=layers,
                    hot_vocab_size=0 if hot is None else int(hot.size))
  declared = raw.get("draft_vocab_size")
  if declared is not None and int(declared) != cfg.head_vocab_size:
    raise DraftCheckpointError(f"{path}: draft_vocab_size={declared}, but tensor 'd2t' "
                               f"{'is absent' if hot is None else f'maps {hot.size} ids'}")
  try:
    check_feature_layers(cfg, target_cfg)
  except ConfigError as e:
    raise DraftCheckpointError(f"{path}: {LAYER_IDS_KEY}: {e}") from None
  mappings = eagle3_tensor_mappings(cfg)
  expected = {n for mp in mappings.values() for n in mp.hf_names}
  present = names - {D2T_NAME, T2D_NAME, EMBEDDING_NAME}
  missing = sorted(expected - present)
  unexpected = sorted(n for n in present - expected if not n.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    raise DraftCheckpointError(
        f"{draft_dir}: weights do not match an EAGLE-3 head: "
        + "; ".join(p for p in (f"missing tensor(s) {', '.join(missing)}" if missing else "",
                                f"unexpected tensor(s) {', '.join(unexpected)}" if unexpected
                                else "") if p))
  graphdef, state = place_mapped_params(cfg, mappings, tensors, draft_dir, mesh, rules)
  return cfg, graphdef, state


def save_eagle3_draft(draft_dir: str, cfg: DraftConfig, params: nnx.State, *,
                      target_num_layers: int, hot_ids: np.ndarray | None = None,
                      save_dtype: str | None = None) -> None:
  """Writes an 'eagle3' draft as an EAGLE-3 head (config.json + model.safetensors with d2t and
  t2d), for SGLang, vLLM or EAGLE's own code. hot_ids: its hot vocabulary (ascending, the
  order of its LM head's rows; None = the full vocabulary)."""
  if cfg.kind != "eagle3":
    raise ConfigError(f"only 'eagle3' drafts export in the EAGLE-3 layout, not {cfg.kind!r} "
                      "(draft_checkpoint.save_draft writes the EAGLE-1/2 and FSPAD layouts)")
  if not cfg.vocab_size:
    raise ConfigError("an EAGLE-3 export needs the draft config's vocab_size (the target's)")
  ids = np.arange(cfg.vocab_size) if hot_ids is None else np.asarray(hot_ids, np.int64)
  if ids.size != cfg.head_vocab_size or np.any(np.diff(ids) <= 0):
    raise ConfigError(f"hot_ids: {ids.size} ascending ids expected for a "
                      f"{cfg.head_vocab_size}-row LM head")
  dtype = save_dtype or cfg.dtype
  tensors = to_hf_tensors(params, eagle3_tensor_mappings(cfg), dtype)
  tensors[D2T_NAME] = (ids - np.arange(ids.size)).astype(np.int64)
  tensors[T2D_NAME] = np.isin(np.arange(cfg.vocab_size), ids)
  layers = resolve_feature_layers(cfg.feature_layers, target_num_layers)
  out = draft_config_dict(cfg.replace(dtype=dtype, hot_vocab_size=0))
  out.pop("bias", None)
  out.update({"architectures": [ARCHITECTURE], "draft_kind": "eagle3",
              "draft_vocab_size": int(ids.size), LAYER_IDS_KEY: list(layers)})
  if jax.process_index() == 0:
    os.makedirs(draft_dir, exist_ok=True)
    write_safetensors(os.path.join(draft_dir, "model.safetensors"), tensors,
                      metadata={"format": "pt"})
    with open(os.path.join(draft_dir, "config.json"), "w") as f:
      json.dump(out, f, indent=2)
