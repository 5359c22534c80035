"""Where the time of one speculative step goes, kernel by kernel (and of a vanilla token).

Runs `--steps` speculative steps (draft tree + verify + commit) in one on-device loop under
`jax.profiler.trace`, then reads the Perfetto trace it writes and prints, per step: the
number of device kernels (XLA ops on CPU), their summed time, the wall time, and the
kernels that take the most time. Summed kernel time well below the wall time means
launch gaps and host waits; many kernels per step means fixed per-step overhead. The same
for vanilla decoding's on-device loop, per token, for comparison.

  python benchmarks/profile_spec.py --shape=llama3_8b --dtype=bfloat16 --batch 1   # GPU
  python benchmarks/profile_spec.py --shape=tiny --batch 1                         # CPU

The trace directory (--out) also holds the .xplane.pb for TensorBoard / XProf.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_bench import SHAPES  # noqa: E402
from spec_bench import options_for, random_models, random_state  # noqa: E402

from fspad_jax import speculative as spec  # noqa: E402
from fspad_jax.generate import GenerateOptions, VanillaGenerator  # noqa: E402
from fspad_jax.sharding import make_mesh  # noqa: E402

# CPU trace events that are bookkeeping or enclose other ops (counted once, via their parts).
HOST_NOISE = ("ThreadpoolListener", "end: ", "ThunkExecutor", "SlinkyThreadPool", "while", "call",
              "conditional")


def trace_events(trace_dir: str) -> list[dict]:
  """The events of the newest Perfetto trace under trace_dir."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def kernel_events(events: list[dict]) -> tuple[list[dict], str]:
  """Complete events of device kernels (GPU/TPU streams), else of XLA ops on CPU threads."""
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device = [e for e in complete if procs.get(e["pid"], "").startswith("/device:")]
  if device:
    return device, "device kernels"
  # XLA's worker threads and the PjRt client thread, which runs a program's ops itself when
  # XLA executes them in order without the worker pool (small sequential programs).
  xla = [e for e in complete if "XLA" in threads.get((e["pid"], e.get("tid")), "")
         and not e["name"].startswith(HOST_NOISE)]
  return xla, "XLA ops on CPU threads"


def summarize(trace_dir: str, units: int, wall_s: float, top: int) -> dict:
  """Per-unit (step or token) kernel count and time, and the `top` kernels by time."""
  kernels, source = kernel_events(trace_events(trace_dir))
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in kernels:
    entry = by_name[e["name"]]
    entry[0] += 1
    entry[1] += e["dur"]  # microseconds
  busy_us = sum(e["dur"] for e in kernels)
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return {
      "source": source, "units": units,
      "wall_ms_per_unit": wall_s / units * 1e3,
      "kernels_per_unit": len(kernels) / units,
      "kernel_ms_per_unit": busy_us / units / 1e3,
      "top": [{"name": name, "calls_per_unit": n / units, "ms_per_unit": us / units / 1e3,
               "share": us / busy_us if busy_us else 0.0} for name, (n, us) in ranked],
  }


def print_summary(title: str, s: dict) -> None:
  print(f"\n== {title}: {s['source']}, per {s['unit']}: wall {s['wall_ms_per_unit']:.3f} ms, "
        f"{s['kernels_per_unit']:.0f} kernels summing to {s['kernel_ms_per_unit']:.3f} ms")
  for k in s["top"]:
    print(f"  {k['ms_per_unit']:9.4f} ms  {k['share']:6.1%}  x{k['calls_per_unit']:<6.1f} "
          f"{k['name'][:110]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prefix", type=int, default=1024, help="committed tokens per row")
  ap.add_argument("--depth", type=int, default=6)
  ap.add_argument("--top_k", type=int, default=10)
  ap.add_argument("--total_tokens", type=int, default=60)
  ap.add_argument("--steps", type=int, default=8, help="speculative steps in the traced loop")
  ap.add_argument("--vanilla_tokens", type=int, default=32)
  ap.add_argument("--top", type=int, default=25, help="kernels listed")
  ap.add_argument("--out", default="/tmp/fspad_profile", help="trace directory")
  args = ap.parse_args()

  cfg, tg, tp, dg, dp = random_models(args.shape, args.dtype)
  options = options_for(args.depth, args.top_k, args.total_tokens, args.prefix, args.steps + 1)
  prompt, state = random_state(cfg, tg, tp, dg, dp, args.batch, args.prefix, options)

  def loop(tp, dp, state):
    draft, target = nnx.merge(dg, dp), nnx.merge(tg, tp)
    return jax.lax.fori_loop(
        0, args.steps, lambda i, s: spec.speculative_step(draft, target, s, options), state)
  loop = jax.jit(loop)
  jax.block_until_ready(loop(tp, dp, state))  # compile + warm

  vgen = VanillaGenerator(tg, tp, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  vopts = GenerateOptions(max_new_tokens=args.vanilla_tokens, cache_len=options.cache_len)
  row_lengths = np.full(args.batch, args.prefix, np.int32)
  jax.block_until_ready(vgen(np.asarray(prompt), row_lengths, vopts))  # compile + warm

  results = {"shape": args.shape, "dtype": cfg.dtype, "batch": args.batch,
             "prefix": args.prefix, "tree": [args.depth, args.top_k, args.total_tokens],
             "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  for name, run, units, unit in (
      ("speculative", lambda: loop(tp, dp, state), args.steps, "step"),
      ("vanilla", lambda: vgen(np.asarray(prompt), row_lengths, vopts), args.vanilla_tokens,
       "token (prefill included)")):
    trace_dir = os.path.join(args.out, name)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      wall = time.perf_counter() - t0
    summary = summarize(trace_dir, units, wall, args.top) | {"unit": unit}
    print_summary(name, summary)
    results[name] = summary
  print("\n" + json.dumps(results))


if __name__ == "__main__":
  main()
