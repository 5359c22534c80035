"""Trains a draft head (FSPAD, EAGLE or an ablation) against a frozen target.

  python train.py --config=configs/llama3_8b.py --workdir=/ckpt/fspad-llama3-8b
  python train.py --config=configs/tiny.py --config.target.path=DIR \
    --config.data.path=FILE --workdir=W --config.train.steps=100

Rerunning with the same --workdir resumes from its latest checkpoint; SIGTERM saves one
last checkpoint and exits cleanly (0), Ctrl-C saves one too and exits 130. Multi-host: run the same command on every host with
--coordinator=HOST:PORT --num_processes=N --process_id=I (or nothing on TPU pods / SLURM,
where jax.distributed discovers them). The logic lives in fspad_jax/trainer.py.
"""

import json
import sys

from fspad_jax import cli, console

console.quiet_imports()  # before transformers is imported

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and prepared data go here.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detection.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup_logging()
  from fspad_jax import distributed
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value)
  from fspad_jax import trainer
  try:
    last = trainer.train(_CONFIG.value, _WORKDIR.value)
  except trainer.USER_ERRORS as e:
    sys.exit(f"train.py: error: {console.one_line(e)}")
  except trainer.TrainingInterrupted as e:
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(130)
  except KeyboardInterrupt:  # before the training loop, or a second Ctrl-C while saving
    print("train.py: interrupted (Ctrl-C) before a checkpoint was saved; rerunning the same "
          "command resumes from the last complete one", file=sys.stderr)
    sys.exit(130)
  print(json.dumps(last, indent=2))


if __name__ == "__main__":
  cli.run(main, "train.py", required=("config", "workdir"))
