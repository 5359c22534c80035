"""Slot surgery on decoding states for continuous batching: write freshly prefilled rows
into chosen batch slots of a running state, and grow its caches, on device.

A state is any pytree of arrays whose leaves carry the batch on axis 0, except KVCache
buffers (batch on axis 1: [layers, batch, kv_heads, slots, head_dim]) and scalars (loop
counters, kept from the running state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fspad_jax.model import KVCache

Array = jax.Array


def _is_cache(x) -> bool:
  return isinstance(x, KVCache)


def insert_rows(state, rows, slots: Array):
  """state with rows' batch entries written at batch indices `slots` ([n] int32; n = rows'
  batch; a repeated slot must carry identical rows): one scatter per leaf, in place when the
  state is donated. Both are the same pytree type; caches have the same number of slots."""
  def put(big, small):
    if _is_cache(big):
      return KVCache(k=big.k.at[:, slots].set(small.k), v=big.v.at[:, slots].set(small.v),
                     lengths=big.lengths.at[slots].set(small.lengths))
    if jnp.ndim(big) == 0:
      return big
    return big.at[slots].set(small)
  return jax.tree.map(put, state, rows, is_leaf=_is_cache)


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
  """The cache with zero slots appended up to max_len (>= its size)."""
  extra = max_len - cache.max_len
  if extra < 0:
    raise ValueError(f"cannot shrink a cache of {cache.max_len} slots to {max_len}")
  if extra == 0:
    return cache
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))
  return cache.replace(k=pad(cache.k), v=pad(cache.v))


class CompiledOnDemand:
  """Base of the slot-function classes (generate.VanillaSlots, speculative.SpecSlots): jitted
  functions made on first use per static key; `compiled_last` says whether the last lookup
  had to make (compile) one."""

  def __init__(self):
    self._compiled: dict = {}
    self.compiled_last = False

  def _jit(self, key, make):
    self.compiled_last = key not in self._compiled
    if self.compiled_last:
      self._compiled[key] = make()
    return self._compiled[key]

  def gather_rows(self, arrays, slots):
    """Host copies of the rows `slots` (a list of batch indices) of a pytree of [batch, ...]
    arrays: one jitted gather (the index padded to a power of two by repeating its first
    entry, so few compiled shapes) and one transfer of those rows only."""
    n = len(slots)
    padded = list(slots) + [slots[0]] * (pow2(n) - n)
    fn = self._jit(("gather_rows", len(padded), jax.tree.structure(arrays)),
                   lambda: jax.jit(lambda a, idx: jax.tree.map(lambda x: x[idx], a)))
    rows = jax.device_get(fn(arrays, jnp.asarray(padded, jnp.int32)))
    return jax.tree.map(lambda x: np.asarray(x)[:n], rows)


def pow2(n: int) -> int:
  """Smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(n - 1, 0).bit_length()
