"""decode.tree=auto's choice per batch size at a model shape with random weights.

Times what `decode.tree=auto` times at start-up (fspad_jax.decoding.tree_auto.measure_costs:
the verify forward at a few token counts, one draft pass per top-k, one full step of the
reference tree) on the present device, then picks the tree with tree_auto.choose_tree from
a per-depth agreement profile: random weights accept nothing, so the acceptance is given,
either a train.py metrics.jsonl (--acceptance) or a stated profile (--top1/--top3, default:
a well-trained EAGLE-class draft). One JSON record per batch size: the timings, the choice,
its expected tau and speedup, and the fixed 6/10/60 tree's for comparison.

  python benchmarks/tree_auto_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 8 32  # GPU
  python benchmarks/tree_auto_bench.py --shape=tiny --batch 1 2                          # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_bench import random_models  # noqa: E402

from fspad_jax.decoding import tree_auto  # noqa: E402
from fspad_jax.sharding import make_mesh  # noqa: E402
from fspad_jax.speculative import SpeculativeGenerator  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="tiny")
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
  ap.add_argument("--prefix", type=int, default=512, help="committed tokens per row")
  ap.add_argument("--max_new_tokens", type=int, default=512)
  ap.add_argument("--acceptance", default="", help="a train.py workdir (its metrics.jsonl)")
  ap.add_argument("--top1", type=float, nargs="+", default=[0.8, 0.78, 0.76, 0.75, 0.74])
  ap.add_argument("--top3", type=float, nargs="+", default=[0.93, 0.92, 0.91, 0.9, 0.9])
  args = ap.parse_args()

  if args.acceptance:
    acceptance = tree_auto.acceptance_from_workdir(args.acceptance)
    if acceptance is None:
      sys.exit(f"tree_auto_bench.py: error: {args.acceptance} has no metrics.jsonl with "
               f"top1_depth*")
  else:
    acceptance = tree_auto.Acceptance(tuple(args.top1), tuple(args.top3), "--top1/--top3")
  cfg, tg, tp, dg, dp = random_models(args.shape, args.dtype)
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  generator = SpeculativeGenerator(tg, tp, dg, dp, mesh)
  grid = tree_auto.candidates()
  meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version()}
  for batch in args.batch:
    reserve = max(tree_auto.NODES) + 1 + max(tree_auto.DEPTHS) + 1
    cache_len = -(-(args.prefix + args.max_new_tokens + reserve) // 64) * 64
    t0 = time.perf_counter()
    costs = tree_auto.measure_costs(generator, batch, args.prefix, cache_len)
    timing_s = time.perf_counter() - t0
    choice = tree_auto.choose_tree(acceptance, costs, grid)
    fixed = (6, 10, 60)
    fixed_tau = tree_auto.expected_tau(acceptance, *fixed)
    fixed_speedup = (fixed_tau / tree_auto.step_seconds(costs, *fixed)
                     * costs.verify_seconds(1))
    print(json.dumps({
        "shape": args.shape, "dtype": cfg.dtype, "batch": batch, "prefix": args.prefix,
        "cache_len": cache_len, "timing_s": round(timing_s, 2),
        "costs_ms": {"draft_pass": {k: v * 1e3 for k, v in costs.draft_pass.items()},
                     "verify": {k: v * 1e3 for k, v in costs.verify.items()},
                     "overhead": costs.overhead * 1e3},
        **choice.to_json(), "fixed_6_10_60_expected_tau": round(fixed_tau, 4),
        "fixed_6_10_60_expected_speedup": round(fixed_speedup, 4),
        "acceptance": acceptance.source, **meta}))


if __name__ == "__main__":
  main()
