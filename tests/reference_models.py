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


# ----------------------------------------------------------------------------- EAGLE-3 head


class Eagle3Reference(torch.nn.Module):
  """EAGLE-3's draft head in plain torch, written from SafeAILab/EAGLE eagle/model/cnets.py
  (`Model` + `LlamaDecoderLayeremb`): fc over the k concatenated target layers (no bias),
  attention over [input_layernorm(e); hidden_norm(f)] (2d) with residual f, post-attention
  norm + SiLU MLP, then norm -> lm_head over the draft vocabulary; d2t / t2d buffers.
  Parameter names are the published state-dict names. Default RoPE (theta) only."""

  def __init__(self, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int,
               draft_vocab: int, k: int = 3, theta: float = 10000.0, eps: float = 1e-5):
    super().__init__()
    nn = torch.nn
    self.hidden, self.heads, self.kv_heads, self.theta = hidden, heads, kv_heads, theta
    self.head_dim = hidden // heads
    self.fc = nn.Linear(k * hidden, hidden, bias=False)
    norm = lambda: transformers.models.llama.modeling_llama.LlamaRMSNorm(hidden, eps=eps)
    self.midlayer = nn.Module()
    m = self.midlayer
    m.input_layernorm, m.hidden_norm, m.post_attention_layernorm = norm(), norm(), norm()
    m.self_attn = nn.Module()
    m.self_attn.q_proj = nn.Linear(2 * hidden, heads * self.head_dim, bias=False)
    m.self_attn.k_proj = nn.Linear(2 * hidden, kv_heads * self.head_dim, bias=False)
    m.self_attn.v_proj = nn.Linear(2 * hidden, kv_heads * self.head_dim, bias=False)
    m.self_attn.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
    m.mlp = nn.Module()
    m.mlp.gate_proj = nn.Linear(hidden, inter, bias=False)
    m.mlp.up_proj = nn.Linear(hidden, inter, bias=False)
    m.mlp.down_proj = nn.Linear(inter, hidden, bias=False)
    self.norm = norm()
    self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
    self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
    self.register_buffer("t2d", torch.zeros(vocab, dtype=torch.bool))

  def _rope(self, x, positions):  # x [b, heads, s, hd]; HF rotate_half form
    inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
    ang = positions[:, None, :, None].float() * inv  # [b, 1, s, hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., :self.head_dim // 2], x[..., self.head_dim // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin

  def forward(self, hidden_states, input_embeds, positions):
    """hidden_states [b, s, k*d] (target layers) or [b, s, d] (fed back, fc skipped as in
    EAGLE-3), input_embeds [b, s, d], positions [b, s]; causal. Returns (out [b, s, d],
    logits [b, s, draft_vocab])."""
    if hidden_states.shape[-1] != input_embeds.shape[-1]:
      hidden_states = self.fc(hidden_states)
    m, b, s = self.midlayer, hidden_states.shape[0], hidden_states.shape[1]
    residual = hidden_states
    x = torch.cat([m.input_layernorm(input_embeds), m.hidden_norm(hidden_states)], -1)
    split = lambda t, n: t.view(b, s, n, self.head_dim).transpose(1, 2)
    q = self._rope(split(m.self_attn.q_proj(x), self.heads), positions)
    k = self._rope(split(m.self_attn.k_proj(x), self.kv_heads), positions)
    v = split(m.self_attn.v_proj(x), self.kv_heads)
    rep = self.heads // self.kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = residual + m.self_attn.o_proj(att.transpose(1, 2).reshape(b, s, -1))
    out = h + m.mlp.down_proj(torch.nn.functional.silu(m.mlp.gate_proj(
        m.post_attention_layernorm(h))) * m.mlp.up_proj(m.post_attention_layernorm(h)))
    return out, self.lm_head(self.norm(out))


def make_eagle3_reference(hidden=32, heads=4, kv_heads=2, inter=48, vocab=64, draft_vocab=24,
                          seed=0):
  """A random EAGLE-3 head (norm weights perturbed so they matter) with a hot map of
  `draft_vocab` ids (every other id from 1, then the lowest unused ones)."""
  torch.manual_seed(seed)
  model = Eagle3Reference(hidden, heads, kv_heads, inter, vocab, draft_vocab).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.normal_(1.0, 0.2)
      else:
        p.normal_(0.0, 0.15)
    ids = torch.arange(1, vocab, 2)[:draft_vocab]
    if ids.numel() < draft_vocab:
      rest = torch.tensor([i for i in range(vocab) if i not in set(ids.tolist())])
      ids = torch.sort(torch.cat([ids, rest[:draft_vocab - ids.numel()]])).values
    model.d2t.copy_(ids - torch.arange(draft_vocab))
    model.t2d.zero_()
    model.t2d[ids] = True
  return model


def save_eagle3_reference(model, out_dir: str, num_layers_key: list | None = None) -> str:
  """config.json in the published EAGLE-3 form (a LlamaConfig + draft_vocab_size) and the
  state dict as model.safetensors."""
  from safetensors.torch import save_file
  os.makedirs(out_dir, exist_ok=True)
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "hidden_size": model.hidden, "intermediate_size": model.midlayer.mlp.gate_proj.out_features,
         "num_attention_heads": model.heads, "num_key_value_heads": model.kv_heads,
         "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "rope_theta": model.theta, "max_position_embeddings": 256,
         "vocab_size": model.t2d.numel(), "draft_vocab_size": model.lm_head.out_features,
         "tie_word_embeddings": False, "torch_dtype": "float32"}
  if num_layers_key is not None:
    cfg["eagle_aux_hidden_state_layer_ids"] = num_layers_key
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out_dir, "model.safetensors"))
  return out_dir
