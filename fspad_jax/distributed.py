"""Multi-host start-up: one `jax.distributed.initialize` call for train.py and decode.py.

On TPU pods, SLURM and other clusters JAX discovers the processes itself (auto=True). On
plain hosts pass the coordinator explicitly, the same on every host except process_id:

  python train.py ... --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0   # host A
  python train.py ... --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=1   # host B

CPU processes (tests, simulated hosts) use gloo for cross-process collectives.
"""

from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if not explicit and not auto:
    return
  if explicit and None in (coordinator, num_processes, process_id):
    raise ValueError("multi-host needs all of --coordinator, --num_processes, --process_id")
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
