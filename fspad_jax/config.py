"""Target model configuration, parsed from a Hugging Face `config.json`.

Both layouts are accepted: transformers 4 (`rope_theta` + `rope_scaling`) and
transformers 5 (`rope_parameters`). Anything the model code does not implement is
refused with an error that names the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
  """A model config that fspad_jax cannot run exactly."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  theta: float = 10000.0
  rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama-family decoder. Hashable, so usable as a jit static."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 and Llama with attention_bias=true
  o_bias: bool = False  # Llama with attention_bias=true
  sliding_window: int | None = None  # Mistral v0.1
  max_position_embeddings: int = 4096
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  dtype: str = "float32"  # parameter and activation dtype: float32 | bfloat16 | float16

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ConfigError(f"dtype={self.dtype!r}: expected float32, bfloat16 or float16")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = d * self.num_heads * self.head_dim
    kv = 2 * d * self.num_kv_heads * self.head_dim
    o = self.num_heads * self.head_dim * d
    per_layer = q + kv + o + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else v * d
    return v * d + self.num_layers * per_layer + d + head


# Keys that are bookkeeping or training-only: safe to ignore for inference.
_IGNORED_KEYS = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "pretraining_tp", "_name_or_path", "tie_word_embeddings", "vocab_size",
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tokenizer_class", "prefix", "task_specific_params", "problem_type", "bad_words_ids",
    "begin_suppress_tokens", "decoder_start_token_id", "sep_token_id", "tf_legacy_loss",
    "use_bfloat16", "torchscript", "pruned_heads", "cross_attention_hidden_size",
    "finetuning_task", "num_labels", "max_sequence_length",
}


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
  """Reads rope settings from either config layout."""
  params = raw.get("rope_parameters")
  if params is None:  # transformers 4 layout
    params = dict(raw.get("rope_scaling") or {})
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
  params = dict(params)
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(
        f"{source}: unsupported rope type {rope_type!r} (supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)})")
  theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
  if rope_type == "default":
    return RopeConfig(theta=theta)
  if rope_type == "linear":
    return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
  try:
    return RopeConfig(
        theta=theta, rope_type="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))
  except KeyError as e:
    raise ConfigError(f"{source}: llama3 rope scaling lacks key {e.args[0]!r}") from None


def parse_hf_config(raw: dict[str, Any], source: str = "config.json",
                    dtype: str = "float32") -> ModelConfig:
  """Turns a Hugging Face config dict into a ModelConfig, refusing what we can't run."""
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(
        f"{source}: model_type={model_type!r} is not supported (supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)})")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in raw:
      raise ConfigError(f"{source}: required key {key!r} is missing")
  act = raw.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
  if raw.get("mlp_bias"):
    raise ConfigError(f"{source}: mlp_bias=true is not supported")
  if raw.get("quantization_config"):
    raise ConfigError(f"{source}: quantized checkpoints (quantization_config) are not supported")
  unknown = sorted(k for k in raw if k not in _IGNORED_KEYS and not k.startswith("_")
                   and k not in ("quantization_config",))
  # Unknown keys that are falsy/None do not change the math; non-trivial ones might.
  risky = [k for k in unknown if raw[k] not in (None, False, 0, "", [], {})]
  if risky:
    raise ConfigError(
        f"{source}: unsupported config attribute(s) {risky}: fspad_jax does not implement "
        f"them, and ignoring them could change the model's outputs")

  num_heads = int(raw["num_attention_heads"])
  hidden = int(raw["hidden_size"])
  head_dim = raw.get("head_dim") or hidden // num_heads
  if model_type == "qwen2":
    qkv_bias, o_bias = True, False
  else:
    qkv_bias = o_bias = bool(raw.get("attention_bias", False))

  sliding_window = None
  if model_type == "mistral" and raw.get("sliding_window"):
    sliding_window = int(raw["sliding_window"])
  if model_type == "qwen2" and raw.get("use_sliding_window"):
    raise ConfigError(f"{source}: qwen2 use_sliding_window=true is not supported")

  eos = raw.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  return ModelConfig(
      vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
      intermediate_size=int(raw["intermediate_size"]),
      num_layers=int(raw["num_hidden_layers"]), num_heads=num_heads,
      num_kv_heads=int(raw.get("num_key_value_heads") or num_heads), head_dim=int(head_dim),
      rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)), rope=_parse_rope(raw, source),
      tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias, o_bias=o_bias, sliding_window=sliding_window,
      max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
      model_type=model_type, bos_token_id=raw.get("bos_token_id"),
      eos_token_ids=tuple(int(e) for e in eos_ids), dtype=dtype)


def load_hf_config(model_dir: str, dtype: str = "float32") -> ModelConfig:
  """Reads `<model_dir>/config.json`; errors name the directory or file."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
  raw, path = read_config_json(model_dir, "model")
  return parse_hf_config(raw, source=path, dtype=dtype)


def read_config_json(directory: str, what: str) -> tuple[dict[str, Any], str]:
  """(`<directory>/config.json` parsed, its path); errors say the directory is not a `what`
  directory, or name the file with invalid JSON."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{directory!r} is not a {what} directory: it has no config.json")
  try:
    with open(path) as f:
      return json.load(f), path
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: invalid JSON ({e})") from None


def llama3_8b_config(dtype: str = "bfloat16") -> ModelConfig:
  """Meta-Llama-3-8B shapes, for benchmarks with random weights."""
  return ModelConfig(
      vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
      rope=RopeConfig(theta=500000.0), max_position_embeddings=8192,
      bos_token_id=128000, eos_token_ids=(128001, 128009), dtype=dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> "list[float]":
  """Per-pair inverse frequencies, with llama3/linear scaling as transformers computes them."""
  dim = cfg.head_dim
  inv = [1.0 / (cfg.rope.theta ** (i / dim)) for i in range(0, dim, 2)]
  r = cfg.rope
  if r.rope_type == "linear":
    return [f / r.factor for f in inv]
  if r.rope_type == "llama3":
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    out = []
    for f in inv:
      wavelen = 2 * math.pi / f
      if wavelen > low_wavelen:
        out.append(f / r.factor)
      elif wavelen < high_wavelen:
        out.append(f)
      else:
        smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
            r.high_freq_factor - r.low_freq_factor)
        out.append((1 - smooth) * f / r.factor + smooth * f)
    return out
  return inv


# ----------------------------------------------------------------------------- configs/*.py


def repo_config_path(name: str) -> str:
  """configs/<name>.py of the source checkout this package runs from."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      f"{name}.py")


def load_config_module(path: str):
  """A configs/*.py file loaded as a module, the way ml_collections' config_flags does."""
  import importlib.util
  name = "fspad_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_repo_config(name: str, arg: str | None = None):
  """get_config([arg]) of configs/<name>.py in the source checkout (`name.py:arg`)."""
  module = load_config_module(repo_config_path(name))
  return module.get_config(arg) if arg is not None else module.get_config()
