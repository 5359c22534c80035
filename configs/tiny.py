"""Tiny CPU config: vanilla decoding of any Hugging Face model directory, few new tokens.

  python decode.py --config=configs/tiny.py --config.target.path=/tmp/tiny_llama \
    --input=prompts.jsonl --output=/tmp/tiny_out.jsonl

(A model directory to try it on: `python -c "from fspad_jax.tiny_checkpoint import
make_tiny_checkpoint; make_tiny_checkpoint('/tmp/tiny_llama')"`.)
"""

import ml_collections


def target_config() -> ml_collections.ConfigDict:
  """The model being decoded (a Hugging Face model directory)."""
  c = ml_collections.ConfigDict()
  c.path = ""  # required: --config.target.path=DIR
  c.dtype = "float32"  # float32 | bfloat16
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.shape = (1, 1, -1)
  return c


def decode_config() -> ml_collections.ConfigDict:
  """Decoding method and sampling settings."""
  c = ml_collections.ConfigDict()
  c.method = "vanilla"  # vanilla (eagle/fspad to come)
  c.temperature = 0.0  # 0 = greedy
  c.top_p = 1.0
  c.top_k = 0  # 0 = off
  c.max_new_tokens = 16
  c.batch_size = 4
  c.cache_len = 0  # 0 = derived per batch from prompt length + max_new_tokens
  c.stop_token_ids = ()  # extra stop ids, on top of the checkpoint's eos ids
  c.seed = 0
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.target = target_config()
  config.mesh = mesh_config()
  config.decode = decode_config()
  return config
