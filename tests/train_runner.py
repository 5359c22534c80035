"""Training steps on given meshes, saved for comparison (for tests/test_train.py).

Launched as a subprocess so it can set its own simulated device count before JAX starts:
  python tests/train_runner.py --model_dir D --out F.npz --devices 8 --meshes 8,1,1 2,2,2
Multi-process (jax.distributed on localhost via fspad_jax.distributed), one command each:
  python tests/train_runner.py ... --devices 4 --num_processes 2 --process_id I \
      --coordinator localhost:PORT
With --train_workdir W --data FILE it also runs the whole loop (trainer.train) on
--train_mesh, as train.py would. The same helpers give the 1-device reference in-process.
"""

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 16, 16  # global batch: 8 rows per micro-batch at grad_accum 2
LOOP_MAX_LEN = 48  # tests/test_train.py prepares its data at this length


TTT_STEPS = 3  # the training-time-test case compared across meshes


def step_config(model_dir: str, mesh_shape, grad_accum: int = 2, kind: str = "fspad",
                global_batch: int = BATCH, ttt_steps: int = 1):
  """configs/tiny.py for a few deterministic steps: no noise, no warmup, no clipping."""
  from fspad_jax.config import load_repo_config
  config = load_repo_config("tiny")
  config.target.path = model_dir
  config.mesh.shape = tuple(mesh_shape)
  config.draft.kind = kind
  t = config.train
  t.global_batch, t.grad_accum = global_batch, grad_accum
  t.learning_rate, t.warmup_steps, t.decay = 1e-3, 0, "constant"
  t.clip, t.noise = "none", 0.0
  t.ttt_steps = ttt_steps
  return config


def step_batch(vocab: int, rows: int = BATCH, seq: int = SEQ, seed: int = 0) -> dict:
  """Random rows with a prompt/answer split and unequal lengths (numpy, [rows, seq])."""
  rs = np.random.RandomState(seed)
  input_ids = rs.randint(5, vocab, (rows, seq)).astype(np.int32)
  lengths = rs.randint(seq // 4, seq + 1, rows).astype(np.int32)
  prompt = rs.randint(1, seq // 2, rows)
  positions = np.arange(seq)[None]
  loss_mask = ((positions >= prompt[:, None]) & (positions < lengths[:, None])).astype(np.int32)
  input_ids = np.where(positions < lengths[:, None], input_ids, 1).astype(np.int32)
  return {"input_ids": input_ids, "loss_mask": loss_mask, "length": lengths}


def train_steps(config, steps: int = 2, devices=None, batch: dict | None = None,
                target=None):
  """`steps` jitted train steps on one fixed batch with the trainer's own pieces
  (build_setup, init_train_state, make_train_step). Returns (setup, state, metrics list)."""
  import jax
  from fspad_jax import train_lib, trainer
  from fspad_jax.sharding import host_to_global
  from fspad_jax.target import Target

  if target is None:
    target = Target.from_pretrained(config.target.path, mesh_shape=tuple(config.mesh.shape),
                                    dtype=config.target.dtype, devices=devices)
  setup = trainer.build_setup(config, target)
  t = config.train
  micro = t.global_batch // t.grad_accum
  batch = batch if batch is not None else step_batch(target.cfg.vocab_size, t.global_batch)
  stacked = train_lib.stack_micro_batches(batch, t.grad_accum)
  placed = {k: host_to_global(v, setup.batch_sharding(v.ndim, micro=True))
            for k, v in stacked.items()}
  state = train_lib.init_train_state(setup, t.seed)
  shardings = setup.state_shardings(jax.eval_shape(lambda: state))
  step_fn = train_lib.make_train_step(setup, shardings, micro, batch["input_ids"].shape[1])
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, target.params, placed)
    history.append({k: np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
  return setup, state, history


def flat_params(params) -> dict:
  """{"['layer']['mlp']['down_kernel']": numpy array} (gathered from every process)."""
  import jax
  from fspad_jax.sharding import to_host
  return {jax.tree_util.keystr(path): to_host(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def run_steps(config, steps: int = 2, devices=None) -> dict:
  """train_steps as one flat dict of numpy arrays: "<metric>_<step>" and "param/<path>"."""
  _, state, history = train_steps(config, steps, devices)
  out = {f"{k}_{i}": v for i, metrics in enumerate(history) for k, v in metrics.items()}
  out.update({f"param/{k}": v for k, v in flat_params(state.params).items()})
  return out


def train_loop_config(model_dir: str, data_path: str, prepared_dir: str, mesh_shape):
  """configs/tiny.py for a short whole-loop run (trainer.train) on a given mesh."""
  from fspad_jax.config import load_repo_config
  config = load_repo_config("tiny")
  config.target.path, config.data.path = model_dir, data_path
  config.data.prepared_dir, config.data.max_len = prepared_dir, LOOP_MAX_LEN
  config.mesh.shape = tuple(mesh_shape)
  t = config.train
  t.steps, t.log_every, t.eval_every, t.checkpoint_every = 4, 2, 4, 2
  t.eval_batches, t.depths, t.tensorboard, t.warmup_steps = 1, 1, False, 0
  t.ttt_steps = 2  # the unrolled loss on 2 processes and on 8 devices
  return config


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model_dir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--meshes", nargs="*", default=[])
  ap.add_argument("--ttt_meshes", nargs="*", default=[])  # also with ttt_steps=TTT_STEPS
  ap.add_argument("--num_processes", type=int, default=1)
  ap.add_argument("--process_id", type=int, default=0)
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--train_workdir", default=None)
  ap.add_argument("--train_mesh", default="2,2,2")
  ap.add_argument("--data", default=None)
  ap.add_argument("--prepared_dir", default=None)
  ap.add_argument("--check_validation", action="store_true")
  args = ap.parse_args()

  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, REPO)
  import jax
  from fspad_jax import distributed
  if args.num_processes > 1:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  results = {}
  for m in args.meshes:
    shape = tuple(int(x) for x in m.split(","))
    for k, v in run_steps(step_config(args.model_dir, shape)).items():
      results[f"{m}/{k}"] = v
  for m in args.ttt_meshes:
    shape = tuple(int(x) for x in m.split(","))
    for k, v in run_steps(step_config(args.model_dir, shape, ttt_steps=TTT_STEPS)).items():
      results[f"ttt/{m}/{k}"] = v
  if args.check_validation:  # errors that need more than one device
    from fspad_jax import trainer
    from fspad_jax.config import ConfigError
    cases = {"batch": ((8, 1, 1), {"global_batch": 12}),
             "accum_batch": ((2, 2, 2), {"global_batch": 16, "grad_accum": 8}),
             "eval_batch": ((1, 4, 2), {"eval_batch_size": 6}),
             "mesh": ((3, 1, 1), {})}
    for name, (mesh, train_overrides) in cases.items():
      config = train_loop_config(args.model_dir, args.data, "", mesh)
      config.train.update(train_overrides)
      try:
        trainer.validate_config(config)
        results[f"validation/{name}"] = "no error"
      except ConfigError as e:
        results[f"validation/{name}"] = f"ConfigError: {e}"
  if args.train_workdir:
    from fspad_jax import trainer
    shape = tuple(int(x) for x in args.train_mesh.split(","))
    config = train_loop_config(args.model_dir, args.data, args.prepared_dir, shape)
    trainer.train(config, args.train_workdir, progress=False)
  if jax.process_index() == 0:
    np.savez(args.out, **results)
  print("devices", jax.device_count(), "processes", jax.process_count(), "ok", flush=True)


if __name__ == "__main__":
  main()
