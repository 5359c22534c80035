"""Time of the token-distribution processor (sampling.processed_probs) per call.

Every sampled vanilla token and every sampled verify step runs it once on the target's
logits ([batch, nodes, vocab]); with top-k it runs a top-k over each row, with top-p a sort.
Random logits, one jitted call timed after warm-up; one JSON record per setting.

  # CPU: a batch-4 verify at the real-text mini vocabulary, and one 60-node tree verify at
  # Llama-3's 128,256 ids (both < 1 minute on 2 cores):
  python benchmarks/sampling_bench.py --shape 4,17,8192 1,61,128256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_bench import timeit  # noqa: E402
from step_ops import audit_hlo  # noqa: E402

from fspad_jax.sampling import SamplingParams, processed_probs  # noqa: E402

SETTINGS = {  # name -> SamplingParams
    "t1": SamplingParams(temperature=1.0),
    "t0.8_topk20": SamplingParams(temperature=0.8, top_k=20),
    "t0.7_topp0.9": SamplingParams(temperature=0.7, top_p=0.9),
}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", nargs="+", default=["4,17,8192", "1,61,128256"],
                  help="logits shapes, comma-separated (last = vocabulary)")
  ap.add_argument("--settings", nargs="+", default=sorted(SETTINGS), choices=sorted(SETTINGS))
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args(argv)
  for text in args.shape:
    shape = tuple(int(x) for x in text.split(","))
    logits = jnp.asarray(np.random.RandomState(0).randn(*shape).astype(np.float32))
    for name in args.settings:
      params = SETTINGS[name]
      fn = jax.jit(lambda x, p=params: processed_probs(x, p))
      audit = audit_hlo(fn.lower(logits).compile().as_text())
      record = {
          "shape": list(shape), "setting": name,
          "ms_per_call": round(timeit(fn, logits, warmup=1, iters=args.iters) * 1e3, 3),
          # sorts in the compiled call: top-p needs one per row; top-k should need none
          "sorts": audit["sorts"], "topk_kernels": audit["custom_calls"].get("TopK", 0),
          "iters": args.iters, "device": jax.devices()[0].device_kind,
          "backend": jax.default_backend(), "jax": jax.__version__,
          "python": platform.python_version(), "cpu_count": os.cpu_count()}
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
