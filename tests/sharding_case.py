"""The computations compared across meshes: a forward pass, a greedy generation, and
continuous batching (vanilla and speculative) through the decode engine's slot functions."""

import numpy as np

from fspad_jax.config import load_repo_config
from fspad_jax.decoding.engine import DecodeEngine
from fspad_jax.decoding.scheduler import ContinuousScheduler, WorkItem
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


def forward_all_gathers(model_dir: str, mesh_shape, seq: int, devices=None) -> int:
  """All-gathers in the compiled target forward of a [BATCH, seq] block that writes its K/V
  into a 16-slot cache (one decode token at seq=1): on a tensor-parallel mesh the only
  collectives should be the all-reduces after attention and the MLP (and the embedding's)."""
  import re
  import jax
  target = Target.from_pretrained(model_dir, mesh_shape=mesh_shape, devices=devices)
  tok = jax.ShapeDtypeStruct((BATCH, seq), np.int32,
                             sharding=target.sharding("act_tokens", (BATCH, seq)))
  forward = target._compile_forward(BATCH, seq, 16, False, False)  # pylint: disable=W0212
  text = forward.lower(target.params, tok, tok, target.new_cache(BATCH, 16), None,
                       None).compile().as_text()
  return len(re.findall(r"\ball-gather(?:-start)?\(", text))


# 8 slots (divisible by every data x fsdp size of the 8-device meshes) for 12 prompts.
SLOTS, CONTINUOUS_NEW, CONTINUOUS_PROMPTS = 8, 10, 12


def continuous_case(model_dir: str, mesh_shape, draft_dir: str, devices=None) -> dict:
  """Greedy continuous batching of CONTINUOUS_PROMPTS prompts on SLOTS slots (refilled on
  device), vanilla and eagle (draft_dir): {method: tokens [prompts, CONTINUOUS_NEW] (-1
  after the end)}, and under "cache_spec" the PartitionSpec of the slot state's KV cache."""
  target = Target.from_pretrained(model_dir, mesh_shape=mesh_shape, devices=devices)
  rs = np.random.RandomState(1)
  prompts = [[int(t) for t in rs.randint(5, target.cfg.vocab_size, rs.randint(1, 12))]
             for _ in range(CONTINUOUS_PROMPTS)]
  out = {}
  for method in ("vanilla", "eagle"):
    config = load_repo_config("tiny")
    config.decode.method = method
    config.decode.max_new_tokens = CONTINUOUS_NEW
    config.decode.batch_size = SLOTS
    config.draft.path = draft_dir if method != "vanilla" else ""
    engine = DecodeEngine.from_model(config, target.cfg, target.graphdef, target.params,
                                     target.mesh)
    got = np.full((len(prompts), CONTINUOUS_NEW), -1, np.int32)

    def on_finish(item, c):
      got[item.tag, :len(c.output_ids)] = c.output_ids
      return []
    ContinuousScheduler(engine, budget=3).run(
        [WorkItem(p, 0, CONTINUOUS_NEW, i) for i, p in enumerate(prompts)], on_finish)
    out[method] = got
    if method == "vanilla":
      state = engine.slot_decoder().empty(32)
      out["cache_spec"] = str(state.cache.kv.sharding.spec)
  return out
