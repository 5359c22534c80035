"""Device mesh and logical-axis sharding rules.

Every array in fspad_jax names its dimensions with logical axes ("embed", "heads", ...).
`ShardingRules` maps each logical axis to zero or more mesh axes of a (data, fsdp, tensor)
mesh. The rules are checked once against every logical layout the code uses: a rule set
that would place one mesh axis on two dimensions of the same array is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical layouts used by the model code; `ShardingRules.validate` checks them all.
LOGICAL_LAYOUTS: dict[str, tuple[str | None, ...]] = {
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("norm",),
    "q_kernel": ("embed", "heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "kv_kernel": ("embed", None, "kv_heads", "head_dim"),
    "kv_bias": (None, "kv_heads", "head_dim"),
    "o_kernel": ("heads", "head_dim", "embed"),
    "gate_up_kernel": ("embed", None, "mlp"),
    "down_kernel": ("mlp", "embed"),
    "act_tokens": ("batch", "seq"),
    "block_mask": ("batch", "seq", None),
    "act_hidden": ("batch", "seq", "act_embed"),
    "act_logits": ("batch", "seq", "act_vocab"),
    "act_heads": ("batch", "seq", "act_heads", "head_dim"),
    "kv_cache": (None, "batch", None, "act_kv_heads", "cache_seq", "head_dim"),  # [L,b,K|V,..]
    "batch_vector": ("batch",),
    # Draft heads (fspad_jax/draft.py): EAGLE's fc on [embedding; feature], stacked [2, d, d].
    "draft_fc_kernel": (None, "embed", None),
    # FSPAD's feature-sampling W_gate / W_up, stacked first [2, d, d_ff] (draft.py).
    "fs_gate_up_kernel": (None, "embed", "mlp"),
}


class ShardingError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> mesh axes. Unlisted logical axes are replicated."""

  batch: tuple[str, ...] = ("data", "fsdp")
  embed: tuple[str, ...] = ("fsdp",)
  heads: tuple[str, ...] = ("tensor",)
  kv_heads: tuple[str, ...] = ("tensor",)
  mlp: tuple[str, ...] = ("tensor",)
  vocab: tuple[str, ...] = ("tensor",)
  # Activations: heads split over tensor like the weights; the model dim stays whole.
  act_heads: tuple[str, ...] = ("tensor",)
  act_kv_heads: tuple[str, ...] = ("tensor",)
  act_vocab: tuple[str, ...] = ("tensor",)
  act_embed: tuple[str, ...] = ()
  seq: tuple[str, ...] = ()
  cache_seq: tuple[str, ...] = ()
  head_dim: tuple[str, ...] = ()
  norm: tuple[str, ...] = ()

  def __post_init__(self):
    self.validate()

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    if logical is None:
      return ()
    if not hasattr(self, logical):
      raise ShardingError(f"unknown logical axis {logical!r}")
    return getattr(self, logical)

  def validate(self, layouts: dict[str, Sequence[str | None]] | None = None) -> None:
    """Refuses a rule set that maps two logical axes of one array to the same mesh axis."""
    for field in dataclasses.fields(self):
      for ax in getattr(self, field.name):
        if ax not in MESH_AXES:
          raise ShardingError(f"rule {field.name}={getattr(self, field.name)}: unknown mesh "
                              f"axis {ax!r} (mesh axes are {MESH_AXES})")
    for name, layout in (layouts or LOGICAL_LAYOUTS).items():
      seen: dict[str, str] = {}
      for logical in layout:
        for ax in self.mesh_axes(logical):
          if ax in seen:
            raise ShardingError(
                f"sharding rules map logical axes {seen[ax]!r} and {logical!r} of {name} "
                f"{tuple(layout)} to the same mesh axis {ax!r}")
          seen[ax] = logical

  def spec(self, layout: Sequence[str | None], shape: Sequence[int] | None = None,
           mesh: jax.sharding.Mesh | None = None) -> P:
    """PartitionSpec for a logical layout. With shape and mesh, a dimension that the mesh
    axes do not divide is replicated instead (e.g. 8 KV heads on a 16-way tensor axis)."""
    parts = []
    for i, logical in enumerate(layout):
      axes = tuple(self.mesh_axes(logical))
      if mesh is not None:
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
          axes = ()
      parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*parts)

  def sharding(self, mesh, layout, shape=None) -> NamedSharding:
    return NamedSharding(mesh, self.spec(layout, shape, mesh))


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices: Iterable | None = None
              ) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over all devices (or `devices`); one entry may be -1.

  Axis types are spelled out as Auto: the model code places arrays through jit in/out
  shardings and sharding constraints rather than explicit-sharding types."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise ShardingError(f"mesh shape {shape} must have 3 entries: (data, fsdp, tensor)")
  devices = list(jax.devices() if devices is None else devices)
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if math.prod(shape) != len(devices):
    raise ShardingError(
        f"mesh shape {shape} (data, fsdp, tensor) needs {math.prod(shape)} devices, "
        f"but {len(devices)} are available")
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host array, identical on every process, as a global sharded array.
  Works single- and multi-process: each process fills only its addressable shards."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-process sharded) array to every host as numpy."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
