"""Regenerates training conversations with the target: the user turns stay, every answer
becomes the target's own (EAGLE-3 / HASS / Medusa-style self-distillation data).

  python -m fspad_jax.regenerate --config=configs/tiny.py --config.target.path=DIR \
    --input=conversations.json --output=regen.jsonl [--limit=N] [--max_turns=N]
  # speculative decoding gives the same file at temperature 0, faster on a GPU:
  ... --config.decode.method=fspad --config.draft.path=WORKDIR
  # sampling and answer length come from the config's decode section:
  ... --config.decode.temperature=0.7 --config.decode.max_new_tokens=512

Input: any file train.py reads (fspad_jax.data.load_conversations: a ShareGPT JSON list or
JSONL, `conversations: [{from, value}]` or `messages: [{role, content}]`); bad records are
counted by kind, as there. Output: ShareGPT JSONL that train.py reads directly
(`--config.data.path=regen.jsonl`), one line per conversation in input order:
`{"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}], "regen": {"line",
"finish_reasons", "stopped"?}}`.

The rule. System and user messages are kept in order, the original answers are dropped, and
each user turn is followed by the target's answer to the regenerated conversation before it
(so a user turn that had no answer, e.g. a trailing one, gets one; a reply before the first
user turn disappears). Blank messages are dropped. `max_turns` (0 = all) keeps the first N
user turns. A conversation stops early, keeping the turns before, when a prompt no longer
fits the target's context (prompt + decode.max_new_tokens [+ the draft tree] within
max_position_embeddings or decode.cache_len) or when the target's answer is empty (after
stripping whitespace, as data.py and the chat template do); one that keeps no answer is not
written. Both are logged (one line each, the first few) and counted. Answers cut at
decode.max_new_tokens are kept (finish_reason "length" in `regen.finish_reasons`).

How. Turn by turn, through the project's batched decoder (decode_lib.run_decode with one
DecodeEngine: vanilla, or eagle / fspad tree speculative decoding with draft.path; greedy
output is identical). Round k decodes the k-th answer of every conversation still going, as
`input_ids` records whose prompt is DecodeEngine.encode_chat of the regenerated conversation
so far: the target's tokenizer with target.chat_template, which is what train.py's data
preparation renders with (keep target.chat_template the same in both configs).

Resuming. Round k appends to <output>.work/turn<k>.jsonl (run_decode's fsync'ed output;
a rerun skips the conversations already there and drops a partial last line), in parts of
PART_BATCHES batches, so a kill loses at most the batch in flight and nothing is decoded
twice. <output> itself is written at the end, whole (temp file + rename), with
<output>.provenance.json: the source file (path, size, sha256), the target (directory,
config.json sha256, weight files), the chat template's hash, the draft, the decode
settings, and the counts. A rerun with other settings (source, target, method, sampling,
max_new_tokens, limit, max_turns, seed) into the same output is refused in one line.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from typing import Callable, Sequence

from fspad_jax import console

PART_BATCHES = 16  # batches per run_decode call: the resume and time-budget granularity
MAX_LOGGED = 10  # stopped conversations logged one line each (all are counted)
WORK_SUFFIX, PROVENANCE_SUFFIX = ".work", ".provenance.json"
ROLE_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


class RegenError(ValueError):
  """A user error (input, output, settings), as one line naming the culprit."""


@dataclasses.dataclass
class Source:
  """One input conversation, as the messages before each answer."""

  id: str
  line: int  # of the record in the input file
  turns: list[list[dict]]  # per answer: the system messages before it, then a user message


@dataclasses.dataclass
class Progress:
  """What has been regenerated of one conversation."""

  answers: list[str] = dataclasses.field(default_factory=list)
  finish_reasons: list[str] = dataclasses.field(default_factory=list)
  stopped: str | None = None  # why it ended before its last turn


def split_turns(messages: Sequence[dict], max_turns: int = 0) -> list[list[dict]]:
  """Messages (roles system/user/assistant) -> per user turn, the system and user message
  that precede its answer; answers, blank messages and trailing system messages dropped."""
  turns, pending = [], []
  for m in messages:
    if m["role"] == "assistant" or not m["content"].strip():
      continue
    pending.append({"role": m["role"], "content": m["content"]})
    if m["role"] == "user":
      turns.append(pending)
      pending = []
  return turns[:max_turns] if max_turns else turns


def load_sources(path: str, limit: int = 0, max_turns: int = 0):
  """(sources, bad-record report, records without a user turn) of the first `limit`
  (0 = all) usable conversations; ids made unique (`<id>~<n>`, `line<N>` without one)."""
  from fspad_jax.data import load_conversations
  conversations, report = load_conversations(path, require_assistant=False)
  sources, no_user, seen = [], 0, collections.Counter()
  for conv in conversations:
    turns = split_turns(conv.messages, max_turns)
    if not turns:
      no_user += 1
      continue
    base = conv.record_id if conv.record_id is not None else f"line{conv.line}"
    rid = base if not seen[base] else f"{base}~{seen[base]}"
    seen[base] += 1
    sources.append(Source(rid, conv.line, turns))
    if limit and len(sources) >= limit:
      break
  return sources, report, no_user


def chat_so_far(source: Source, answers: Sequence[str], k: int) -> list[dict]:
  """The chat that prompts answer k: turns 0..k with the answers 0..k-1 between them."""
  chat = []
  for j in range(k + 1):
    chat += source.turns[j]
    if j < k:
      chat.append({"role": "assistant", "content": answers[j]})
  return chat


def sharegpt_record(source: Source, prog: Progress) -> dict:
  """The regenerated conversation in ShareGPT layout (the answered turns only)."""
  turns = []
  for j, answer in enumerate(prog.answers):
    turns += [{"from": ROLE_FROM[m["role"]], "value": m["content"]} for m in source.turns[j]]
    turns.append({"from": "gpt", "value": answer})
  regen = {"line": source.line, "finish_reasons": list(prog.finish_reasons)}
  if prog.stopped:
    regen["stopped"] = prog.stopped
  return {"id": source.id, "conversations": turns, "regen": regen}


# ----------------------------------------------------------------------------- provenance


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def target_identity(model_dir: str) -> dict:
  """The target directory, its config.json hash and weight files (name, bytes)."""
  cfg = os.path.join(model_dir, "config.json")
  weights = sorted(n for n in os.listdir(model_dir) if n.endswith((".safetensors", ".bin")))
  return {"path": os.path.abspath(model_dir),
          "config_sha256": file_sha256(cfg) if os.path.isfile(cfg) else None,
          "weights": [{"name": n, "bytes": os.path.getsize(os.path.join(model_dir, n))}
                      for n in weights]}


def job_settings(engine, source: dict, limit: int, max_turns: int, seed: int) -> dict:
  """Everything that decides the regenerated answers (checked when resuming)."""
  from fspad_jax.decoding.settings import config_value
  s = engine.settings
  template = getattr(engine.tokenizer, "chat_template", None) or ""
  return {
      "source": source, "target": target_identity(engine.model_dir),
      "target_dtype": config_value(engine.config, "target.dtype"),
      "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
      "method": s.method, "draft": engine.draft_info, "tree": s.tree_dict(),
      "temperature": s.sampling.temperature, "top_p": s.sampling.top_p,
      "top_k": s.sampling.top_k, "max_new_tokens": s.max_new_tokens,
      "stop_token_ids": list(engine.stop_token_ids), "seed": seed, "limit": limit,
      "max_turns": max_turns}


def _identity(settings: dict) -> dict:
  """The settings without file paths (a job directory may move between machines)."""
  return {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v)
          for k, v in settings.items()}


def _check_resume(path: str, settings: dict) -> None:
  """Writes the job's settings, or refuses to resume a job made with others."""
  if os.path.isfile(path):
    with open(path) as f:
      old = _identity(json.load(f))
    new = _identity(json.loads(json.dumps(settings, default=str)))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
      raise RegenError(f"{os.path.dirname(path)} holds a regeneration made with other "
                       f"settings (changed: {', '.join(changed)}); use another --output or "
                       f"delete that directory")
    return
  _write_json(path, settings)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def _read_turn_file(path: str, log: Callable[[str], None]) -> dict[str, dict]:
  """id -> decoded record of one round's output (a partial last line is dropped)."""
  from fspad_jax.decoding.records import scan_output
  partial = scan_output(path, truncate=True).partial
  if partial:
    log(f"{path}: dropped a partial last line (an interrupted write); it is decoded again")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return {rec["id"]: rec for rec in (json.loads(line) for line in f if line.strip())}


# ----------------------------------------------------------------------------- the job


def regenerate(config, input_path: str, output_path: str, *, limit: int = 0,
               max_turns: int = 0, seed: int | None = None, progress: bool = True,
               engine=None, log: Callable[[str], None] | None = None,
               deadline: float | None = None) -> dict:
  """Regenerates the conversations of `input_path` into `output_path` (see the module
  docstring); returns the summary (also in <output>.provenance.json). `engine` reuses a
  DecodeEngine built from this config (then config may be None); `seed` overrides
  decode.seed; `deadline` (time.monotonic()) stops between parts, returning
  {"complete": False, ...}: rerun to resume."""
  from fspad_jax import decode_lib
  from fspad_jax.decoding.engine import batch_seed
  t_start = time.perf_counter()
  log = log or console.write
  if limit < 0 or max_turns < 0:
    raise RegenError(f"limit={limit} / max_turns={max_turns}: expected integers >= 0")
  if not input_path or not os.path.isfile(input_path):
    raise RegenError(f"input file {input_path!r} does not exist")
  if not output_path:
    raise RegenError("no output file given")
  out_dir = os.path.dirname(os.path.abspath(output_path))
  if not os.path.isdir(out_dir):
    raise RegenError(f"output directory {out_dir!r} does not exist")
  if os.path.abspath(output_path) == os.path.abspath(input_path):
    raise RegenError(f"--output {output_path!r} is the input file")

  sources, report, no_user = load_sources(input_path, limit, max_turns)
  if not sources:
    bad = ", ".join(f"{n} {k}" for k, n in report.counts.items())
    raise RegenError(f"{input_path}: no conversation with a user turn"
                     + (f" ({no_user} without one" if no_user else " (")
                     + (f"; bad records: {bad})" if bad else ")"))
  if engine is None:
    engine = decode_lib.DecodeEngine(config)
  if engine.tokenizer is None:
    raise RegenError(f"the target has no tokenizer to render chats with "
                     f"({engine.tokenizer_error})")
  run_seed = engine.settings.seed if seed is None else int(seed)
  source = {"path": os.path.abspath(input_path), "bytes": os.path.getsize(input_path),
            "sha256": file_sha256(input_path)}
  settings = job_settings(engine, source, limit, max_turns, run_seed)
  work = output_path + WORK_SUFFIX
  os.makedirs(work, exist_ok=True)
  _check_resume(os.path.join(work, "settings.json"), settings)

  state = {s.id: Progress() for s in sources}
  stats = collections.Counter()
  stopped_log = []

  def stop(src: Source, kind: str, k: int, why: str, detail: str = "") -> None:
    """Ends a conversation before turn k: `why` goes into its record (the same for every
    decoding method), `detail` only into the log."""
    reason = f"stopped at turn {k + 1}: {why}"
    state[src.id].stopped = reason
    stats["stopped_" + kind] += 1
    reason += f" ({detail})" if detail else ""
    if len(stopped_log) < MAX_LOGGED:
      log(f"{input_path}:{src.line}: conversation {src.id!r} {reason}"
          + ("" if state[src.id].answers else " (not written)"))
    stopped_log.append({"id": src.id, "line": src.line, "reason": reason})

  def take(src: Source, rec: dict, k: int) -> None:
    """Applies a decoded answer k (one turn file record) to its conversation."""
    answer = (rec.get("text") or "").strip()
    stats["new_tokens"] += rec["new_tokens"]
    for key in ("target_forwards", "prompt_tokens"):
      stats[key] += rec.get(key) or 0
    acc = rec.get("accept_lengths")
    if acc is not None:
      stats["verify_steps"] += len(acc)
      stats["committed"] += sum(acc) + len(acc)
    if not answer:
      stop(src, "empty_answer", k, "the target's answer is empty")
      return
    state[src.id].answers.append(answer)
    state[src.id].finish_reasons.append(rec["finish_reason"])
    stats[f"finish_{rec['finish_reason']}"] += 1

  rounds = max(len(s.turns) for s in sources)
  part = engine.settings.batch_size * PART_BATCHES
  complete = True
  for k in range(rounds):
    turn_file = os.path.join(work, f"turn{k}.jsonl")
    done = _read_turn_file(turn_file, log)
    going = [s for s in sources if len(s.turns) > k and state[s.id].stopped is None]
    pending = []  # (source, prompt ids)
    for src in going:
      if src.id in done:
        take(src, done[src.id], k)
        continue
      chat = chat_so_far(src, state[src.id].answers, k)
      try:
        ids = engine.encode_chat(chat)
      except ValueError as e:
        stop(src, "template_error", k, str(e))
        continue
      if len(ids) > engine.max_prompt_len:
        from fspad_jax.decoding.records import too_long_reason
        stop(src, "too_long", k, f"its prompt of {len(ids)} tokens does not fit",
             too_long_reason(len(ids), engine))
        continue
      pending.append((src, ids))
    if not pending:
      continue
    log(f"turn {k + 1} of at most {rounds}: {len(pending)} conversations to answer"
        + (f" ({len(going) - len(pending)} done or stopped)" if len(going) > len(pending)
           else ""))
    bar = console.progress(len(pending), f"regen[{decode_lib.unit_name(engine)}] turn "
                           f"{k + 1}", "conv", enabled=progress)
    try:
      for p, start in enumerate(range(0, len(pending), part)):
        if deadline is not None and time.monotonic() > deadline:
          complete = False
          break
        chunk = pending[start:start + part]
        part_in = os.path.join(work, f"turn{k}.input.jsonl")
        with open(part_in, "w", encoding="utf-8") as f:
          for src, ids in chunk:
            f.write(json.dumps({"id": src.id, "input_ids": ids}) + "\n")
        summary = decode_lib.run_decode(
            None, part_in, turn_file, engine=engine, progress=False,
            seed=batch_seed(batch_seed(run_seed, k), p), log=lambda m: log("  " + m))
        stats["decode_time_s"] += summary["decode_time_s"]
        stats["parts"] += 1
        decoded = _read_turn_file(turn_file, log)
        for src, _ in chunk:
          if src.id in decoded:
            take(src, decoded[src.id], k)
          else:  # run_decode skipped it (its reason is in its summary)
            stop(src, "not_decoded", k, "not decoded", f"see {turn_file}.summary.json")
        bar.update(len(chunk))
        bar.set_postfix_str(f"{stats['new_tokens']} new tokens")
    finally:
      bar.close()
    if not complete:
      break

  written = [s for s in sources if state[s.id].answers]
  answers = sum(len(state[s.id].answers) for s in sources)
  summary = {
      "complete": complete,
      "input": os.path.abspath(input_path), "output": os.path.abspath(output_path),
      "bad_records": report.to_dict(), "no_user_turn": no_user,
      "conversations": len(sources), "written": len(written) if complete else None,
      "answers": answers, "rounds": rounds,
      "stopped": {k[len("stopped_"):]: v for k, v in sorted(stats.items())
                  if k.startswith("stopped_")},
      "stopped_examples": stopped_log[:100],
      "finish_reasons": {k[len("finish_"):]: v for k, v in sorted(stats.items())
                         if k.startswith("finish_")},
      "new_tokens": stats["new_tokens"], "prompt_tokens": stats["prompt_tokens"],
      "target_forwards": stats["target_forwards"],
      "tau": (round(stats["committed"] / stats["verify_steps"], 4)
              if stats["verify_steps"] else None),
      "decode_time_s": round(stats["decode_time_s"], 3),
      "wall_time_s": round(time.perf_counter() - t_start, 3),
  }
  if len(stopped_log) > MAX_LOGGED:
    log(f"{len(stopped_log) - MAX_LOGGED} more conversations stopped early (counted in the "
        f"summary, the first 100 listed in {output_path}{PROVENANCE_SUFFIX})")
  if stats["finish_cache_full"]:
    log(f"{stats['finish_cache_full']} answers ended early (finish_reason cache_full): "
        f"decode.cache_len={engine.settings.cache_len} leaves no room for the draft tree; "
        f"decode.cache_len=0 sizes the cache for it")
  if not complete:
    log(f"stopped at the time budget after {answers} answers: rerun to resume")
    return summary
  tmp = output_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for src in written:
      f.write(json.dumps(sharegpt_record(src, state[src.id]), ensure_ascii=False) + "\n")
  os.replace(tmp, output_path)
  provenance = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "tool": "python -m fspad_jax.regenerate", **settings,
      "decode": {"batch_size": engine.settings.batch_size,
                 "min_prompt_bucket": engine.settings.min_prompt_bucket,
                 "cache_len": engine.settings.cache_len},
      "summary": summary}
  _write_json(output_path + PROVENANCE_SUFFIX, provenance)
  return summary


def format_summary(summary: dict) -> str:
  """A run's summary for people, in a few lines."""
  stopped = ", ".join(f"{n} {k}" for k, n in summary["stopped"].items())
  lines = [f"regenerate: {summary['written']} of {summary['conversations']} conversations "
           f"written, {summary['answers']} answers, {summary['new_tokens']} new tokens "
           f"({summary['rounds']} turns at most)"
           + (f"; stopped early: {stopped}" if stopped else "")]
  dropped = sum(e["count"] for e in summary["bad_records"].values()) + summary["no_user_turn"]
  if dropped:
    lines.append(f"input records left out: {dropped} (bad or without a user turn)")
  if summary["tau"] is not None:
    lines.append(f"tau {summary['tau']:.2f} tokens per target forward")
  lines.append(f"outputs: {summary['output']} (provenance: {summary['output']}"
               f"{PROVENANCE_SUFFIX})")
  return "\n".join(lines)


def main():
  console.quiet_imports()  # before transformers is imported
  from absl import app, flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file(
      "config", None, "Decode config, e.g. configs/tiny.py (target, decode, draft).")
  input_flag = flags.DEFINE_string("input", None, "Conversations: ShareGPT JSON list or JSONL.")
  output = flags.DEFINE_string("output", None, "Regenerated ShareGPT JSONL (rerun to resume).")
  limit = flags.DEFINE_integer("limit", 0, "The first N usable conversations (0 = all).")
  max_turns = flags.DEFINE_integer("max_turns", 0, "User turns kept per conversation (0 = all).")
  seed = flags.DEFINE_integer("seed", None, "Sampling seed (overrides decode.seed).")
  no_progress = flags.DEFINE_bool("no_progress", False, "No progress bars.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup_logging()
    from fspad_jax.data import DataError
    from fspad_jax.decode_lib import USER_ERRORS
    try:
      summary = regenerate(config.value, input_flag.value, output.value, limit=limit.value,
                           max_turns=max_turns.value, seed=seed.value,
                           progress=not no_progress.value)
    except (RegenError, DataError) + USER_ERRORS as e:
      sys.exit(f"regenerate: error: {console.one_line(e)}")
    print(format_summary(summary))

  flags.mark_flags_as_required(["config", "input", "output"])
  app.run(run)


if __name__ == "__main__":
  main()
