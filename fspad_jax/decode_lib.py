"""Batch decoding jobs: JSONL prompts in, JSONL completions out, resumable.

The library behind `decode.py`, usable from a notebook:

  >>> config = get_config()  # e.g. configs/tiny.py, with config.target.path set
  >>> engine = DecodeEngine(config)  # loads the target once, keeps compiled functions
  >>> summary = run_decode(config, "prompts.jsonl", "out.jsonl", engine=engine)
  >>> engine.generate([[0, 17, 42], [0, 5]])  # or decode token ids directly

Each input line holds an `id` and exactly one of `prompt` (raw text), `messages` (a chat),
`turns` (user messages answered in sequence, MT-bench style) or `input_ids`. Prompts are
decoded on `decode.batch_size` slots with continuous batching (fspad_jax/decoding/scheduler.py;
`decode.schedule=continuous`, the default): a row's slot is refilled with the next prompt, or
the next turn of a `turns` record, as soon as it finishes. Prompts are right-padded to a
bucketed length (at least `decode.min_prompt_bucket`), so one compiled prefill serves each
bucket. `decode.schedule=static` decodes batches instead (a short batch is filled with copies
of its first row, discarded), each until its longest row is done. Each record's turn samples
with its own seed (run seed, id, turn), so outputs do not depend on the schedule, the slot or
the neighbours. Records are written as they finish (in completion order, not input order).
Each output line is written whole, then flushed and fsync'ed; a rerun skips the ids already
written and drops a partial last line.

Decoding methods are looked up in `METHODS` by `decode.method`: "vanilla" (target only), and
"eagle" / "fspad", lossless tree speculative decoding (fspad_jax.speculative) with the draft
at `draft.path` (a train.py workdir, one step's Orbax checkpoint or an EAGLE-layout
directory; it must match the target's hidden size and vocabulary, and its kind the method)
and the tree `decode.tree_depth` (D), `decode.tree_top_k` (K), `decode.total_tokens`. With
`decode.cache_len` 0 the target cache leaves room for a tree (speculative.cache_len_for);
a smaller fixed cache ends rows early with finish_reason "cache_full".

Output records add `mean_accept_len` (tokens committed per target forward after the
prefill: the mean of accepted + 1 over its verify steps; null without any step),
`target_forwards` (verify steps + 1 for the prefill) and, for speculative methods,
`accept_lengths` (accepted draft tokens of each verify step). Vanilla records count one
forward per token: target_forwards = new_tokens and mean_accept_len 1.0. `turns` records
hold them per turn, and pooled over the turns at the top level.

`run_decode(..., compare_vanilla=True)` (decode.py --compare_vanilla) decodes static batches
(the paired timing needs the same work on both sides) and decodes every batch with vanilla
decoding (a second engine sharing the loaded target weights) and reports
the speedup, the ratio of tokens/s, from warm calls only: both engines decode each batch
`decode.timing_repeats` times without compiling, alternating, and each batch contributes
the median time of each (PairedTimer). Greedy runs also check that the outputs are identical
(`vanilla_match` per record, mismatches listed in the summary with the id, the first
differing position and, for `turns`, the turn; each later turn's prompt is built from the
speculative answers and decoded by both). Sampled runs report only the speed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from fspad_jax import console
from fspad_jax.decoding.engine import (METHODS, Completion, DecodeEngine, bucket_length,
                                       default_stop_token_ids, record_seed)
from fspad_jax.decoding.output_guard import OutputLock, check_settings, job_settings
from fspad_jax.decoding.records import (OutputScan, Problem, Record, JsonlWriter,
                                        check_input_path, check_output_path, id_key,
                                        load_records, scan_output, too_long_reason)
from fspad_jax.decoding.scheduler import ContinuousScheduler, WorkItem, run_static
from fspad_jax.decoding.settings import (MIN_BUCKET, TIMING_REPEATS, USER_ERRORS, DecodeError,
                                         DecodeSettings, check_seed, config_value,
                                         decode_settings, resolve_target_path)
from fspad_jax.decoding.timing import BatchTimer, PairedTimer, tokens_per_s
from fspad_jax.decoding.tree_auto import format_choice as format_tree_choice
from fspad_jax.generate import FINISH_REASONS

# The job's public surface; the pieces live in fspad_jax/decoding/.
__all__ = ["run_decode", "format_summary", "DecodeEngine", "DecodeError", "DecodeInterrupted",
           "DecodeSettings",
           "Completion", "METHODS", "MIN_BUCKET", "TIMING_REPEATS", "USER_ERRORS",
           "bucket_length", "decode_settings", "default_stop_token_ids"]

MAX_REPORTED_PROBLEMS = 100  # malformed lines listed in the summary (all are counted)


def _mean_accept(committed: int, steps: int) -> float | None:
  return round(committed / steps, 4) if steps else None


def _completion_dict(c: Completion, text: str | None) -> dict:
  d = {"output_ids": c.output_ids, "text": text, "new_tokens": c.new_tokens,
       "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
       "mean_accept_len": _mean_accept(c.committed, c.steps),
       "target_forwards": c.target_forwards}
  if c.accept_lengths is not None:
    d["accept_lengths"] = c.accept_lengths
  d["decode_time_s"] = round(c.decode_time_s, 6)
  return d


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
  """First position where two token lists differ (the shorter length for a proper prefix);
  None when equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


# --------------------------------------------------------------------------- job


@dataclasses.dataclass
class _Job:
  """A record in flight: its current prompt and, for `turns`, the chat so far."""

  record: Record
  prompt: list[int]
  results: list[tuple[Completion, str | None]] = dataclasses.field(default_factory=list)
  messages: list[dict] = dataclasses.field(default_factory=list)
  vanilla: list[Completion] = dataclasses.field(default_factory=list)  # --compare_vanilla

  @property
  def committed_steps(self) -> tuple[int, int]:
    return (sum(c.committed for c, _ in self.results), sum(c.steps for c, _ in self.results))

  def mismatches(self) -> list[dict]:
    """Turns whose output differs from vanilla decoding of the same prompt."""
    out = []
    for k, ((c, _), v) in enumerate(zip(self.results, self.vanilla)):
      pos = first_difference(c.output_ids, v.output_ids)
      if pos is not None:
        m = {"id": self.record.id, "position": pos, "finish_reason": c.finish_reason,
             "vanilla_finish_reason": v.finish_reason}
        if self.record.kind == "turns":
          m["turn"] = k + 1
        out.append(m)
    return out

  def output(self, check_vanilla: bool = False) -> dict:
    rid = self.record.id
    if self.record.kind != "turns":
      (c, text), = self.results
      out = {"id": rid, **_completion_dict(c, text)}
    else:
      turns = [_completion_dict(c, t) for c, t in self.results]
      out = {"id": rid, "turns": turns, "new_tokens": sum(t["new_tokens"] for t in turns),
             "mean_accept_len": _mean_accept(*self.committed_steps),
             "target_forwards": sum(t["target_forwards"] for t in turns),
             "decode_time_s": round(sum(c.decode_time_s for c, _ in self.results), 6)}
    if check_vanilla:
      out["vanilla_match"] = not self.mismatches()
    return out


def _config_dict(config) -> Any:
  """The config as JSON-able data (ConfigDict or plain nested dicts)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else config
  return json.loads(json.dumps(raw, default=str))


def _default_log(msg: str) -> None:
  console.write(msg)


class DecodeInterrupted(KeyboardInterrupt):
  """Ctrl-C during a job; the message says what the output holds (decode.py prints it)."""


def run_decode(config, input_path: str, output_path: str, *, strict: bool = False,
               seed: int | None = None, progress: bool = True,
               engine: DecodeEngine | None = None,
               log: Callable[[str], None] | None = None,
               compare_vanilla: bool = False, allow_changed_settings: bool = False) -> dict:
  """Decodes every input record whose id is not yet in `output_path`; returns the summary
  (also written to `<output>.summary.json`).

  Malformed lines are reported through `log` with their line number and skipped, or with
  `strict` abort the job (DecodeError) before anything is decoded. `engine` reuses a
  DecodeEngine built from this config (then `config` may be None); `seed` overrides
  decode.seed. `compare_vanilla` also decodes each batch with vanilla decoding (see the
  module docstring). Raises DecodeError when no record was decoded because every one was
  skipped (malformed, or too long for the cache), after writing the summary.

  The job owns the output while it runs (`<output>.lock`; DecodeError when another job
  holds it), and adds to an output only records decoded with its settings
  (`<output>.settings.json`, output_guard.job_settings) unless `allow_changed_settings`.
  Ctrl-C raises DecodeInterrupted (a KeyboardInterrupt) saying what was written; the output
  then ends with a whole record."""
  t_start = time.perf_counter()
  log = log or _default_log
  settings = engine.settings if engine is not None else decode_settings(config)
  run_seed = settings.seed if seed is None else check_seed(seed)
  check_input_path(input_path)
  check_output_path(output_path, input_path)
  import jax
  is_writer = jax.process_index() == 0  # multi-host: process 0 writes the output
  with OutputLock(output_path, log) if is_writer else contextlib.nullcontext():
    scan, changed = _check_output(config if engine is None else engine.config, engine,
                                  settings, output_path, is_writer, allow_changed_settings,
                                  log)
    try:
      return _decode_job(config, input_path, output_path, settings, run_seed, scan, changed,
                         is_writer, t_start, strict=strict, progress=progress, engine=engine,
                         log=log, compare_vanilla=compare_vanilla)
    except KeyboardInterrupt:
      raise DecodeInterrupted(_interrupted(output_path, scan.done, is_writer)) from None


def _check_output(config, engine: DecodeEngine | None, settings: DecodeSettings,
                  output_path: str, is_writer: bool, allow_changed: bool,
                  log: Callable[[str], None]) -> tuple[OutputScan, list[str]]:
  """Reads what the output holds (dropping a partial last line) and checks that this job
  may add to it; returns the scan and the settings keys changed on purpose."""
  scan = scan_output(output_path, truncate=is_writer)
  if scan.partial:
    log(f"{output_path}: dropped a partial last line (an interrupted write); its record "
        f"is decoded again")
  if scan.duplicates:
    key, lines = next(iter(scan.duplicates.items()))
    log(f"warning: {output_path}: {len(scan.duplicates)} id(s) have more than one record "
        f"(first: id {key} on lines {', '.join(map(str, lines))}), e.g. by two jobs "
        f"that wrote it at once; none is decoded again, and readers see every copy")
  model_dir = (engine.model_dir if engine is not None else
               resolve_target_path(config_value(config, "target.path")))
  changed = check_settings(output_path, job_settings(config, settings, model_dir),
                           has_records=bool(scan.done), allow_changed=allow_changed,
                           write=is_writer, log=log)
  return scan, changed


def _interrupted(output_path: str, done_before: set[str], is_writer: bool) -> str:
  """What an interrupted job leaves, in one line."""
  if not is_writer:
    return "interrupted (Ctrl-C); process 0 writes the output"
  total = len(scan_output(output_path, truncate=False).done)
  return (f"interrupted (Ctrl-C): {total - len(done_before)} record(s) written to "
          f"{output_path} by this run, {total} in all, each line whole; rerun the same "
          f"command to decode the rest")


def _decode_job(config, input_path: str, output_path: str, settings: DecodeSettings,
                run_seed: int, scan: OutputScan, changed_settings: list[str],
                is_writer: bool, t_start: float, *, strict: bool, progress: bool,
                engine: DecodeEngine | None, log: Callable[[str], None],
                compare_vanilla: bool) -> dict:
  """run_decode's job once the output is owned and checked."""
  done, partial = scan.done, scan.partial
  if engine is None:
    engine = DecodeEngine(config)
  tree_auto = engine.tree_auto
  if tree_auto is not None and tree_auto["choice"] == "vanilla":
    engine = engine.vanilla_engine()  # decode.tree=auto: no tree is expected to pay
  settings = engine.settings  # decode.tree=auto: the chosen tree
  vanilla = engine.vanilla_engine() if compare_vanilla else None
  greedy_check = vanilla is not None and settings.sampling.temperature == 0
  t_loaded = time.perf_counter()
  records, problems, blank = load_records(input_path, engine)
  if problems and strict:
    raise DecodeError(problems[0].where(input_path) + " (--strict)")
  for p in problems:
    log(f"{p.where(input_path)} (skipped)")
  pending = [r for r in records if id_key(r.id) not in done]

  writer = JsonlWriter(output_path) if is_writer else None
  jobs = [_Job(r, r.input_ids) for r in pending]
  stats = collections.Counter()
  depth_hits = np.zeros(settings.tree_depth + 1, np.int64)  # [D+1]: steps accepting >= d
  record_taus, mismatches = [], []
  bar = console.progress(len(pending), f"decode[{unit_name(engine)}]", "rec",
                         enabled=progress)

  def finish(job: _Job, c: Completion) -> list[_Job]:
    """Books one decoded turn; writes the record when it is complete. Returns [job] when
    its next turn is to be decoded."""
    text = engine.decode_text(c.output_ids)
    job.results.append((c, text))
    stats["new_tokens"] += c.new_tokens
    stats["prompt_tokens"] += c.prompt_tokens
    stats["steps"] += c.steps
    stats["committed"] += c.committed
    stats["target_forwards"] += c.target_forwards
    stats[f"finish_{c.finish_reason}"] += 1
    if c.accept_lengths:
      a = np.minimum(np.asarray(c.accept_lengths), settings.tree_depth)
      depth_hits[:] += np.bincount(a, minlength=settings.tree_depth + 1)[::-1].cumsum()[::-1]
    rec = job.record
    if rec.kind == "turns" and len(job.results) < len(rec.turns):
      nxt = _next_turn(job, text, engine)
      if not isinstance(nxt, Problem):
        return [job]
      if strict:
        raise DecodeError(nxt.where(input_path) + " (--strict)")
      log(f"{nxt.where(input_path)} (skipped)")
      problems.append(nxt)
      stats["failed"] += 1
    else:
      committed, steps = job.committed_steps
      if steps:
        record_taus.append(committed / steps)
      if greedy_check:
        bad = job.mismatches()
        mismatches.extend(bad)
        stats["checked"] += 1
        stats["matched"] += not bad
      if writer is not None:
        writer.write(job.output(check_vanilla=greedy_check))
      stats["decoded"] += 1
    bar.update(1)
    if timer.warm:  # compile-free calls only
      bar.set_postfix_str(f"{stats['decoded']} done, {timer.warm_tokens / timer.warm:.1f} tok/s")
    return []

  def work(job: _Job) -> WorkItem:
    return WorkItem(job.prompt, record_seed(run_seed, id_key(job.record.id), len(job.results)),
                    settings.max_new_tokens, job)

  def finish_static(item: WorkItem, c: Completion, v: Completion | None) -> list[WorkItem]:
    if v is not None:  # --compare_vanilla: the same prompt decoded by vanilla
      item.tag.vanilla.append(v)
      stats["vanilla_new_tokens"] += v.new_tokens
    return [work(j) for j in finish(item.tag, c)]

  # --compare_vanilla times both methods on the same static batches (PairedTimer).
  static = vanilla is not None or settings.schedule == "static"
  if static:
    timer = PairedTimer(settings.timing_repeats) if vanilla is not None else BatchTimer()
  else:
    timer = ContinuousScheduler(engine)
  try:
    if static:
      stats["batches"] = run_static(engine, vanilla, timer, map(work, jobs), finish_static)
    else:
      timer.run(map(work, jobs), lambda item, c: [work(j) for j in finish(item.tag, c)])
  finally:
    bar.close()
    if writer is not None:
      writer.close()

  wall = time.perf_counter() - t_start
  steps = stats["steps"]
  summary = {
      "method": settings.method,
      "input": input_path,
      "output": output_path,
      "input_lines": len(records) + len(problems) - stats["failed"],
      "blank_lines": blank,
      "records": len(records),
      "decoded": stats["decoded"],
      "skipped_done": len(records) - len(pending),
      "malformed": len(problems),
      "problems": [{"line": p.line, "reason": p.reason}
                   for p in problems[:MAX_REPORTED_PROBLEMS]],
      "recovered_partial_line": partial,
      "duplicate_ids_in_output": len(scan.duplicates),
      "changed_settings": changed_settings,  # kept on purpose (--allow_changed_settings)
      "new_tokens": stats["new_tokens"],
      "prompt_tokens": stats["prompt_tokens"],
      "finish_reasons": {r: stats[f"finish_{r}"] for r in FINISH_REASONS.values()
                         if stats[f"finish_{r}"]},
      "schedule": "static" if static else "continuous",
      "batches": stats["batches"],  # static schedule: batch calls
      "host_visits": None if static else timer.visits,  # continuous: device loop calls
      # Compiled functions: static batches, one per (prompt bucket, cache); continuous, one
      # per slot function and shape (prompt bucket, attention span, cache).
      "compiled_shapes": len(engine.compiled_shapes) if static else timer.compiled_shapes,
      # The calls whose outputs are kept (compilation included, timing repeats not).
      "decode_time_s": round(timer.total, 4),
      "tokens_per_s": tokens_per_s(stats["new_tokens"], timer.total) or 0.0,
      "tokens_per_s_excl_compile": tokens_per_s(timer.warm_tokens, timer.warm),
      # Target forwards: prefill + verify steps (vanilla: one per token).
      "target_forwards": stats["target_forwards"],
      "verify_steps": steps,
      # Tokens committed per verify step, pooled over all steps, and the mean of per-record
      # values (records with at least one step).
      "tau": _mean_accept(stats["committed"], steps),
      "tau_per_record_mean": (round(float(np.mean(record_taus)), 4) if record_taus
                              else None),
      # Element d-1: fraction of verify steps that accepted >= d draft tokens, d = 1..D.
      "acceptance_by_depth": ([round(float(x) / steps, 4) for x in depth_hits[1:]]
                              if settings.speculative and steps else None),
      "tree": settings.tree_dict(),
      "tree_auto": tree_auto and {**tree_auto, "decoded_with": settings.method,
                                  "measured_tau": _mean_accept(stats["committed"], steps)
                                  if settings.speculative else None},
      "draft": engine.draft_info,
      "load_time_s": round(t_loaded - t_start, 4),
      "wall_time_s": round(wall, 4),
      "seed": run_seed,
      "strict": strict,
      "stop_token_ids": list(engine.stop_token_ids),
      "config": _config_dict(engine.config),
  }
  if vanilla is not None:
    summary["compare_vanilla"] = {
        **timer.summary(),  # warm calls only, interleaved, medians
        "vanilla_new_tokens": stats["vanilla_new_tokens"],
        "greedy": greedy_check,
        "checked": stats["checked"] if greedy_check else None,
        "matched": stats["matched"] if greedy_check else None,
        "mismatches": mismatches[:MAX_REPORTED_PROBLEMS] if greedy_check else None,
    }
  if is_writer:
    tmp = output_path + ".summary.json.tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, output_path + ".summary.json")
  if not summary["decoded"] and not summary["skipped_done"]:
    raise DecodeError(_nothing_decoded(summary, input_path))
  return summary


def _nothing_decoded(summary: dict, input_path: str) -> str:
  """Why a job decoded nothing, in one line (the summary file lists every problem)."""
  if not summary["malformed"]:
    return (f"{input_path} holds no record to decode"
            + (f" (only {summary['blank_lines']} blank line(s))" if summary["blank_lines"]
               else ""))
  first = summary["problems"][0]
  return (f"no record was decoded: all {summary['malformed']} input record(s) were skipped "
          f"(first: {input_path}:{first['line']}: {first['reason']}); details in "
          f"{summary['output']}.summary.json")


def _num(x, fmt: str = ".1f") -> str:
  return "-" if x is None else format(x, fmt)


def format_summary(summary: dict) -> str:
  """A run's summary for people, in a few lines (the full one is <output>.summary.json)."""
  skipped = [f"{summary['malformed']} malformed or too long"] if summary["malformed"] else []
  if summary["skipped_done"]:
    skipped.append(f"{summary['skipped_done']} already in the output")

  lines = [f"decode[{summary['draft']['kind'] if summary['draft'] else summary['method']}]: "
           f"{summary['decoded']} records decoded"
           + (f" ({', '.join(skipped)} skipped)" if skipped else "")
           + f", {summary['new_tokens']} new tokens, "
           f"{_num(summary['tokens_per_s_excl_compile'])} tokens/s excluding compilation "
           f"({_num(summary['tokens_per_s'])} with it)"]
  if summary["acceptance_by_depth"] is not None:
    lines.append(f"tau {_num(summary['tau'], '.2f')} tokens per target forward; acceptance "
                 "by depth " + " ".join(f"{a:.2f}" for a in summary["acceptance_by_depth"]))
  if summary.get("tree_auto"):
    lines.append(format_tree_choice(summary["tree_auto"], summary["tree_auto"]["measured_tau"]))
  cmp = summary.get("compare_vanilla")
  if cmp:
    lines.append(f"vs vanilla: speedup {_num(cmp['speedup'], '.2f')}x "
                 f"({_num(cmp['tokens_per_s'])} vs {_num(cmp['vanilla_tokens_per_s'])} "
                 f"tokens/s, {cmp['timing']})")
    lines.append(f"greedy outputs equal to vanilla: {cmp['matched']}/{cmp['checked']} records"
                 if cmp["greedy"] else "sampled: outputs not compared with vanilla")
  if summary.get("duplicate_ids_in_output"):
    lines.append(f"warning: {summary['duplicate_ids_in_output']} ids have more than one record "
                 f"in the output")
  lines.append(f"outputs: {summary['output']} (summary: {summary['output']}.summary.json)")
  return "\n".join(lines)


def unit_name(engine: DecodeEngine) -> str:
  """What a decoding engine runs, by draft kind (fs_only, pad_only, ...) or 'vanilla'."""
  return engine.draft_info["kind"] if engine.draft_info else engine.settings.method


def _next_turn(job: _Job, answer: str | None, engine: DecodeEngine) -> list[int] | Problem:
  """Moves a `turns` job to its next user message (answer appended to the chat); returns
  the new prompt, or a Problem when it does not fit."""
  rec = job.record
  k = len(job.results)  # index of the next turn
  if not job.messages:
    job.messages = [{"role": "user", "content": rec.turns[0]}]
  job.messages += [{"role": "assistant", "content": (answer or "").strip()},
                   {"role": "user", "content": rec.turns[k]}]
  try:
    ids = engine.encode_chat(job.messages)
  except ValueError as e:
    return Problem(rec.line, f"turn {k + 1}: {e}")
  if len(ids) > engine.max_prompt_len:
    return Problem(rec.line, f"turn {k + 1}: {too_long_reason(len(ids), engine)}")
  job.prompt = ids
  return ids
