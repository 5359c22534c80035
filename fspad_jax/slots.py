"""Continuous batching on device: a decode loop that moves freshly prefilled rows (a Stage)
into the slots whose rows finished, without a host visit; and cache growth.

A state is any pytree of arrays whose leaves carry the batch on axis 0, except KVCache
buffers (batch on axis 1: [layers, batch, kv_heads, slots, head_dim]) and scalars (loop
counters, kept from the running state). On a mesh, every slot function is jitted with
explicit shardings (slot_shardings): rows split over the mesh's batch axes, caches in the
target's cache layout (KV heads over `tensor`), scalars and host-read results replicated."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fspad_jax.model import KVCache
from fspad_jax.sharding import ShardingRules, host_to_global, replicated

Array = jax.Array


def _is_cache(x) -> bool:
  return isinstance(x, KVCache)


def slot_shardings(tree, mesh, rules: ShardingRules):
  """NamedShardings for a slot-state pytree (arrays or their eval_shape): KVCache buffers
  in the `kv_cache` layout, other arrays split over `batch` on axis 0, scalars replicated.
  A dimension the mesh axes do not divide is replicated (ShardingRules.spec)."""
  def one(x):
    if _is_cache(x):
      return x.shardings(mesh, rules)
    if not x.shape:
      return replicated(mesh)
    return rules.sharding(mesh, ("batch",) + (None,) * (len(x.shape) - 1), x.shape)
  return jax.tree.map(one, tree, is_leaf=_is_cache)


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
  """The cache with zero slots appended up to max_len (>= its size)."""
  extra = max_len - cache.max_len
  if extra < 0:
    raise ValueError(f"cannot shrink a cache of {cache.max_len} slots to {max_len}")
  if extra == 0:
    return cache
  return cache.replace(kv=jnp.pad(cache.kv, ((0, 0),) * 4 + ((0, extra), (0, 0))))


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


def pow2(n: int) -> int:
  """Smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(n - 1, 0).bit_length()


def pad_pow2(items: list) -> list:
  """`items` padded to a power-of-two length by repeating its first element (padding rows
  that are computed and never taken: fewer compiled shapes)."""
  return list(items) + [items[0]] * (pow2(len(items)) - len(items))


# ---------------------------------------------------------------- refills on device


class Stage(NamedTuple):
  """Prefilled rows waiting for slots: the host prefills the next pending prompts in one call,
  and the decode loop moves a row into a slot the moment that slot's row finishes."""

  rows: Any  # a state pytree of `size` rows (prefilled, at the slot state's cache length)
  tickets: Array  # [size] int32: the host's id of each row's prompt (-1: padding)
  count: Array  # scalar int32: rows 0..count-1 are real


def take_rows(state, rows, src: Array, take: Array):
  """state with slot i replaced by rows[src[i]] where take[i] ([batch] int32 / bool): a
  gather from `rows` and a scatter of the taken slots only (in place inside a loop)."""
  dst = jnp.where(take, jnp.arange(take.shape[0]), take.shape[0])  # [batch]; batch: dropped

  def put(big, small):
    if _is_cache(big):
      return KVCache(kv=big.kv.at[:, dst].set(small.kv[:, src], mode="drop"),
                     lengths=big.lengths.at[dst].set(small.lengths[src], mode="drop"))
    if jnp.ndim(big) == 0:
      return big
    return big.at[dst].set(small[src], mode="drop")
  return jax.tree.map(put, state, rows, is_leaf=_is_cache)


def run_with_refills(state, tickets: Array, stage: Stage, head: Array, budget: Array,
                     more_pending: Array, run_inner, done_of, results_of):
  """Up to `budget` decode steps over the slots (traceable; one host visit), refilling each
  slot whose row is done from `stage` (rows head.. of it, lowest slot first) without leaving
  the device.

  run_inner(state, steps) runs at most that many steps and leaves when a row finishes
  (its `.step`: the steps it ran). A finished row is copied into an out buffer when its
  slot is refilled, so the host can still read it. The loop leaves at the budget, when no
  step can run (every slot done, or a row at the attention span), or when a slot is free,
  the stage is used up and the host has more prompts (more_pending).

  tickets [batch] int32: each slot's prompt id (-1: never filled). Returns (state, tickets,
  head, out, out_tickets [size, 2] (ticket, slot), evicted (scalar: rows 0..evicted-1 of out
  are real), steps): out holds results_of(row) of each finished row that a refill displaced."""
  size = stage.tickets.shape[0]
  out = jax.tree.map(lambda x: jnp.zeros((size,) + x.shape[1:], x.dtype), results_of(state))
  out_tickets = jnp.full((size, 2), -1, jnp.int32)  # [size, (ticket, slot)]

  def refill(carry):
    state, tickets, head, out, out_tickets, evicted = carry
    free = done_of(state)  # [batch]: finished or idle slots
    rank = jnp.cumsum(free) - 1  # [batch]: order among the free slots
    take = free & (rank < stage.count - head)
    src = jnp.clip(head + rank, 0, size - 1)  # [batch] stage row for each taken slot
    evict = take & (tickets >= 0)  # finished rows about to be overwritten
    dst = jnp.where(evict, evicted + jnp.cumsum(evict) - 1, size)  # [batch] out row
    out = jax.tree.map(lambda o, r: o.at[dst].set(r, mode="drop"), out, results_of(state))
    out_tickets = out_tickets.at[dst].set(
        jnp.stack([tickets, jnp.arange(tickets.shape[0], dtype=jnp.int32)], 1), mode="drop")
    state = take_rows(state, stage.rows, src, take)
    tickets = jnp.where(take, stage.tickets[src], tickets)
    taken = jnp.sum(take, dtype=jnp.int32)
    return state, tickets, head + taken, out, out_tickets, evicted + jnp.sum(evict, dtype=jnp.int32)

  def body(carry):
    state, tickets, head, out, out_tickets, evicted, steps, _ = carry
    can_take = jnp.any(done_of(state)) & (head < stage.count)
    state, tickets, head, out, out_tickets, evicted = jax.lax.cond(
        can_take, refill, lambda c: c, (state, tickets, head, out, out_tickets, evicted))
    state = run_inner(state, budget - steps)
    return state, tickets, head, out, out_tickets, evicted, steps + state.step, state.step > 0

  def cond(carry):
    state, _, head, _, _, _, steps, ran = carry
    wants_host = jnp.any(done_of(state)) & (head >= stage.count) & more_pending
    return ran & (steps < budget) & ~wants_host

  carry = (state, tickets, head, out, out_tickets, jnp.int32(0), jnp.int32(0), jnp.bool_(True))
  state, tickets, head, out, out_tickets, evicted, steps, _ = jax.lax.while_loop(
      cond, body, carry)
  return state, tickets, head, out, out_tickets, evicted, steps


class SlotDecoder(CompiledOnDemand):
  """Base of the slot functions of continuous batching (generate.VanillaSlots,
  speculative.SpecSlots): a state of `batch` slots, each decoding one prompt; prefilled
  prompts wait in a Stage and take a slot on device the moment it frees.

  Subclasses set `batch`, `mesh` (None: plain jit on the default device) and `rules`, and
  define the traceable hooks: _args() (the arrays every call takes: weights),
  _empty(args, cache_len) -> a state of idle slots, _grow(state, cache_len) -> the state
  with longer caches, _init_rows(args, prompt, lengths, seeds, limits, cache_len) -> a
  state of prefilled rows, _run_inner(args, state, steps, span) -> state after at most
  `steps` steps, leaving when a row finishes (`.step`: the steps run), _results(state) ->
  (tokens [batch, n], num [batch], ...) of each row, _lengths(state) -> [batch] cache
  lengths; and on the host _finish(row) -> (token ids, finish code, accept lengths or
  None) of one results row. Every call is jitted once per static shape with explicit
  shardings (slot_shardings; the weights as they lie), the slot state donated."""

  batch: int
  mesh: Any = None
  rules: ShardingRules = ShardingRules()

  def _placed_jit(self, fn, weights, inputs: tuple, host_outputs=(), donate_argnums=()):
    """jax.jit(fn) for fn(weights, *inputs) (weights=None: fn(*inputs)) with explicit
    shardings over self.mesh: the inputs as they lie (the weights as loaded; states as the
    slot functions made them; host values as _place put them), the outputs as
    slot_shardings gives them, except outputs whose index is in host_outputs ("all":
    every output), replicated: results the host reads."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate_argnums)
    mesh, rules = self.mesh, self.rules
    args = inputs if weights is None else (weights,) + tuple(inputs)
    in_sh = jax.tree.map(lambda x: x.sharding, args)
    out_sh = slot_shardings(jax.eval_shape(fn, *args), mesh, rules)
    if host_outputs == "all":
      out_sh = jax.tree.map(lambda _: replicated(mesh), out_sh)
    elif host_outputs:
      out_sh = tuple(jax.tree.map(lambda _: replicated(mesh), o) if i in host_outputs else o
                     for i, o in enumerate(out_sh))
    return jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh,
                   donate_argnums=donate_argnums)

  def _place(self, *host_values, replicate: bool = False):
    """Host arrays (identical on every process) as device arrays, laid out as
    slot_shardings says, or replicated; each process fills its own shards."""
    if self.mesh is None:
      return tuple(jnp.asarray(x) for x in host_values)
    shapes = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in host_values)
    shardings = (jax.tree.map(lambda _: replicated(self.mesh), shapes) if replicate
                 else slot_shardings(shapes, self.mesh, self.rules))
    return tuple(host_to_global(np.asarray(x), sh) for x, sh in zip(host_values, shardings))

  def empty(self, cache_len: int):
    """Every slot idle (done) with an empty cache of cache_len slots."""
    args = self._args()
    fn = self._jit(("empty", cache_len), lambda: self._placed_jit(
        lambda a: self._empty(a, cache_len), args, ()))
    return fn(args)

  def grow(self, state, cache_len: int):
    """The state with every cache grown to cache_len slots (zeros appended)."""
    fn = self._jit(("grow", self._cache_len(state), cache_len), lambda: self._placed_jit(
        lambda s: self._grow(s, cache_len), None, (state,)))
    return fn(state)

  def stage(self, prompt: np.ndarray, lengths: np.ndarray, seeds: np.ndarray,
            limits: np.ndarray, tickets: np.ndarray, count: int, cache_len: int) -> Stage:
    """Prefills prompts [n, padded] (right-padded; rows count.. are padding) in one call."""
    n, padded = prompt.shape
    args = self._args()
    inputs = self._place(*(np.asarray(x, np.int32) for x in
                           (prompt, lengths, seeds, limits, tickets, count)))

    def prefill(args, prompt, lengths, seeds, limits, tickets, count):
      return Stage(self._init_rows(args, prompt, lengths, seeds, limits, cache_len),
                   tickets, count)
    fn = self._jit(("stage", n, padded, cache_len),
                   lambda: self._placed_jit(prefill, args, inputs))
    return fn(args, *inputs)

  def run(self, state, tickets: Array, stage: Stage, head: Array, budget: int, span: int,
          more_pending: bool):
    """One host visit on device (run_with_refills). Returns (state, tickets, head, out,
    report): report is one int32 vector, [done, num, lengths, tickets] per slot, then
    out_tickets' [tickets, slots, num] per out row, then (head, evicted, steps); unpack it
    with read_report after one transfer."""
    size = stage.tickets.shape[0]
    args = self._args()
    if isinstance(head, (int, np.integer)):  # the host's start of a new stage
      head, = self._place(np.int32(head))
    budget, more = self._place(np.int32(budget), np.bool_(more_pending))

    def visit(args, state, tickets, stage, head, budget, more):
      state, tickets, head, out, out_tickets, evicted, steps = run_with_refills(
          state, tickets, stage, head, budget, more,
          lambda s, k: self._run_inner(args, s, k, span), lambda s: s.done, self._results)
      i32 = lambda x: x.astype(jnp.int32)
      report = jnp.concatenate([
          i32(state.done), i32(self._results(state)[1]), i32(self._lengths(state)), tickets,
          out_tickets[:, 0], out_tickets[:, 1], i32(out[1]), jnp.stack([head, evicted, steps])])
      return state, tickets, head, out, report
    inputs = (state, tickets, stage, head, budget, more)
    fn = self._jit(("run", span, self._cache_len(state), size), lambda: self._placed_jit(
        visit, args, inputs, host_outputs=(2, 4), donate_argnums=(1, 2)))
    return fn(args, *inputs)

  def read_report(self, report, size: int) -> dict:
    """The host copy of a run's report, unpacked into named numpy vectors."""
    r = np.asarray(jax.device_get(report))
    b = self.batch
    cut = np.cumsum([b, b, b, b, size, size, size])
    done, num, lengths, tickets, out_tickets, out_slots, out_num, tail = np.split(r, cut)
    return {"done": done.astype(bool), "num": num, "lengths": lengths, "tickets": tickets,
            "out_tickets": out_tickets, "out_slots": out_slots, "out_num": out_num,
            "head": int(tail[0]), "evicted": int(tail[1]), "steps": int(tail[2])}

  def read(self, state, out, rows: list[int]) -> list[tuple[list[int], int, list[int] | None]]:
    """The results of the given rows only, by index into [out rows..., slots...] (slot i is
    row len(out) + i): one jitted gather, one transfer; each as _finish gives it."""
    n = len(rows)
    idx, = self._place(np.asarray(pad_pow2(rows), np.int32), replicate=True)

    def gather(out, state, idx):
      both = jax.tree.map(lambda o, r: jnp.concatenate([o, r]), out, self._results(state))
      return jax.tree.map(lambda x: x[idx], both)
    out_rows = jax.tree.leaves(out)[0].shape[0]
    fn = self._jit(("read", idx.shape[0], out_rows, jax.tree.structure(out),
                    self._cache_len(state)),
                   lambda: self._placed_jit(gather, None, (out, state, idx), host_outputs="all"))
    got = jax.device_get(fn(out, state, idx))
    return [self._finish([np.asarray(x)[k] for x in got]) for k in range(n)]

  def empty_tickets(self) -> Array:
    """[batch] int32 -1: no slot has held a prompt."""
    return self._place(np.full((self.batch,), -1, np.int32))[0]
