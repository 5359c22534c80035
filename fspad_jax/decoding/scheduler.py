"""Continuous batching: a fixed number of slots (decode.batch_size), each decoding one
prompt; the moment a row finishes, its slot is refilled with the next pending prompt (or
the next turn of a `turns` record) without waiting for the other rows.

One host visit: prefill the waiting prompts into the free slots (a jit per prompt bucket,
written into the slot on device), run at most `budget` steps on device (leaving early when
a row finishes), read back three [batch] vectors, and only the finished rows' tokens. The
attention span of a visit is a bucket of the longest live row's length plus what the visit
can add, so a step reads the cache slots in use, not the whole cache.

Every row keeps its own PRNG key (from the record's seed), so outputs do not depend on the
slot or the neighbours: the same tokens as static batches at T=0, the same samples per
record seed at T>0.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from fspad_jax.decoding.engine import Completion, DecodeEngine, bucket_length
from fspad_jax.generate import FINISH_REASONS
from fspad_jax.slots import pow2

DEFAULT_BUDGET = 32  # vanilla steps per host visit (speculative: a quarter of this)
MIN_SPAN = 64  # smallest attention span
# Span bucketing pays only when the unused part of the cache is large: on CPU XLA the
# per-layer slice of a 192-slot cache cost more than the reads it saved (benchmarks/RESULTS.md,
# "Continuous batching"), so by default caches below this attend over all their slots.
SPAN_MIN_CACHE = 512


@dataclasses.dataclass
class WorkItem:
  """One prompt waiting for a slot."""

  prompt: list[int]
  seed: int  # its sampling seed (engine.record_seed)
  limit: int  # its max new tokens
  tag: Any = None  # the caller's (the job it belongs to)


def span_bucket(n: int, cache_len: int) -> int:
  """Attention span for rows that need n slots: a bucket (2^k or 3 * 2^k, >= MIN_SPAN),
  capped at the cache: few compiled variants."""
  return min(bucket_length(n, MIN_SPAN), cache_len)


class ContinuousScheduler:
  """Drives an engine's slot functions (engine.slot_decoder()) over a queue of WorkItems.

  Timing, as BatchTimer: `total` (every host visit), `warm` and `warm_tokens` (visits that
  compiled nothing, and the tokens they produced); `visits` counts host visits.
  spans: True buckets the attention span, False attends over the whole cache, None (the
  default) buckets it for caches of at least SPAN_MIN_CACHE slots."""

  def __init__(self, engine: DecodeEngine, budget: int | None = None,
               spans: bool | None = None, split_prefill: bool | None = None):
    self.engine = engine
    self.split_prefill = (jax.default_backend() == "cpu" if split_prefill is None
                          else split_prefill)
    self.decoder = engine.slot_decoder()
    spt = self.decoder.steps_per_token
    self.budget = budget or max(DEFAULT_BUDGET // (4 if spt > 1 else 1), 1)
    self.spans = spans
    self.total = self.warm = 0.0
    self.warm_tokens = self.visits = 0
    self.device_steps = 0  # batch steps run on device (every slot advances once per step)
    self.spans_used: collections.Counter = collections.Counter()

  @property
  def compiled_shapes(self) -> int:
    """Slot functions compiled so far (one per function and static shape)."""
    return len(self.decoder._compiled)

  def cache_len_for(self, prompt_len: int) -> int:
    """Cache slots a prompt needs (as static batches size theirs)."""
    return self.engine.batch_shape(prompt_len)[1]

  def _insert(self, state, refill: list[tuple[int, WorkItem]]):
    """Prefills the refill items into their slots; returns (state, whether it compiled).

    One prefill per group of rows, each padded to its longest prompt's bucket, with a row
    count that is a power of two (few compiled shapes). With `split_prefill` (CPU, where a
    prefill costs in proportion to its rows) the items go longest first in power-of-two
    groups (7 = 4 + 2 + 1), so no row is computed twice; otherwise (accelerators, where a
    prefill of a few rows costs one read of the weights) in one call, the row count
    rounded up by repeating the first row."""
    dec = self.decoder
    lens = [len(item.prompt) for _, item in refill]
    self.engine.check_prompt_lengths(lens)
    need = max(self.cache_len_for(n) for n in lens)
    if need > state_cache_len(state):  # a longer later turn: grow every cache
      state = dec.grow(state, need)
    if self.split_prefill:
      refill = sorted(refill, key=lambda r: -len(r[1].prompt))
      sizes = [1 << k for k in reversed(range(len(refill).bit_length()))
               if len(refill) >> k & 1]  # binary digits of len(refill), largest first
    else:
      sizes = [len(refill)]
    compiled, start = False, 0
    for size in sizes:
      group = refill[start:start + size]
      start += size
      rows = group + [group[0]] * (min(pow2(size), self.engine.settings.batch_size) - size)
      padded = min(bucket_length(max(len(w.prompt) for _, w in group),
                                 self.engine.settings.min_prompt_bucket),
                   state_cache_len(state))
      prompt = np.zeros((len(rows), padded), np.int32)  # [n, padded], right-padded
      for r, (_, item) in enumerate(rows):
        prompt[r, :len(item.prompt)] = item.prompt
      col = lambda f: np.asarray([f(i, item) for i, item in rows], np.int32)
      state = dec.insert(state, col(lambda i, _: i), prompt, col(lambda _, w: len(w.prompt)),
                         col(lambda _, w: w.seed), col(lambda _, w: w.limit))
      compiled |= dec.compiled_last
    return state, compiled

  def run(self, items: Iterable[WorkItem],
          on_finish: Callable[[WorkItem, Completion], list[WorkItem]]) -> None:
    """Decodes every item; on_finish(item, completion) is called as each row finishes (in
    slot order within a visit) and returns follow-up items, decoded next (first)."""
    queue = collections.deque(items)
    if not queue:
      return
    dec, batch = self.decoder, self.engine.settings.batch_size
    cache_len = max(self.cache_len_for(len(w.prompt)) for w in queue)
    state = dec.empty(cache_len)
    slots: list[WorkItem | None] = [None] * batch
    started = np.zeros(batch)  # [batch] wall time each slot was refilled
    emitted = np.zeros(batch, np.int64)  # [batch] tokens emitted at the last poll
    lengths = np.zeros(batch, np.int64)  # [batch] cache lengths at the last poll
    done = np.ones(batch, bool)
    while queue or any(s is not None for s in slots):
      t0 = time.perf_counter()
      compiled = False
      refill = []  # (slot, item): the free slots, lowest first, get the next items
      for i in range(batch):
        if slots[i] is None and queue:
          refill.append((i, queue.popleft()))
      if refill:
        state, compiled_insert = self._insert(state, refill)
        compiled |= compiled_insert
        for i, item in refill:
          slots[i], started[i], emitted[i], lengths[i], done[i] = (
              item, t0, 0, len(item.prompt), False)
      live = [i for i in range(batch) if slots[i] is not None and not done[i]]
      if live:
        total_len = state_cache_len(state)
        need = int(lengths[live].max()) + self.budget * dec.steps_per_token + dec.reserve
        bucketed = self.spans if self.spans is not None else total_len >= SPAN_MIN_CACHE
        span = span_bucket(need, total_len) if bucketed else total_len
        self.spans_used[span] += 1
        state = dec.run(state, self.budget, span)
        compiled |= dec.compiled_last
      new_done, num, new_lengths, steps = dec.poll(state)
      self.device_steps += steps if live else 0
      occupied = np.asarray([s is not None for s in slots])
      produced = int(np.sum(np.where(occupied, num - emitted, 0)))
      emitted = np.where(occupied, num, 0)
      lengths, done = np.array(new_lengths), np.array(new_done | ~occupied)
      finished = [i for i in range(batch) if slots[i] is not None and new_done[i]]
      rows = dec.read(state, finished) if finished else []
      compiled |= bool(finished) and dec.compiled_last
      t1 = time.perf_counter()
      self.visits += 1
      self.total += t1 - t0
      if not compiled:
        self.warm += t1 - t0
        self.warm_tokens += produced
      if live and not finished and not produced:
        raise RuntimeError("continuous batching made no progress in a host visit")
      followups = []
      for i, (ids, reason, accepts) in zip(finished, rows):
        item, slots[i] = slots[i], None
        c = Completion(output_ids=ids, finish_reason=FINISH_REASONS[reason],
                       prompt_tokens=len(item.prompt), decode_time_s=t1 - started[i],
                       accept_lengths=accepts, slot=i)
        followups += on_finish(item, c)
      queue.extendleft(reversed(followups))  # finish multi-turn records first


def run_static(engine: DecodeEngine, vanilla: DecodeEngine | None, timer, items: Iterable[WorkItem],
               on_finish: Callable[[WorkItem, Completion, Completion | None], list[WorkItem]]
               ) -> int:
  """Static batches (decode.schedule=static, and --compare_vanilla): batch_size items at a
  time, each batch decoded until its longest row is done. timer: a BatchTimer, or with
  `vanilla` a PairedTimer (both engines decode each batch). on_finish(item, completion,
  vanilla completion or None) returns follow-up items, decoded first. Returns the number
  of batches."""
  queue = collections.deque(items)
  batches = 0
  while queue:
    batch = [queue.popleft() for _ in range(min(engine.settings.batch_size, len(queue)))]
    rows = {"row_seeds": [w.seed for w in batch], "limits": [w.limit for w in batch]}
    prompts = [w.prompt for w in batch]
    if vanilla is not None:
      completions, vanilla_out = timer.run(engine, vanilla, prompts, **rows)
    else:
      completions, vanilla_out = timer.run(engine, prompts, **rows), [None] * len(batch)
    batches += 1
    followups = []
    for item, c, v in zip(batch, completions, vanilla_out):
      followups += on_finish(item, c, v)
    queue.extendleft(reversed(followups))  # finish multi-turn records first
  return batches


def state_cache_len(state) -> int:
  """Target cache slots of a vanilla or speculative slot state."""
  cache = state.cache if hasattr(state, "cache") else state.target_cache
  return cache.max_len
