"""Cost of one tree speculative step, phase by phase, against each phase's bandwidth bound.

Phases (each jitted alone, median of several runs):
  vanilla_step   one target decode step (1 token per row): reads all target weights + KV;
  draft_pass     one draft pass over K frontier nodes: reads the draft head + the LM head;
  tree_draft     the whole dynamic tree (D-1 draft passes + top-k/rerank bookkeeping);
  verify         one target forward over the T tree tokens with the ancestor mask;
  commit         KV gather + the draft's pass over the accepted tokens;
  full_step      draft + verify + commit: the jitted step with donated state, called from
                 the host step after step (caches updated in place);
  loop_per_step  the same steps inside one on-device loop (`fori_loop`); full_step minus
                 this is the host overhead of driving steps from Python.
  device_*       vanilla step, tree draft and verify again, each repeated inside its own
                 on-device loop: device time without the per-call dispatch; commit and
                 bookkeeping = loop_per_step - tree draft - verify.
  vanilla_loop   vanilla decoding in its own on-device loop (VanillaGenerator), per token,
                 prefill excluded: what speculation has to beat. breakeven_tau =
                 loop_per_step / vanilla_loop; projected speedup = tau / breakeven_tau.
Bound of a phase = bytes it must read (weights + KV) / measured copy bandwidth. The single
phases (vanilla_step .. verify) are synchronous calls of their own jit: they include the
per-call dispatch of every parameter buffer, which the loops do not pay.

  python benchmarks/spec_bench.py --shape=llama3_8b --batch 1 8    # lent GPU
  python benchmarks/spec_bench.py --shape=llama3_8b --batch 1 8 --draft_vocab 32768 \
      [--draft_weight int8]                                         # hot vocabulary
  python benchmarks/spec_bench.py --shape=small --batch 1 8        # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_bench import SHAPES, measure_bandwidth, timeit, tree_bytes  # noqa: E402

from fspad_jax import speculative as spec  # noqa: E402
from fspad_jax.draft import draft_config_from_target, init_draft  # noqa: E402
from fspad_jax.generate import GenerateOptions, VanillaGenerator  # noqa: E402
from fspad_jax.model import init_model  # noqa: E402
from fspad_jax.sharding import make_mesh  # noqa: E402


def random_models(shape: str, dtype: str | None):
  """(cfg, target graphdef, target params, draft graphdef, draft params): random weights of
  a SHAPES entry and an FSPAD head of matching shape."""
  cfg = SHAPES[shape]()
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  tg, tp = nnx.split(init_model(cfg))
  dg, dp = nnx.split(init_draft(draft_config_from_target(cfg, "fspad"), seed=1))
  return cfg, tg, tp, dg, dp


def options_for(depth: int, top_k: int, total_tokens: int, prefix: int, steps: int
                ) -> spec.SpecOptions:
  """Tree options whose cache holds the prefix, `steps` speculative steps and a tree."""
  return spec.SpecOptions(max_new_tokens=steps * (depth + 1), depth=depth, top_k=top_k,
                          total_tokens=total_tokens,
                          cache_len=prefix + total_tokens + 64 + steps * (depth + 1))


def draft_variant(cfg, tg, tp, dg, dp, draft_vocab: int, draft_weight: str):
  """(dg, dp, vocab): the draft as decoding would run it, with a hot vocabulary of the first
  `draft_vocab` ids (0: full; with random weights which ids are hot does not change the cost)
  and int8 weights if asked."""
  from fspad_jax import quant
  from fspad_jax.hot_vocab import make_draft_vocab
  if draft_weight == "int8":
    dg, dp = quant.quantize_draft(dg, dp)
  vocab = None
  if draft_vocab:
    vocab = jax.jit(lambda p, ids: make_draft_vocab(nnx.merge(tg, p), ids, draft_weight))(
        tp, np.arange(draft_vocab, dtype=np.int32))
  return dg, dp, vocab


def random_state(cfg, tg, tp, dg, dp, batch: int, prefix: int, options: spec.SpecOptions,
                 vocab=None):
  """(prompt [batch, prefix] of random tokens, the SpecState after prefilling it)."""
  rs = np.random.RandomState(0)
  prompt = jnp.asarray(rs.randint(0, cfg.vocab_size, (batch, prefix)), jnp.int32)
  lengths = jnp.full((batch,), prefix, jnp.int32)

  def init(tp, dp, prompt, lengths):
    return spec.init_state(nnx.merge(dg, dp), nnx.merge(tg, tp), prompt, lengths,
                           jax.random.key(0), options, vocab)
  return prompt, jax.block_until_ready(jax.jit(init)(tp, dp, prompt, lengths))


def best_of(repeats: int, fn) -> float:
  """Shortest wall time of fn() (outputs blocked on) over `repeats` calls."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--prefix", type=int, default=1024, help="committed tokens per row")
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--top_k", type=int, default=10)
  ap.add_argument("--total_tokens", type=int, default=60)
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--loop_steps", type=int, default=16)
  ap.add_argument("--vanilla_tokens", type=int, default=64)
  ap.add_argument("--draft_vocab", type=int, default=0, help="hot draft vocabulary (0: full)")
  ap.add_argument("--draft_weight", default="", choices=("", "int8"))
  args = ap.parse_args()

  cfg, tg, tp, dg, dp = random_models(args.shape, args.dtype)
  dg, dp, vocab = draft_variant(cfg, tg, tp, dg, dp, args.draft_vocab, args.draft_weight)
  itemsize = jnp.dtype(cfg.dtype).itemsize
  target_bytes = tree_bytes(tp)
  lm_head_bytes = cfg.hidden_size * cfg.vocab_size * itemsize
  draft_bytes = tree_bytes(dp)
  bandwidth = measure_bandwidth(1 << 28 if jax.default_backend() == "cpu" else 1 << 31)
  steps_run = args.loop_steps + args.iters + 4  # steps any one state goes through
  options = options_for(args.depth, args.top_k, args.total_tokens, args.prefix, steps_run)
  records = []
  for batch in args.batch:
    prompt, state = random_state(cfg, tg, tp, dg, dp, batch, args.prefix, options, vocab)
    kv_bytes = (2 * cfg.num_layers * batch * args.prefix * cfg.num_kv_heads * cfg.head_dim
                * itemsize)

    # --- vanilla decode step
    def vanilla_step(tp, cache, tokens):
      logits, _, cache = nnx.merge(tg, tp)(tokens[:, None], cache.lengths[:, None], cache)
      return jnp.argmax(logits[:, 0], -1), cache
    vanilla = jax.jit(vanilla_step)
    t_vanilla = timeit(vanilla, tp, state.target_cache, state.last_token, iters=args.iters)

    # --- one draft pass over K frontier nodes (the tree's inner loop body)
    def draft_pass(tp, dp, state):
      draft, tgt = nnx.merge(dg, dp), nnx.merge(tg, tp)
      k = options.top_k
      feats = jnp.broadcast_to(state.root_feature[:, None], (batch, k, cfg.hidden_size))
      tokens = state.root_tokens
      positions = jnp.broadcast_to(state.draft_cache.lengths[:, None], (batch, k))
      out = draft(feats, tgt.embed(tokens), positions, state.draft_cache,
                  block_mask=jnp.eye(k, dtype=bool)[None].repeat(batch, 0))
      return spec.draft_candidates(tgt, out.predict, k, vocab)
    t_pass = timeit(jax.jit(draft_pass), tp, dp, state, iters=args.iters)

    # --- whole tree draft
    def tree_draft(tp, dp, state):
      tree, _ = spec.build_tree(nnx.merge(dg, dp), nnx.merge(tg, tp), state, options, vocab)
      return tree
    t_tree = timeit(jax.jit(tree_draft), tp, dp, state, iters=args.iters)
    tree = jax.jit(tree_draft)(tp, dp, state)

    # --- verify forward
    def verify(tp, cache, tree):
      n = cache.lengths
      logits, feats, cache = nnx.merge(tg, tp)(tree.tokens, n[:, None] + tree.depths, cache,
                                               block_mask=tree.ancestor_mask)
      return logits, feats
    t_verify = timeit(jax.jit(verify), tp, state.target_cache, tree, iters=args.iters)

    # --- full step: the jitted step with donated state, chained from the host (caches are
    # updated in place, as in the on-device loop)
    step_fn = spec.make_step_fn(tg, dg, options)
    chained = jax.tree.map(jnp.copy, state)
    for _ in range(2):
      chained = step_fn(tp, dp, chained, vocab)
    jax.block_until_ready(chained)
    t0 = time.perf_counter()
    for _ in range(args.iters):
      chained = step_fn(tp, dp, chained, vocab)
    jax.block_until_ready(chained)
    t_step = (time.perf_counter() - t0) / args.iters

    def full_step(tp, dp, state):
      return spec.speculative_step(nnx.merge(dg, dp), nnx.merge(tg, tp), state, options, vocab)

    def loop(tp, dp, state):
      return jax.lax.fori_loop(0, args.loop_steps, lambda i, s: full_step(tp, dp, s), state)
    loop_jit = jax.jit(loop)
    jax.block_until_ready(loop_jit(tp, dp, state))
    t0 = time.perf_counter()
    jax.block_until_ready(loop_jit(tp, dp, state))
    t_loop = (time.perf_counter() - t0) / args.loop_steps

    # --- vanilla decoding's own on-device loop, per token (prefill subtracted)
    vgen = VanillaGenerator(tg, tp, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    row_lengths = np.full(batch, args.prefix, np.int32)

    def vanilla_run(new_tokens):
      opts = GenerateOptions(max_new_tokens=new_tokens, cache_len=options.cache_len)
      jax.block_until_ready(vgen(np.asarray(prompt), row_lengths, opts))  # compile
      return best_of(3, lambda: vgen(np.asarray(prompt), row_lengths, opts))
    t_vloop = ((vanilla_run(args.vanilla_tokens) - vanilla_run(1))
               / (args.vanilla_tokens - 1))

    # --- device time of each phase: loop_steps calls inside one on-device loop (no per-call
    # dispatch). Each call's input depends on the previous call's output, so nothing is
    # hoisted out of the loop. body(target, draft, aux, carry) -> carry.
    def device_time(body, aux, carry):
      def run(tp, dp, aux, carry):
        target, draft = nnx.merge(tg, tp), nnx.merge(dg, dp)
        return jax.lax.fori_loop(0, args.loop_steps,
                                 lambda i, c: body(target, draft, aux, c), carry)
      run = jax.jit(run)
      jax.block_until_ready(run(tp, dp, aux, carry))
      return best_of(3, lambda: run(tp, dp, aux, carry)) / args.loop_steps

    def vanilla_body(target, draft, aux, carry):
      cache, tokens = carry
      logits, _, cache = target(tokens[:, None], cache.lengths[:, None], cache)
      return cache, jnp.argmax(logits[:, 0], -1).astype(tokens.dtype)
    d_vanilla = device_time(vanilla_body, None, (state.target_cache, state.last_token))

    def tree_body(target, draft, st, carry):
      cache, feature = carry
      tree, cache = spec.build_tree(draft, target, st._replace(draft_cache=cache,
                                                               root_feature=feature), options,
                                    vocab)
      return cache, feature + (tree.tokens[:, :1] % 2).astype(feature.dtype)
    d_tree = device_time(tree_body, state, (state.draft_cache, state.root_feature))

    def verify_body(target, draft, tree, carry):
      cache, tokens = carry
      logits, _, cache = target(tokens, cache.lengths[:, None] + tree.depths, cache,
                                block_mask=tree.ancestor_mask)
      first = jnp.argmax(logits[:, :1], -1).astype(tokens.dtype)  # [batch, 1]
      return cache, jnp.concatenate([first, tokens[:, 1:]], axis=1)
    d_verify = device_time(verify_body, tree, (state.target_cache, tree.tokens))

    passes = options.depth - 1
    b_vanilla = (target_bytes + kv_bytes) / bandwidth
    b_pass = (draft_bytes + lm_head_bytes) / bandwidth
    b_tree = passes * b_pass
    b_verify = (target_bytes + kv_bytes) / bandwidth
    commit = max(t_step - t_tree - t_verify, 0.0)
    records.append({
        "shape": args.shape, "dtype": cfg.dtype, "batch": batch, "prefix": args.prefix,
        "draft_vocab": args.draft_vocab or cfg.vocab_size,
        "draft_weight": args.draft_weight or cfg.dtype,
        "tree": [options.depth, options.top_k, options.total_tokens],
        "bandwidth_GBps": bandwidth / 1e9, "target_GB": target_bytes / 1e9,
        "draft_GB": draft_bytes / 1e9, "lm_head_GB": lm_head_bytes / 1e9,
        "vanilla_step_ms": t_vanilla * 1e3, "vanilla_fraction_of_bound": b_vanilla / t_vanilla,
        "draft_pass_ms": t_pass * 1e3, "draft_pass_fraction_of_bound": b_pass / t_pass,
        "tree_draft_ms": t_tree * 1e3, "tree_draft_fraction_of_bound": b_tree / t_tree,
        "verify_ms": t_verify * 1e3, "verify_fraction_of_bound": b_verify / t_verify,
        "verify_over_vanilla": t_verify / t_vanilla,
        "commit_and_bookkeeping_ms": commit * 1e3,
        "full_step_ms": t_step * 1e3, "loop_ms_per_step": t_loop * 1e3,
        "host_overhead_fraction": max(t_step - t_loop, 0.0) / t_step,
        "vanilla_loop_ms_per_token": t_vloop * 1e3,
        # Device time per call, phases repeated inside one on-device loop (no dispatch):
        "device_vanilla_step_ms": d_vanilla * 1e3,
        "device_tree_draft_ms": d_tree * 1e3,
        "device_tree_draft_fraction_of_bound": b_tree / d_tree,
        "device_verify_ms": d_verify * 1e3,
        "device_verify_over_vanilla": d_verify / d_vanilla,
        "device_commit_and_bookkeeping_ms": max(t_loop - d_tree - d_verify, 0.0) * 1e3,
        "breakeven_tau": t_loop / t_vloop,
        "projected_speedup_at_tau_4.53": 4.53 * t_vloop / t_loop,
    })
  meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count()}
  for r in records:
    print(json.dumps({**r, **meta}))


if __name__ == "__main__":
  main()
