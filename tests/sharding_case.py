"""The computation compared across meshes: a forward pass and a greedy generation."""

import numpy as np

from fspad_jax.generate import GenerateOptions
from fspad_jax.sharding import host_to_global, to_host
from fspad_jax.target import Target

BATCH, SEQ = 8, 10


def case_inputs(vocab: int):
  rs = np.random.RandomState(0)
  tokens = rs.randint(5, vocab, (BATCH, SEQ)).astype(np.int32)
  lengths = np.array([10, 3, 7, 10, 1, 5, 9, 2], np.int32)
  return tokens, lengths


def run_case(model_dir: str, mesh_shape, devices=None):
  """Returns (logits [BATCH, SEQ, vocab] float32, greedy tokens [BATCH, 12])."""
  target = Target.from_pretrained(model_dir, mesh_shape=mesh_shape, devices=devices)
  tokens, lengths = case_inputs(target.cfg.vocab_size)
  positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ))
  tok_sh = target.sharding("act_tokens", (BATCH, SEQ))
  cache = target.new_cache(BATCH, 16)
  logits, _, _ = target.forward(host_to_global(tokens, tok_sh),
                                host_to_global(positions, tok_sh), cache)
  out = target.vanilla_generator()(tokens, lengths, GenerateOptions(max_new_tokens=12,
                                                                    cache_len=32))
  return to_host(logits), out.tokens
