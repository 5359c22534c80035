"""Draft-training throughput, MFU and peak memory, and where the step's time goes.

Builds a target of the chosen shape with random weights, an FSPAD (or other) draft head,
and random token batches (no dataset), then times the jitted train step of
fspad_jax.train_lib after warm-up, the target's part alone (forward + LM head + soft
targets, as the step computes them), and one batch of the validation agreement pass
(train_lib.make_agreement_fn: top-1/top-3 at draft depths 1..--eval_depths, own features
fed back). Prints one JSON record.

  # lent GPU(s), Llama-3-8B shapes (random bf16 weights), 2048-token rows, FSDP over all
  # local devices (configs/llama3_8b.py:gpu8's mesh), 2 rows per device:
  python benchmarks/train_bench.py --shape=llama3_8b
  # CPU, small shape (float32; < 1 minute on 2 cores):
  python benchmarks/train_bench.py
  # CPU, the real-text `mini` preset's shapes (d=256, 4 layers, vocab 8,192, 4 x 384 rows):
  python benchmarks/train_bench.py --shape=mini

MFU = train_lib.flops_per_step / step time / (peak FLOP/s x devices). Peak FLOP/s: on
accelerators the dense bf16 peak of the device kind (trainer.PEAK_FLOPS); on CPU it is
MEASURED here with a large float32 matmul (so CPU MFU is relative to what XLA's matmul
reaches on this machine, not to a datasheet). Peak memory: on GPU/TPU the devices'
memory_stats()["peak_bytes_in_use"] (max over local devices); on CPU the process's
resource.getrusage ru_maxrss (host RSS, which includes Python and XLA itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_bench  # noqa: E402
from decode_bench import timeit  # noqa: E402

from fspad_jax import train_lib  # noqa: E402
from fspad_jax.config import ModelConfig, RopeConfig  # noqa: E402
from fspad_jax.draft import DRAFT_KINDS, abstract_draft, draft_config_from_target  # noqa: E402
from fspad_jax.hf_checkpoint import param_shardings  # noqa: E402
from fspad_jax.model import abstract_model, init_model  # noqa: E402
from fspad_jax.sharding import ShardingRules, host_to_global, make_mesh  # noqa: E402
from fspad_jax.trainer import PEAK_FLOPS  # noqa: E402

SHAPES = {
    "llama3_8b": decode_bench.SHAPES["llama3_8b"],
    # ~26M params, vocab 8192: a training step of 4 x 128 tokens takes ~1 s on 2 CPU cores
    # (decode_bench's "small" is a 124M decode shape).
    "small": lambda: ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                 num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64,
                                 rope=RopeConfig(theta=500000.0), dtype="float32"),
    # configs/realtext.py:mini's target (its tokenizer's 8,192 ids) and draft rows.
    "mini": lambda: ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=896,
                                num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                                rope=RopeConfig(theta=500000.0), dtype="float32"),
    "tiny": decode_bench.SHAPES["tiny"],
}
DEFAULT_SEQ = {"llama3_8b": 2048, "small": 128, "mini": 384, "tiny": 64}


def measured_cpu_peak_flops(n=2048, iters=5) -> float:
  """FLOP/s of a jitted float32 n x n x n matmul on the default (CPU) device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2.0 * n ** 3 / timeit(lambda: matmul(a, b), warmup=2, iters=iters)


def peak_flops_per_device() -> tuple[float, str]:
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measured_cpu_peak_flops(), "measured: jitted float32 2048^3 matmul on this CPU"
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return flops, f"datasheet dense bf16 peak for {name} (fspad_jax.trainer.PEAK_FLOPS)"
  return 0.0, f"unknown device kind {device.device_kind!r}: MFU not reported"


def peak_memory_bytes() -> tuple[int, str]:
  if jax.devices()[0].platform == "cpu":
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "host peak RSS (resource.getrusage ru_maxrss)")
  peaks = [d.memory_stats().get("peak_bytes_in_use", 0) for d in jax.local_devices()]
  return int(max(peaks)), "max over local devices of memory_stats()['peak_bytes_in_use']"


def random_target(cfg: ModelConfig, mesh, rules: ShardingRules, seed: int = 0):
  """(graphdef, params) with random weights, created directly in their shardings."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  shardings = param_shardings(abstract, mesh, rules)
  params = jax.jit(lambda: nnx.split(init_model(cfg, seed))[1], out_shardings=shardings)()
  return graphdef, params


def random_batch(vocab: int, rows: int, seq: int, grad_accum: int, seed: int = 0) -> dict:
  """Full-length rows of random tokens; the loss covers all but a quarter-row 'prompt'."""
  rs = np.random.RandomState(seed)
  batch = {"input_ids": rs.randint(0, vocab, (rows, seq)).astype(np.int32),
           "loss_mask": np.broadcast_to(np.arange(seq) >= seq // 4, (rows, seq)).astype(np.int32),
           "length": np.full((rows,), seq, np.int32)}
  return train_lib.stack_micro_batches(batch, grad_accum)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
  ap.add_argument("--kind", default="fspad", choices=DRAFT_KINDS)
  ap.add_argument("--seq", type=int, default=0, help="row length (0 = the shape's default)")
  ap.add_argument("--batch", type=int, default=0,
                  help="global batch in rows (0 = 4 on CPU, 2 per device otherwise)")
  ap.add_argument("--grad_accum", type=int, default=1)
  ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (-1: the rest)")
  ap.add_argument("--dtype", default=None, help="target dtype override (e.g. bfloat16)")
  ap.add_argument("--draft_dtype", default=None, help="draft compute dtype (default: target's)")
  ap.add_argument("--eval_depths", type=int, default=5,
                  help="draft depths of the agreement pass (0: do not time it)")
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args()

  cfg = SHAPES[args.shape]()
  if args.dtype:
    cfg = cfg.replace(dtype=args.dtype)
  seq = args.seq or DEFAULT_SEQ[args.shape]
  on_cpu = jax.devices()[0].platform == "cpu"
  batch_rows = args.batch or (4 if on_cpu else 2 * jax.device_count())
  mesh = make_mesh(tuple(int(x) for x in args.mesh.split(",")))
  rules = ShardingRules()
  dcfg = draft_config_from_target(cfg, args.kind, dtype=args.draft_dtype or cfg.dtype)

  t0 = time.perf_counter()
  target_graphdef, target_params = random_target(cfg, mesh, rules)
  optimizer, schedule = train_lib.make_optimizer(train_lib.OptimConfig(
      learning_rate=5e-5, warmup_steps=10, total_steps=1000, grad_accum=args.grad_accum))
  setup = train_lib.TrainSetup(
      target_cfg=cfg, target_graphdef=target_graphdef, target_params=target_params,
      draft_cfg=dcfg, draft_graphdef=nnx.split(abstract_draft(dcfg))[0], mesh=mesh,
      rules=rules, optimizer=optimizer, learning_rate=schedule,
      loss_cfg=train_lib.LossConfig(), grad_accum=args.grad_accum)
  state = train_lib.init_train_state(setup, 0)
  shardings = setup.state_shardings(jax.eval_shape(lambda: state))
  micro = batch_rows // args.grad_accum
  step_fn = train_lib.make_train_step(setup, shardings, micro, seq)
  batch = {k: host_to_global(v, setup.batch_sharding(v.ndim, micro=True))
           for k, v in random_batch(cfg.vocab_size, batch_rows, seq, args.grad_accum).items()}

  def target_part(params, micro_batch):
    """The step's target work for one micro-batch: features, LM head, soft targets."""
    target = nnx.merge(target_graphdef, params)
    out = train_lib.target_outputs(target, micro_batch["input_ids"], micro_batch["loss_mask"],
                                   micro_batch["length"])
    embeddings = train_lib.shifted_embeddings(target, micro_batch["input_ids"])
    # Reductions keep every output computed without returning [batch, seq, vocab] arrays.
    return (jnp.sum(out.features.astype(jnp.float32)), jnp.sum(out.next_probs[..., 0]),
            jnp.sum(out.next_token), jnp.sum(embeddings.astype(jnp.float32)))

  target_fn = jax.jit(target_part)

  def run_target():
    return [target_fn(target_params, {k: v[i] for k, v in batch.items()})
            for i in range(args.grad_accum)]

  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step_fn(holder["state"], target_params, batch)
    return metrics

  t_compile = time.perf_counter()
  jax.block_until_ready(run_step())  # compile
  jax.block_until_ready(run_target())
  compile_s = time.perf_counter() - t_compile
  step_s = timeit(run_step, warmup=1, iters=args.iters)
  target_s = timeit(run_target, warmup=1, iters=args.iters)
  eval_s = None
  if args.eval_depths:  # one validation batch: the global batch's rows, no micro-batch axis
    agreement_fn = train_lib.make_agreement_fn(setup, depths=args.eval_depths)
    eval_batch = {k: host_to_global(v[0], setup.batch_sharding(v.ndim - 1))
                  for k, v in random_batch(cfg.vocab_size, batch_rows, seq, 1, seed=1).items()}
    eval_s = timeit(lambda: agreement_fn(holder["state"].params, target_params, eval_batch),
                    warmup=1, iters=args.iters)

  tokens = batch_rows * seq
  flops = train_lib.flops_per_step(cfg, dcfg, tokens, seq)
  peak, peak_source = peak_flops_per_device()
  memory, memory_source = peak_memory_bytes()
  record = {
      "shape": args.shape, "kind": args.kind, "target_dtype": cfg.dtype,
      "draft_dtype": dcfg.dtype, "mesh": dict(mesh.shape), "global_batch": batch_rows,
      "seq": seq, "grad_accum": args.grad_accum,
      "target_params_M": round(cfg.num_params / 1e6, 2),
      "draft_params_M": round(dcfg.num_params / 1e6, 2),
      "step_ms": round(step_s * 1e3, 2),
      "target_tokens_per_s": round(tokens / step_s, 1),
      "target_forward_ms": round(target_s * 1e3, 2),
      "draft_and_update_ms": round((step_s - target_s) * 1e3, 2),
      "target_forward_fraction": round(target_s / step_s, 3),
      "eval_depths": args.eval_depths,
      "agreement_eval_ms": None if eval_s is None else round(eval_s * 1e3, 2),
      "flops_per_step": flops, "achieved_tflops": round(flops / step_s / 1e12, 4),
      "peak_tflops_per_device": round(peak / 1e12, 4), "peak_flops_source": peak_source,
      "mfu": round(flops / step_s / (peak * jax.device_count()), 4) if peak else None,
      "peak_memory_GB": round(memory / 1e9, 3), "peak_memory_source": memory_source,
      "compile_and_first_call_s": round(compile_s, 1),
      "setup_s": round(t_compile - t0, 1), "iters": args.iters,
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "backend": jax.default_backend(), "jax": jax.__version__,
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
  }
  print(json.dumps(record))


if __name__ == "__main__":
  main()
