"""Vanilla decode step time vs the memory-bandwidth limit.

A batch-b decode step must stream every weight once plus the KV cache it attends to, so
its floor is (weight bytes + KV bytes) / bandwidth. This script measures the bandwidth
(a large on-device copy), the jitted decode step, its phases (decoder layers vs LM head),
and the on-device generation loop, and prints one JSON record per batch size.

  # lent GPU, Llama-3-8B shapes (random bf16 weights), 2k-token cache:
  python benchmarks/decode_bench.py --shape=llama3_8b --batch 1 8
  # CPU, small shape:
  python benchmarks/decode_bench.py --shape=small --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fspad_jax.config import ModelConfig, RopeConfig, llama3_8b_config
from fspad_jax.generate import GenerateOptions, VanillaGenerator
from fspad_jax.model import KVCache, init_model
from fspad_jax.sharding import make_mesh

SHAPES = {
    "llama3_8b": lambda: llama3_8b_config("bfloat16"),
    # ~120M params: big enough that CPU steps are memory/compute bound, small enough to run.
    "small": lambda: ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                 num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                                 rope=RopeConfig(theta=500000.0), dtype="bfloat16"),
    "tiny": lambda: ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                dtype="float32"),
}


def timeit(fn, *args, warmup=2, iters=10):
  """Median wall time of fn(*args) in seconds (outputs blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def measure_bandwidth(nbytes=1 << 30):
  """Achievable read bandwidth in bytes/s: the better of a device copy (read + write counted)
  and a matrix-vector product over a weight-sized matrix (what a decode step does; on CPUs
  elementwise copies run on fewer cores than matmuls)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = 2 * x.nbytes / timeit(jax.jit(lambda a: a + 1.0), x, iters=10)
  m = x.reshape(-1, 4096)
  v = jnp.ones((4096,), jnp.float32)
  gemv = m.nbytes / timeit(jax.jit(lambda a, b: a @ b), m, v, iters=10)
  return max(copy, gemv)


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--cache_len", type=int, default=2048)
  ap.add_argument("--gen_tokens", type=int, default=64)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--dtype", default=None, help="override the shape's dtype")
  args = ap.parse_args()

  cfg = SHAPES[args.shape]()
  if args.dtype:
    cfg = cfg.replace(dtype=args.dtype)
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  graphdef, params = nnx.split(init_model(cfg))
  weight_bytes = tree_bytes(params)
  bandwidth = measure_bandwidth(1 << 28 if jax.default_backend() == "cpu" else 1 << 31)

  def step(params, tokens, positions, cache):
    model = nnx.merge(graphdef, params)
    logits, _, cache = model(tokens, positions, cache)
    return jnp.argmax(logits[:, -1], -1), cache.replace(lengths=cache.lengths + 1)

  def layers_only(params, tokens, positions, cache):
    model = nnx.merge(graphdef, params)
    feats, cache = model.features(tokens, positions, cache)
    return feats, cache

  def head_only(params, feats):
    return jnp.argmax(nnx.merge(graphdef, params).logits(feats), -1)

  step_jit = jax.jit(step, donate_argnums=(3,))
  layers_jit = jax.jit(layers_only, donate_argnums=(3,))
  head_jit = jax.jit(head_only)
  records = []
  for batch in args.batch:
    fill = args.cache_len // 2  # attend to a half-full cache
    cache = KVCache.create(cfg, batch, args.cache_len)
    cache = cache.replace(lengths=jnp.full((batch,), fill, jnp.int32))
    kv_bytes_read = (2 * cfg.num_layers * batch * fill * cfg.num_kv_heads * cfg.head_dim
                     * jnp.dtype(cfg.dtype).itemsize)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), fill, jnp.int32)

    state = {"cache": cache}
    def run_step():
      tok, state["cache"] = step_jit(params, tokens, positions, state["cache"])
      state["cache"] = state["cache"].replace(lengths=jnp.full((batch,), fill, jnp.int32))
      return tok
    def run_layers():
      feats, state["cache"] = layers_jit(params, tokens, positions, state["cache"])
      return feats
    t_step = timeit(run_step, iters=args.iters)
    t_layers = timeit(run_layers, iters=args.iters)
    feats = jnp.zeros((batch, 1, cfg.hidden_size), cfg.dtype)
    t_head = timeit(head_jit, params, feats, iters=args.iters)

    gen = VanillaGenerator(graphdef, params, mesh)
    prompt = np.ones((batch, 16), np.int32)
    opts = GenerateOptions(max_new_tokens=args.gen_tokens, cache_len=args.cache_len)
    gen(prompt, np.full(batch, 16), opts)  # compile
    t = time.perf_counter()
    out = gen(prompt, np.full(batch, 16), opts)
    t_gen = time.perf_counter() - t
    new = int(out.num_tokens.sum())

    bound = (weight_bytes + kv_bytes_read) / bandwidth
    records.append({
        "shape": args.shape, "dtype": cfg.dtype, "batch": batch, "cache_len": args.cache_len, "kv_filled": fill,
        "weight_GB": weight_bytes / 1e9, "bandwidth_GBps": bandwidth / 1e9,
        "bound_ms": bound * 1e3, "step_ms": t_step * 1e3,
        "fraction_of_bound": bound / t_step,
        "layers_ms": t_layers * 1e3, "lm_head_ms": t_head * 1e3,
        "generate_loop_ms_per_step": t_gen / args.gen_tokens * 1e3,
        "generate_tokens_per_s": new / t_gen,
    })
  meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(),
          "machine": platform.machine(), "cpu_count": __import__("os").cpu_count()}
  for r in records:
    print(json.dumps({**r, **meta}))


if __name__ == "__main__":
  main()
