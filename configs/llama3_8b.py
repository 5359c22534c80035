"""Meta-Llama-3-8B-Instruct target, bf16, vanilla decoding (the speculative baseline).

  python decode.py --config=configs/llama3_8b.py \
    --config.target.path=/path/to/Meta-Llama-3-8B-Instruct \
    --input=mt_bench.jsonl --output=runs/llama3_8b_vanilla.jsonl

target.path is a local model directory, or a repo id already in the Hugging Face cache.
"""

import ml_collections


def target_config() -> ml_collections.ConfigDict:
  """The model being decoded."""
  c = ml_collections.ConfigDict()
  c.path = "meta-llama/Meta-Llama-3-8B-Instruct"  # local dir or cached HF repo id
  c.dtype = "bfloat16"  # float32 | bfloat16
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.shape = (1, 1, -1)  # tensor-parallel over all local devices
  return c


def decode_config() -> ml_collections.ConfigDict:
  """Decoding method and sampling settings (EAGLE/FSPAD evaluation protocol)."""
  c = ml_collections.ConfigDict()
  c.method = "vanilla"  # vanilla (eagle/fspad to come)
  c.temperature = 0.0  # 0 = greedy; 1.0 for the sampling runs
  c.top_p = 1.0
  c.top_k = 0  # 0 = off
  c.max_new_tokens = 1024
  c.batch_size = 1  # speculative decoding is measured at batch 1; raise for throughput
  c.cache_len = 0  # 0 = derived per batch from prompt length + max_new_tokens
  c.stop_token_ids = ()  # extra stop ids, on top of <|end_of_text|> / <|eot_id|>
  c.seed = 0
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.target = target_config()
  config.mesh = mesh_config()
  config.decode = decode_config()
  return config
