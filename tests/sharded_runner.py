"""Runs the target on given meshes and saves logits + greedy tokens (for the sharding tests),
and with --continuous_mesh M --draft_dir D the continuous-batching tokens on mesh M.

Launched as a subprocess so it can set its own simulated device count before JAX starts:
  python tests/sharded_runner.py --model_dir D --out F.npz --devices 8 --meshes 8,1,1 1,8,1
Multi-process (jax.distributed on localhost), one command per process:
  python tests/sharded_runner.py ... --devices 4 --num_processes 2 --process_id I \
      --coordinator localhost:PORT
"""

import argparse
import os
import sys


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model_dir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--meshes", nargs="+", required=True)
  ap.add_argument("--draft_dir", default="")
  ap.add_argument("--continuous_mesh", default="",
                  help="with --draft_dir: also decode continuously on this mesh (sharding_case)")
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--coordinator", default=None)
  args = ap.parse_args()

  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import numpy as np
  from sharding_case import continuous_case, forward_all_gathers, run_case

  results = {}
  for m in args.meshes:
    shape = tuple(int(x) for x in m.split(","))
    logits, tokens = run_case(args.model_dir, shape)
    results[f"logits_{m}"] = logits
    results[f"tokens_{m}"] = tokens
    if jax.process_count() == 1:
      results[f"forward_all_gathers_{m}"] = np.array(
          [forward_all_gathers(args.model_dir, shape, seq) for seq in (1, 10)])
  if args.continuous_mesh:
    shape = tuple(int(x) for x in args.continuous_mesh.split(","))
    for key, value in continuous_case(args.model_dir, shape, args.draft_dir).items():
      results[f"continuous_{key}"] = np.asarray(value)
  if jax.process_index() == 0:
    np.savez(args.out, **results)
  print("devices", jax.device_count(), "processes", jax.process_count(), "ok", flush=True)


if __name__ == "__main__":
  main()
