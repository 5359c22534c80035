"""Tiny Hugging Face checkpoints written by transformers (torch), the reference for parity.

Each family is a small random model saved with `save_pretrained` (safetensors), so the
loader is tested on files it did not write itself.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 320

FAMILIES = {
    # Llama-3 / 3.1: GQA, theta 500000, llama3 rope scaling.
    "llama3": dict(cls="LlamaForCausalLM", config="LlamaConfig", num_key_value_heads=2,
                   rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}),
    # Llama-3.2 1B/3B: tied embeddings.
    "llama3_tied": dict(cls="LlamaForCausalLM", config="LlamaConfig", num_key_value_heads=2,
                        rope_theta=500000.0, tie_word_embeddings=True),
    # Llama-2 / Vicuna: MHA, theta 10000.
    "llama2": dict(cls="LlamaForCausalLM", config="LlamaConfig", num_key_value_heads=4,
                   rope_theta=10000.0),
    # Qwen2/2.5: q/k/v bias.
    "qwen2": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", num_key_value_heads=2,
                  rope_theta=1000000.0),
    # Mistral v0.1: sliding window (small here, so the tests exercise it).
    "mistral": dict(cls="MistralForCausalLM", config="MistralConfig", num_key_value_heads=2,
                    rope_theta=10000.0, sliding_window=6),
}


def make_reference_model(family: str, seed: int = 0):
  """A random float32 torch model of `family`, in eval mode."""
  spec = dict(FAMILIES[family])
  cls = getattr(transformers, spec.pop("cls"))
  config_cls = getattr(transformers, spec.pop("config"))
  torch.manual_seed(seed)
  config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=4, pad_token_id=1, **spec)
  model = cls(config).eval()
  if family == "qwen2":  # biases start at zero; make them matter
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  return model


def save_reference_model(model, out_dir: str, dtype=None, max_shard_size=None,
                         transformers4_layout: bool = False) -> str:
  """save_pretrained (safetensors). Optionally cast, shard, or rewrite config.json in the
  transformers 4 layout (rope_theta + rope_scaling instead of rope_parameters)."""
  if dtype is not None:
    model = model.to(dtype)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(out_dir, **kwargs)
  if transformers4_layout:
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type") == "default" else {
        "rope_type": rope.pop("rope_type"), **rope}
    with open(path, "w") as f:
      json.dump(cfg, f)
  return out_dir
