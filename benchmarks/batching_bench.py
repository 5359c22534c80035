"""Continuous batching against static batches, side by side in one run (issue 12, item 4).

Prompts with skewed output lengths: half stop within 8 tokens (per-prompt limits 1..8),
half run to --max_new tokens. Static batches (decode.schedule=static: batch_size prompts
at a time, in input order, each batch until its longest row is done) against continuous
batching (fspad_jax/decoding/scheduler.py: a finished row's slot is refilled at once),
with and without attention-span bucketing (continuous_spans / continuous_full). Each schedule runs once to compile, then
--repeats timed runs, interleaved; tokens/s = new tokens / the fastest run's wall time (the
least disturbed on a shared machine); the median wall time and the least process CPU time
(all threads) are given beside it. device_steps counts the batch steps each schedule ran. Greedy
outputs are checked token for token. One JSON line per (schedule, batch).

  python benchmarks/batching_bench.py                              # CPU, tiny target
  python benchmarks/batching_bench.py --shape=mini                 # CPU, ~30M target
  python benchmarks/batching_bench.py --shape=llama3_8b --batch 8 32 --prompts 64  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_bench import SHAPES, measure_bandwidth, tree_bytes  # noqa: E402

from fspad_jax.config import ModelConfig, load_repo_config  # noqa: E402
from fspad_jax.decoding.engine import DecodeEngine, record_seed  # noqa: E402
from fspad_jax.decoding.scheduler import ContinuousScheduler, WorkItem, run_static  # noqa: E402
from fspad_jax.decoding.timing import BatchTimer  # noqa: E402
from fspad_jax.model import init_model  # noqa: E402
from fspad_jax.sharding import make_mesh  # noqa: E402


# ~30M parameters, float32: a CPU step that costs more than a host visit's dispatches.
SHAPES = {**SHAPES, "mini": lambda: ModelConfig(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
    num_kv_heads=4, head_dim=64, dtype="float32")}


def workload(n: int, max_new: int, vocab: int, seed: int = 0):
  """n prompts (10..60 tokens): even ones stop within 8 tokens, odd ones run to max_new."""
  rng = np.random.default_rng(seed)
  items = []
  for i in range(n):
    prompt = [int(t) for t in rng.integers(1, vocab, size=int(rng.integers(10, 61)))]
    limit = int(rng.integers(1, 9)) if i % 2 == 0 else max_new
    items.append(WorkItem(prompt, record_seed(seed, str(i)), limit, i))
  return items


def run_schedule(engine, items, schedule: str, budget: int):
  """(outputs by tag, wall seconds, new tokens, extra info) of one run over items."""
  got = {}
  t0, c0 = time.perf_counter(), time.process_time()
  if schedule == "static":
    batches = []

    def on_finish(item, c, v):
      got[item.tag] = c.output_ids
      batches.append(c.new_tokens)
      return []
    run_static(engine, None, BatchTimer(), items, on_finish)
    b = engine.settings.batch_size
    # A batch runs until its longest row is done: (its most tokens - 1) steps after prefill.
    info = {"device_steps": sum(max(batches[i:i + b]) - 1 for i in range(0, len(batches), b))}
  else:
    spans = {"continuous": None, "continuous_spans": True, "continuous_full": False}[schedule]
    sched = ContinuousScheduler(engine, budget=budget or None, spans=spans)
    sched.run(items, lambda item, c: (got.__setitem__(item.tag, c.output_ids), [])[1])
    info = {"budget_used": sched.budget, "host_visits": sched.visits, "device_steps": sched.device_steps,
            "spans": {str(k): v for k, v in sorted(sched.spans_used.items())}}
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return got, wall, sum(len(v) for v in got.values()), {**info, "cpu": cpu}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
  ap.add_argument("--batch", type=int, nargs="+", default=[8])
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--max_new", type=int, default=128)
  ap.add_argument("--budget", type=int, default=0,
                  help="decode steps per host visit (0: the scheduler's default)")
  ap.add_argument("--cache_len", type=int, default=0,
                  help="fixed cache slots (0: prompt bucket + max_new, as decode.py derives)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--schedules", nargs="+",
                  default=["static", "continuous", "continuous_spans", "continuous_full"],
                  help="continuous: span buckets for caches >= scheduler.SPAN_MIN_CACHE; "
                       "continuous_spans: always; continuous_full: never (whole cache)")
  args = ap.parse_args()

  cfg = SHAPES[args.shape]()
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  graphdef, params = nnx.split(init_model(cfg))
  weight_bytes = tree_bytes(params)
  gpu = jax.default_backend() != "cpu"
  bandwidth = measure_bandwidth(1 << 31) if gpu else None
  meta = {"shape": args.shape, "dtype": cfg.dtype, "device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend(), "jax": jax.__version__,
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
  for batch in args.batch:
    config = load_repo_config("tiny")
    config.decode.update(max_new_tokens=args.max_new, batch_size=batch, temperature=0.0,
                         cache_len=args.cache_len, stop_token_ids=())
    engine = DecodeEngine.from_model(config, cfg.replace(eos_token_ids=()), graphdef, params,
                                     mesh)
    items = workload(args.prompts, args.max_new, cfg.vocab_size)
    results = {s: {"walls": [], "cpus": []} for s in args.schedules}
    for rep in range(args.repeats + 1):  # run 0 compiles
      for s in args.schedules:
        got, wall, tokens, info = run_schedule(engine, items, s, args.budget)
        r = results[s]
        cpu = info.pop("cpu")
        r.update(outputs=got, tokens=tokens, **info)
        if rep:
          r["walls"].append(wall)
          r["cpus"].append(cpu)
    ref = results[args.schedules[0]]
    for s in args.schedules:
      r = results[s]
      wall = float(np.min(r["walls"]))  # the least disturbed run (shared machines)
      rec = {"schedule": s, "batch": batch, "prompts": args.prompts, "max_new": args.max_new,
             "budget": args.budget or None, "new_tokens": r["tokens"], "wall_s": round(wall, 4),
             "tokens_per_s": round(r["tokens"] / wall, 2),
             "median_wall_s": round(float(np.median(r["walls"])), 4),
             "min_cpu_s": round(float(np.min(r["cpus"])), 4),
             "speedup_vs_first": round(ref["walls"] and (r["tokens"] / wall)
                                       / (ref["tokens"] / float(np.min(ref["walls"]))), 3),
             "identical_to_first": r["outputs"] == ref["outputs"],
             **{k: r[k] for k in ("device_steps", "budget_used", "host_visits", "spans") if k in r},
             "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
      if bandwidth:
        # Floor of one batch-b step: every weight once (the KV read comes on top).
        rec["bandwidth_GBps"] = round(bandwidth / 1e9, 1)
        rec["weight_bound_tokens_per_s"] = round(batch * bandwidth / weight_bytes, 1)
        rec["fraction_of_weight_bound"] = round(rec["tokens_per_s"]
                                                / rec["weight_bound_tokens_per_s"], 3)
      print(json.dumps({**rec, **meta}), flush=True)


if __name__ == "__main__":
  main()
