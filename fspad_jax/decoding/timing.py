"""Decode-time accounting for a job: BatchTimer (one engine), PairedTimer (speculative
against vanilla on the same batches, interleaved warm calls)."""

from __future__ import annotations

import numpy as np

from fspad_jax.decoding.engine import Completion, DecodeEngine


class BatchTimer:
  """Decode time of one engine over a run: all calls, and warm (compile-free) calls."""

  def __init__(self):
    self.total = self.warm = 0.0
    self.warm_tokens = 0

  def run(self, engine: DecodeEngine, prompts, seed: int = 0, **rows) -> list[Completion]:
    """One batch; its time counts as warm unless the call compiled. rows: per-row
    row_seeds / limits (DecodeEngine.generate_batch)."""
    out = engine.generate_batch(prompts, seed=seed, **rows)
    self.total += out[0].decode_time_s
    if not engine.last_call_compiled:
      self.warm += out[0].decode_time_s
      self.warm_tokens += sum(c.new_tokens for c in out)
    return out


class PairedTimer:
  """Speculative against vanilla decode time on the same batches (--compare_vanilla).

  Each batch is decoded by both engines, alternating, until each has `repeats` warm calls
  (a call that compiled is not timed); the batch contributes the median time of each.
  Interleaving exposes both to the same machine load. `total` (the calls whose outputs are
  kept, compilation included), `warm` and `warm_tokens` describe the speculative side, as
  in BatchTimer."""

  def __init__(self, repeats: int):
    self.repeats = repeats
    self.total = self.warm = self.vanilla_warm = 0.0
    self.warm_tokens = self.vanilla_warm_tokens = self.timed_batches = 0

  def _call(self, engine: DecodeEngine, prompts, seed: int, times: list[float], rows):
    out = engine.generate_batch(prompts, seed=seed, **rows)
    if not engine.last_call_compiled:
      times.append(out[0].decode_time_s)
    return out

  def run(self, engine: DecodeEngine, vanilla: DecodeEngine, prompts, seed: int = 0, **rows
          ) -> tuple[list[Completion], list[Completion]]:
    """One batch: (speculative completions, vanilla completions). Repeated calls use the
    same seed, so they reproduce the same outputs."""
    spec_times, vanilla_times = [], []
    out = self._call(engine, prompts, seed, spec_times, rows)
    vanilla_out = self._call(vanilla, prompts, seed, vanilla_times, rows)
    self.total += out[0].decode_time_s
    while len(spec_times) < self.repeats or len(vanilla_times) < self.repeats:
      if len(spec_times) < self.repeats:
        self._call(engine, prompts, seed, spec_times, rows)
      if len(vanilla_times) < self.repeats:
        self._call(vanilla, prompts, seed, vanilla_times, rows)
    self.timed_batches += 1
    self.warm += float(np.median(spec_times))
    self.vanilla_warm += float(np.median(vanilla_times))
    self.warm_tokens += sum(c.new_tokens for c in out)
    self.vanilla_warm_tokens += sum(c.new_tokens for c in vanilla_out)
    return out, vanilla_out

  def summary(self) -> dict:
    """Tokens/s of each side from the per-batch medians; speedup = their ratio."""
    spec, vanilla = (tokens_per_s(self.warm_tokens, self.warm),
                     tokens_per_s(self.vanilla_warm_tokens, self.vanilla_warm))
    return {"decode_time_s": round(self.warm, 4),
            "vanilla_decode_time_s": round(self.vanilla_warm, 4),
            "tokens_per_s": spec, "vanilla_tokens_per_s": vanilla,
            "speedup": round(spec / vanilla, 4) if spec and vanilla else None,
            "timing": f"median of {self.repeats} interleaved warm calls per batch "
                      f"({self.timed_batches} batch{'es' if self.timed_batches != 1 else ''});"
                      f" speedup = tokens/s ratio"}


def tokens_per_s(tokens: int, seconds: float) -> float | None:
  return round(tokens / seconds, 2) if seconds else None
