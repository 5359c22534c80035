"""Continuous batching: a fixed number of slots (decode.batch_size), each decoding one
prompt; the moment a row finishes, its slot is refilled with the next pending prompt (or
the next turn of a `turns` record) without waiting for the other rows.

One host visit: when the previous stage is used up, prefill the next batch_size pending
prompts in one call (a Stage, at their longest prompt's bucket); run at most `budget` steps
on device, where a slot whose row finishes takes the next staged row at once
(slots.run_with_refills), leaving early only when a slot is free, the stage is used up and
prompts are pending; read back one int32 report vector, then only the finished rows. The
attention span of a visit is a bucket of the longest live or staged row's length plus what
the visit can add, so a step reads the cache slots in use, not the whole cache. The stage
holds up to batch_size prefilled rows at full cache length: KV memory for twice the slots.

Every row keeps its own PRNG key (from the record's seed), so outputs do not depend on the
slot or the neighbours: the same tokens as static batches at T=0, the same samples per
record seed at T>0.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable

import numpy as np

from fspad_jax.decoding.engine import Completion, DecodeEngine, bucket_length
from fspad_jax.generate import FINISH_REASONS
from fspad_jax.slots import pad_pow2, pow2

# Vanilla steps per host visit (speculative: a sixteenth, each step adding up to depth + 1
# slots). Refills happen on device, so the budget only bounds how long a finished row waits
# to be written; a larger one means fewer visits but wider attention spans.
DEFAULT_BUDGET = 128
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
               spans: bool | None = None):
    self.engine = engine
    self.decoder = engine.slot_decoder()
    spt = self.decoder.steps_per_token
    self.budget = budget or max(DEFAULT_BUDGET // (16 if spt > 1 else 1), 1)
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

  def _stage(self, state, items: list[WorkItem], first_ticket: int):
    """Prefills items (at most batch_size) in one call, padded to the longest one's bucket
    and to a power-of-two row count; returns (state, grown if an item needs a longer cache,
    the Stage, whether it compiled)."""
    dec = self.decoder
    lens = [len(item.prompt) for item in items]
    self.engine.check_prompt_lengths(lens)
    need = max(self.cache_len_for(n) for n in lens)
    if need > state_cache_len(state):  # a longer later turn: grow every cache
      state = dec.grow(state, need)
    cache_len = state_cache_len(state)
    padded = min(bucket_length(max(lens), self.engine.settings.min_prompt_bucket), cache_len)
    rows = pad_pow2(items)
    prompt = np.zeros((len(rows), padded), np.int32)  # [rows, padded], right-padded
    for r, item in enumerate(rows):
      prompt[r, :len(item.prompt)] = item.prompt
    col = lambda f: np.asarray([f(item) for item in rows], np.int32)
    tickets = np.arange(first_ticket, first_ticket + len(rows), dtype=np.int32)
    tickets[len(items):] = -1
    stage = dec.stage(prompt, col(lambda w: len(w.prompt)), col(lambda w: w.seed),
                      col(lambda w: w.limit), tickets, len(items), cache_len)
    return state, stage, dec.compiled_last

  def run(self, items: Iterable[WorkItem],
          on_finish: Callable[[WorkItem, Completion], list[WorkItem]]) -> None:
    """Decodes every item; on_finish(item, completion) is called as each row finishes (rows
    displaced on device first, then the slots' finished rows in slot order) and returns
    follow-up items, decoded next (first).

    Host work per visit is O(batch): one prefill of the next batch_size pending items when
    the previous stage is used up, one decode call, one transfer of the report, and one
    gather and transfer of the finished rows."""
    queue = collections.deque(items)
    if not queue:
      return
    dec, batch = self.decoder, self.engine.settings.batch_size
    cache_len = max(self.cache_len_for(len(w.prompt)) for w in queue)
    state, tickets, head = dec.empty(cache_len), dec.empty_tickets(), None
    stage, stage_left, stage_longest, stage_size, stage_count = None, 0, 0, 1, 0
    # ticket -> [item, wall time it was staged, tokens counted so far]: staged or in a slot
    inflight: dict[int, list] = {}
    next_ticket = 0
    lengths = np.zeros(batch, np.int64)  # [batch] cache lengths at the last visit
    live = np.zeros(batch, bool)  # [batch] slots decoding at the last visit
    while queue or inflight:
      t0 = time.perf_counter()
      compiled = False
      if not stage_left and queue:  # prefill the next prompts; they take slots on device
        new = [queue.popleft() for _ in range(min(batch, len(queue)))]
        state, stage, compiled = self._stage(state, new, next_ticket)
        for k, item in enumerate(new):
          inflight[next_ticket + k] = [item, t0, 0]
        stage_size = pow2(len(new))
        next_ticket += stage_size
        stage_count = stage_left = len(new)
        stage_longest = max(len(w.prompt) for w in new)
        head = np.int32(0)
      total_len = state_cache_len(state)
      longest = max(int(lengths[live].max()) if live.any() else 0,
                    stage_longest if stage_left else 0)
      need = longest + self.budget * dec.steps_per_token + dec.reserve
      bucketed = self.spans if self.spans is not None else total_len >= SPAN_MIN_CACHE
      span = span_bucket(need, total_len) if bucketed else total_len
      self.spans_used[span] += 1
      state, tickets, head, out, report = dec.run(state, tickets, stage, head, self.budget,
                                                  span, bool(queue))
      compiled |= dec.compiled_last
      r = dec.read_report(report, stage_size)
      self.device_steps += r["steps"]
      stage_left = stage_count - r["head"]
      lengths = r["lengths"]
      occupied = np.asarray([t in inflight for t in r["tickets"]])
      live = occupied & ~r["done"]
      # Finished rows, read once: those a refill displaced (out rows), then done slots.
      finished = [(j, int(r["out_tickets"][j]), int(r["out_slots"][j]), int(r["out_num"][j]))
                  for j in range(r["evicted"]) if int(r["out_tickets"][j]) in inflight]
      finished += [(stage_size + i, int(t), i, int(r["num"][i]))
                   for i, t in enumerate(r["tickets"]) if r["done"][i] and int(t) in inflight]
      produced = sum(n - inflight[t][2] for _, t, _, n in finished)
      for i in np.flatnonzero(live):
        entry = inflight[int(r["tickets"][i])]
        produced += int(r["num"][i]) - entry[2]
        entry[2] = int(r["num"][i])
      rows = dec.read(state, out, [row for row, _, _, _ in finished]) if finished else []
      compiled |= bool(finished) and dec.compiled_last
      t1 = time.perf_counter()
      self.visits += 1
      self.total += t1 - t0
      if not compiled:
        self.warm += t1 - t0
        self.warm_tokens += produced
      if not (finished or produced or r["steps"]):
        raise RuntimeError("continuous batching made no progress in a host visit")
      followups = []
      for (_, ticket, slot, _), (ids, reason, accepts) in zip(finished, rows):
        item, started, _ = inflight.pop(ticket)
        c = Completion(output_ids=ids, finish_reason=FINISH_REASONS[reason],
                       prompt_tokens=len(item.prompt), decode_time_s=t1 - started,
                       accept_lengths=accepts, slot=slot)
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
