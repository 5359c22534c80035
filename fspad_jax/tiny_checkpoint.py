"""Tiny Hugging Face model directories, built offline, for tests, demos and notebooks.

`make_tiny_checkpoint` writes config.json + model.safetensors (random weights, via
fspad_jax's own writer) plus a byte-level BPE tokenizer with a Llama-3-style chat template,
so every code path that takes a real checkpoint directory can be exercised without a
download. Tests that need the torch reference write their weights with transformers'
`save_pretrained` instead and reuse `build_tokenizer`.
"""

from __future__ import annotations

import os

from fspad_jax.config import ModelConfig, RopeConfig

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>")
BOS_ID, END_OF_TEXT_ID, EOT_ID = 0, 1, 4

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def default_corpus() -> list[str]:
  """Offline English text for a toy tokenizer: docstrings of standard-library modules."""
  import collections, json, os as _os, re, string, textwrap, unittest  # noqa: E401
  texts = []
  for mod in (collections, json, _os, re, string, textwrap, unittest):
    for name in dir(mod):
      doc = getattr(getattr(mod, name), "__doc__", None)
      if isinstance(doc, str) and len(doc) > 40:
        texts.append(doc)
  return texts


def build_tokenizer(out_dir: str, vocab_size: int = 512, corpus: list[str] | None = None):
  """Trains a byte-level BPE and saves it (with chat template) as a transformers tokenizer."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus or default_corpus(), trainer)
  hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS[BOS_ID],
                                   eos_token=SPECIAL_TOKENS[EOT_ID],
                                   pad_token=SPECIAL_TOKENS[END_OF_TEXT_ID])
  hf_tok.chat_template = LLAMA3_CHAT_TEMPLATE
  os.makedirs(out_dir, exist_ok=True)
  hf_tok.save_pretrained(out_dir)
  return hf_tok


def tiny_config(family: str = "llama", vocab_size: int = 512, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate_size: int = 128, dtype: str = "float32") -> ModelConfig:
  """A small config of one family: 'llama' (Llama-3 style), 'llama2', 'qwen2', 'mistral'."""
  rope = RopeConfig(theta=500000.0) if family == "llama" else RopeConfig(theta=10000.0)
  return ModelConfig(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_heads if family == "llama2" else num_kv_heads,
      head_dim=hidden_size // num_heads, rms_norm_eps=1e-5, rope=rope,
      qkv_bias=family == "qwen2", model_type="llama" if family.startswith("llama") else family,
      max_position_embeddings=2048, bos_token_id=BOS_ID, eos_token_ids=(EOT_ID,),
      dtype=dtype)


def make_tiny_checkpoint(out_dir: str, cfg: ModelConfig | None = None, seed: int = 0,
                         tokenizer_corpus: list[str] | None = None,
                         weight_scale: float = 8.0) -> str:
  """Writes a complete random-weight HF model directory (weights, config, tokenizer).

  Weights are N(0, 0.02 * weight_scale): at the default, the tiny target's next-token
  distributions are peaked and depend on the context, like a trained model's, instead of
  the near-uniform output of a 0.02-std init (which no draft could meaningfully match)."""
  import jax
  from flax import nnx
  from fspad_jax.hf_checkpoint import save_target
  from fspad_jax.model import init_model

  cfg = cfg or tiny_config()
  build_tokenizer(out_dir, vocab_size=cfg.vocab_size, corpus=tokenizer_corpus)
  _, params = nnx.split(init_model(cfg, seed=seed))
  params = jax.tree.map(lambda x: x if x.ndim == 1 else x * weight_scale, params)
  save_target(out_dir, cfg, params)
  return out_dir


def make_tiny_conversations(path: str, num: int = 200, seed: int = 0,
                            corpus: list[str] | None = None) -> str:
  """Writes `num` ShareGPT-layout conversations (JSONL) cut from offline English text:
  a user turn asking about a passage's opening and an assistant turn continuing it."""
  import json
  import random
  rng = random.Random(seed)
  sentences = [s.strip() for doc in (corpus or default_corpus())
               for s in doc.replace("\n", " ").split(". ") if len(s.split()) >= 4]
  with open(path, "w") as f:
    for i in range(num):
      start = rng.randrange(len(sentences))
      reply = ". ".join(sentences[start:start + rng.randint(1, 3)])
      question = f"Continue: {' '.join(sentences[start - 1].split()[:8])}"
      turns = [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
      f.write(json.dumps({"id": f"tiny-{i}", "conversations": turns}) + "\n")
  return path
