"""`train(config, workdir)`: the draft-training job behind train.py, usable from a notebook.

Steps: validate the config (one clear error before anything compiles) -> mesh -> load the
frozen target sharded -> prepare/read the data -> restore the latest checkpoint or
initialize -> jitted steps with logging, evaluation, async checkpoints -> final save.
SIGTERM (preemption) saves once more and returns cleanly; rerunning resumes.

Every process reads the same global batch from the prepared dataset and places its
addressable slice on its devices (`host_to_global`), so the result does not depend on the
number of processes. Text batches are small, so reading them on every host is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import numpy as np
import ml_collections
from flax import nnx

from fspad_jax import console
from fspad_jax import data as data_lib
from fspad_jax import hot_vocab, train_lib, ttt
from fspad_jax.config import ConfigError, load_hf_config
from fspad_jax.draft import DRAFT_KINDS, DraftConfig, abstract_draft, draft_config_from_target
from fspad_jax.hf_checkpoint import (CheckpointError, check_checkpoint, checkpoint_fingerprint,
                                     resolve_model_dir)
from fspad_jax.sharding import ShardingError, host_to_global, make_mesh
from fspad_jax.target import Target

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for the MFU estimate (0 = unknown: MFU not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def _peak_flops(config_value: float) -> float:
  if config_value:
    return float(config_value)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return 0.0


# Errors that train.py reports as one line instead of a traceback.
USER_ERRORS = (ConfigError, data_lib.DataError, CheckpointError, ShardingError)


class TrainingInterrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) ended the run after saving `step` (None: nothing was saved). A
  KeyboardInterrupt, so callers that handle Ctrl-C keep doing so."""

  def __init__(self, step: int | None):
    self.step = step
    saved = (f"checkpoint of step {step} saved; rerun the same command to resume"
             if step is not None else "no checkpoint saved")
    super().__init__(f"interrupted (Ctrl-C): {saved}")


# (key, integer?, lower bound, lower bound excluded?, upper bound, upper bound excluded?)
# for every numeric key train.py reads; checked finite and in range before anything loads.
_NUMERIC_KEYS = (
    ("train.steps", True, 1, False, None, False),
    ("train.global_batch", True, 1, False, None, False),
    ("train.grad_accum", True, 1, False, None, False),
    ("train.learning_rate", False, 0, True, None, False),
    ("train.warmup_steps", True, 0, False, None, False),
    ("train.b1", False, 0, False, 1, True),
    ("train.b2", False, 0, False, 1, True),
    ("train.weight_decay", False, 0, False, None, False),
    ("train.clip_value", False, 0, True, None, False),
    ("train.w_reg", False, 0, False, None, False),
    ("train.fusion_lr_scale", False, 0, False, None, False),
    ("train.w_cls", False, 0, False, None, False),
    ("train.noise", False, 0, False, None, False),
    ("train.seed", True, 0, False, 2**32, True),
    ("train.depths", True, 1, False, None, False),
    ("train.log_every", True, 1, False, None, False),
    ("train.eval_every", True, 0, False, None, False),
    ("train.eval_batch_size", True, 1, False, None, False),
    ("train.eval_batches", True, 0, False, None, False),
    ("train.checkpoint_every", True, 1, False, None, False),
    ("train.keep_checkpoints", True, 1, False, None, False),
    ("train.peak_flops_per_device", False, 0, False, None, False),
    ("data.max_len", True, 2, False, None, False),
    ("data.val_fraction", False, 0, False, 1, True),
    ("draft.vocab_size", True, 0, False, None, False),
    ("draft.shape.intermediate_size", True, 0, False, None, False),
    ("draft.shape.num_heads", True, 0, False, None, False),
    ("draft.shape.num_kv_heads", True, 0, False, None, False),
    ("draft.shape.head_dim", True, 0, False, None, False),
)
# Keys with a fixed set of values.
_CHOICE_KEYS = {"train.decay": ("linear", "cosine", "constant"),
                "train.clip": ("value", "global_norm", "none"),
                "train.token_loss": train_lib.TOKEN_LOSSES,
                "train.fusion_init": train_lib.FUSION_INITS,
                "draft.dtype": ("float32", "bfloat16"),
                "target.dtype": ("float32", "bfloat16")}


def _lookup(config, key: str):
  """config's value at a dotted key, or KeyError when the config has no such key."""
  value = config
  for part in key.split("."):
    if not hasattr(value, "keys") or part not in value:
      raise KeyError(key)
    value = value[part]
  return value


def _in_range(value, lo, lo_excl: bool, hi, hi_excl: bool) -> bool:
  above = lo is None or (value > lo if lo_excl else value >= lo)
  below = hi is None or (value < hi if hi_excl else value <= hi)
  return above and below


def _range_text(lo, lo_excl: bool, hi, hi_excl: bool) -> str:
  parts = ([f"{'>' if lo_excl else '>='} {lo}"] if lo is not None else []) + (
      [f"{'<' if hi_excl else '<='} {hi}"] if hi is not None else [])
  return " and ".join(parts)


def validate_numbers(config: ml_collections.ConfigDict) -> None:
  """Every numeric train/data/draft key finite and in range, and every choice key one of its
  values: one ConfigError line naming the key (keys a config lacks are skipped)."""
  for key, choices in _CHOICE_KEYS.items():
    try:
      value = _lookup(config, key)
    except KeyError:
      continue
    if value not in choices:
      raise ConfigError(f"config key {key}={value!r}: expected one of {', '.join(choices)}")
  for key, integer, lo, lo_excl, hi, hi_excl in _NUMERIC_KEYS:
    try:
      value = _lookup(config, key)
    except KeyError:
      continue
    if key == "train.clip_value" and _lookup(config, "train.clip") == "none":
      continue  # not used
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config key {key}={value!r}: expected "
                        f"{'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
      raise ConfigError(f"config key {key}={value!r} must be a finite number")
    if integer and not float(value).is_integer():
      raise ConfigError(f"config key {key}={value!r}: expected an integer")
    if not _in_range(value, lo, lo_excl, hi, hi_excl):
      raise ConfigError(f"config key {key}={value!r} must be "
                        f"{_range_text(lo, lo_excl, hi, hi_excl)}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError with one clear line for a config that cannot run."""
  validate_numbers(config)
  if config.draft.kind not in DRAFT_KINDS:
    raise ConfigError(f"config key draft.kind={config.draft.kind!r}: expected one of "
                      f"{', '.join(DRAFT_KINDS)}")
  config.target.path = resolve_model_dir(config.target.path, "target.path")
  if not os.path.isfile(os.path.join(config.target.path, "config.json")):
    raise ConfigError(f"config key target.path={config.target.path!r}: not a model "
                      "directory (no config.json)")
  if not config.data.path or not os.path.isfile(config.data.path):
    raise ConfigError(f"config key data.path={config.data.path!r}: no such file")
  t = config.train
  if t.global_batch < 1 or t.grad_accum < 1 or t.global_batch % t.grad_accum:
    raise ConfigError(f"train.global_batch={t.global_batch} must be a positive multiple of "
                      f"train.grad_accum={t.grad_accum}")
  try:
    mesh = make_mesh(tuple(config.mesh.shape))
  except ShardingError as e:
    raise ConfigError(f"config key mesh.shape: {e}") from None
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = t.global_batch // t.grad_accum
  if micro % data_ways:
    raise ConfigError(
        f"train.global_batch / train.grad_accum = {micro} is not divisible by the mesh's "
        f"data x fsdp = {data_ways} devices")
  if t.eval_batch_size % data_ways:
    raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is not divisible by the "
                      f"mesh's data x fsdp = {data_ways} devices")
  ttt.step_weights(t.get("ttt_steps", 1), t.get("ttt_weights", ()))  # one-line ConfigError
  target_cfg = load_hf_config(config.target.path)
  hot = hot_vocab.check_hot_vocab_size(config.draft.get("vocab_size", 0), target_cfg.vocab_size)
  if t.get("token_loss", "full") == "hot" and not hot:
    raise ConfigError("config key train.token_loss='hot' needs a hot vocabulary "
                      "(draft.vocab_size > 0); with the full vocabulary use 'full'")
  draft_config(config, target_cfg)  # shape overrides, feature layers, own-head vocabulary
  check_checkpoint(config.target.path, target_cfg)  # tensors vs config.json, headers only


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and checks that files can be written in it (one line if not)."""
  probe = os.path.join(workdir, f".write_test.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot write there ({e.strerror or e})") from None


def run_fingerprints(config) -> dict:
  """What identifies this run's inputs: the target (hf_checkpoint.checkpoint_fingerprint)
  and the data file (size and sha256), stored with every checkpoint and compared on resume."""
  path = config.data.path
  return {"target": {"path": os.path.abspath(config.target.path),
                     **checkpoint_fingerprint(config.target.path)},
          "data": {"path": os.path.abspath(path), "size": os.path.getsize(path),
                   "sha256": data_lib.file_sha256(path)}}


# Draft-config fields that do not change the checkpoint's tree (master weights are float32).
_TREE_NEUTRAL_DRAFT_FIELDS = ("dtype",)


def check_resumable(saved_meta: dict, draft_cfg: DraftConfig, fingerprints: dict,
                    config, where: str) -> None:
  """Refuses, in one line naming what changed, a resume whose draft shape or whose inputs
  (target, data) differ from the ones the checkpoint at `where` was trained with. Runs
  before the checkpoint is restored; checkpoints from before fingerprints are not checked
  for inputs."""
  saved_draft = saved_meta.get("draft_config") or {}
  current = json.loads(json.dumps(dataclasses.asdict(draft_cfg)))
  changed = [f"{k} {saved_draft[k]!r} -> {current[k]!r}" for k in current
             if k in saved_draft and k not in _TREE_NEUTRAL_DRAFT_FIELDS
             and saved_draft[k] != current[k]]
  if changed:
    if saved_draft.get("kind") != current["kind"]:
      lead = (f"holds a {saved_draft.get('kind')!r} draft, but "
              f"draft.kind={current['kind']!r}")
    else:
      lead = "holds a draft of another shape"
    raise ConfigError(f"{where} {lead} ({'; '.join(changed)}): use another workdir")
  changed = _changed_data_settings(saved_meta.get("config", {}), config)
  if changed:
    raise ConfigError(f"{where} was trained on data prepared with other settings "
                      f"({'; '.join(changed)}): its data position would index another "
                      "dataset: use another workdir")
  saved = saved_meta.get("fingerprints")
  if not saved:
    logger.info("%s predates input fingerprints: target and data are not compared", where)
    return
  target, was = fingerprints["target"], saved.get("target", {})
  for part, what in (("config", "config.json"), ("weights", "weights")):
    if was.get(part) and was[part] != target[part]:
      raise ConfigError(
          f"config key target.path={target['path']!r}: its {what} differ from the target "
          f"this workdir was trained with ({was.get('path')}); resuming would mix two "
          f"targets: use another workdir")
  data, was = fingerprints["data"], saved.get("data", {})
  if was.get("sha256") and was["sha256"] != data["sha256"]:
    raise ConfigError(
        f"config key data.path={data['path']!r}: not the data this workdir was trained on "
        f"({was.get('path')}, {was.get('size')} bytes; now {data['size']} bytes, another "
        f"sha256); its data position would index another dataset: use another workdir")


# Config keys that change the prepared dataset (and so what a saved data position means).
_DATA_KEYS = (("data", "max_len"), ("data", "val_fraction"), ("target", "chat_template"))


def _changed_data_settings(saved_config: dict, config) -> list[str]:
  return [f"{section}.{key} {saved_config[section][key]!r} -> {config[section].get(key)!r}"
          for section, key in _DATA_KEYS
          if key in saved_config.get(section, {})
          and saved_config[section][key] != config[section].get(key)]


def check_prepared(saved_meta: dict, prepared: str, config, where: str) -> None:
  """The prepared dataset (data content, tokenizer, chat template, max_len, val_fraction)
  must be the one the checkpoint's data position refers to."""
  was = (saved_meta.get("fingerprints") or {}).get("prepared")
  now = prepared_id(prepared)
  if not was or was == now:
    return
  what = ("; ".join(_changed_data_settings(saved_meta.get("config", {}), config))
          or "the tokenizer or the preparation pipeline changed")
  raise ConfigError(f"{where}: the prepared data differs from the one this workdir was "
                    f"trained on ({what}): its data position would index another dataset: "
                    "use another workdir")


def prepared_id(builder_dir: str) -> str:
  """The prepared dataset's key (`<stem>-len<L>-<digest>`, data.prepared_dir_for)."""
  return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(builder_dir))))


def draft_config(config, target_cfg) -> DraftConfig:
  """The DraftConfig from config.draft: target shapes unless overridden (0 = target's)."""
  overrides = {k: v for k, v in dict(config.draft.get("shape", {})).items() if v}
  hot = hot_vocab.check_hot_vocab_size(config.draft.get("vocab_size", 0), target_cfg.vocab_size)
  layers = tuple(config.draft.get("feature_layers", ()) or ())  # () = the kind's default
  return draft_config_from_target(target_cfg, config.draft.kind, dtype=config.draft.dtype,
                                  hot_vocab_size=hot, feature_layers=layers, **overrides)


def hot_vocabulary(setup, prepared_dir: str, workdir: str) -> np.ndarray | None:
  """The run's hot token ids (draft.vocab_size > 0): the most frequent assistant tokens of the
  prepared training split, stored in the workdir; a resumed run must find the same ones."""
  n = setup.draft_cfg.hot_vocab_size
  if not n:
    return None
  counts_path = os.path.join(prepared_dir, hot_vocab.TOKEN_COUNTS_FILE)
  if not os.path.isfile(counts_path):
    raise ConfigError(f"{prepared_dir}: no {hot_vocab.TOKEN_COUNTS_FILE} (prepared by an older "
                      "version): delete the prepared data directory to prepare it again")
  counts = np.load(counts_path)
  counts = np.pad(counts, (0, max(0, setup.target_cfg.vocab_size - len(counts))))
  ids = hot_vocab.select_hot_ids(counts[:setup.target_cfg.vocab_size], n)
  stored = hot_vocab.load_hot_ids(workdir, setup.target_cfg.vocab_size)
  if stored is not None and not np.array_equal(stored, ids):
    raise ConfigError(f"{workdir}/{hot_vocab.HOT_IDS_FILE} holds another hot vocabulary than "
                      "this run's data gives: use another workdir")
  if jax.process_index() == 0:
    hot_vocab.save_hot_ids(workdir, ids)
  covered = counts[ids].sum() / max(counts.sum(), 1)
  logger.info("hot vocabulary: %d of %d ids, %.1f%% of assistant tokens", n,
              setup.target_cfg.vocab_size, 100 * covered)
  return ids


def _optim_config(t) -> train_lib.OptimConfig:
  return train_lib.OptimConfig(
      learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.steps,
      decay=t.decay, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, clip=t.clip,
      clip_value=t.clip_value, grad_accum=t.grad_accum,
      fusion_lr_scale=t.get("fusion_lr_scale", 1.0))


def build_setup(config, target: Target) -> train_lib.TrainSetup:
  dcfg = draft_config(config, target.cfg)
  graphdef, _ = nnx.split(abstract_draft(dcfg))
  t = config.train
  optimizer, schedule = train_lib.make_optimizer(_optim_config(t))
  return train_lib.TrainSetup(
      target_cfg=target.cfg, target_graphdef=target.graphdef, target_params=target.params,
      draft_cfg=dcfg, draft_graphdef=graphdef, mesh=target.mesh, rules=target.rules,
      optimizer=optimizer, learning_rate=schedule,
      loss_cfg=train_lib.LossConfig(w_reg=t.w_reg, w_cls=t.w_cls, noise=t.noise,
                                    ttt_steps=t.get("ttt_steps", 1),
                                    ttt_weights=tuple(t.get("ttt_weights", ())),
                                    token_loss=t.get("token_loss", "full")),
      grad_accum=t.grad_accum, seed=t.seed, fusion_init=t.get("fusion_init", "random"))


def prepare_data(config, workdir: str) -> str:
  """Prepares the dataset once (process 0), then every process opens the same directory."""
  out_dir = config.data.prepared_dir or os.path.join(workdir, "data")
  if jax.process_index() == 0:
    builder_dir, report = data_lib.prepare_dataset(
        config.data.path, config.target.path, config.data.max_len, out_dir,
        val_fraction=config.data.val_fraction,
        chat_template=config.target.get("chat_template", ""))
    logger.debug("prepared data in %s: %s", builder_dir, json.dumps(report))  # logged there
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fspad_jax data prepared")
  if jax.process_index() != 0:
    builder_dir, _ = data_lib.prepare_dataset(
        config.data.path, config.target.path, config.data.max_len, out_dir,
        val_fraction=config.data.val_fraction,
        chat_template=config.target.get("chat_template", ""))
  return builder_dir


def _place_batch(setup, batch: dict, micro: bool) -> dict:
  return {k: host_to_global(np.asarray(v, np.int32),
                            setup.batch_sharding(np.ndim(v), micro=micro))
          for k, v in batch.items()}


def evaluate(setup, agreement_fn, params, prepared_dir: str, batch_size: int, max_batches: int,
             depths: int) -> dict:
  """Losses and per-depth agreement over (up to max_batches of) the validation split."""
  try:
    batches = data_lib.TrainBatches(prepared_dir, "validation", batch_size, shuffle=False,
                                    num_epochs=1, drop_remainder=False, shard_index=0,
                                    shard_count=1)
  except ValueError as e:
    logger.warning("no evaluation: %s", e)
    return {}
  totals = None
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    n = batch["length"].shape[0]
    if n < batch_size:  # pad the last batch with empty rows (length 0: never counted)
      pad = batch_size - n
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batch = {k: batch[k] for k in ("input_ids", "loss_mask", "length")}
    sums = agreement_fn(params, setup.target_params, _place_batch(setup, batch, micro=False))
    sums = jax.tree.map(float, jax.device_get(sums))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  return train_lib.summarize_agreement(totals, depths) if totals else {}


LOCK_FILE = "train.lock"


class _WorkdirLock:
  """An exclusive flock on <workdir>/train.lock (process 0 only), held for the whole run: a
  second train.py on the same workdir is refused in one line. The kernel drops the lock when
  the process dies, so a killed run never leaves a stale one."""

  def __init__(self, workdir: str):
    self._file = None
    if jax.process_index() != 0:
      return
    import fcntl
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise ConfigError(f"--workdir={workdir}: another train.py ({holder}) is running on it "
                        f"(it holds {LOCK_FILE}); wait for it or use another workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    self._file = f

  def release(self):
    if self._file is not None:
      self._file.close()  # closing drops the flock
      self._file = None


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  validate_config(config)
  prepare_workdir(workdir)
  lock = _WorkdirLock(workdir)
  try:
    return _train(config, workdir, progress)
  finally:
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, progress: bool) -> dict:
  t = config.train
  fingerprints = run_fingerprints(config)
  ckpt = train_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
  latest = ckpt.latest_step()
  saved_meta = {}
  if latest is not None:  # refuse a resume that cannot work before loading anything
    try:
      saved_meta = ckpt.restore_meta(latest)
      check_resumable(saved_meta, draft_config(config, load_hf_config(config.target.path)),
                      fingerprints, config, f"{ckpt.directory} (step {latest})")
    except BaseException:
      ckpt.close()
      raise
  target = Target.from_pretrained(config.target.path, mesh_shape=tuple(config.mesh.shape),
                                  dtype=config.target.dtype)
  setup = build_setup(config, target)
  prepared = prepare_data(config, workdir)
  if latest is not None:
    check_prepared(saved_meta, prepared, config, f"{ckpt.directory} (step {latest})")
  fingerprints["prepared"] = prepared_id(prepared)
  setup.hot_ids = hot_vocabulary(setup, prepared, workdir)  # token_terms' hot vocabulary
  seq = config.data.max_len
  micro = t.global_batch // t.grad_accum

  abstract_state = jax.eval_shape(lambda: train_lib.init_train_state(setup, t.seed))
  shardings = setup.state_shardings(abstract_state)
  step_fn = train_lib.make_train_step(setup, shardings, micro, seq)
  agreement_fn = train_lib.make_agreement_fn(setup, depths=t.depths)
  batches = data_lib.TrainBatches(prepared, "train", t.global_batch, seed=t.seed,
                                  shard_index=0, shard_count=1)
  meta = {"config": json.loads(config.to_json_best_effort()),
          "draft_config": dataclasses.asdict(setup.draft_cfg),
          "target_path": os.path.abspath(config.target.path), "fingerprints": fingerprints}
  writer = train_lib.MetricsWriter(workdir, tensorboard=t.tensorboard)
  if latest is not None:
    from fspad_jax.draft_source import is_legacy_fs_layout
    if is_legacy_fs_layout(os.path.join(ckpt.directory, str(latest), "state"), setup.draft_cfg):
      raise ConfigError(f"{ckpt.directory}: step {latest} stores the feature-sampling kernel "
                        "in the older [d, 2, d_ff] layout: decode.py still loads it, but "
                        "training cannot resume it; use another workdir")
    state, data_state, saved_meta = ckpt.restore(latest, abstract_state, shardings)
    _warn_on_changed_schedule(saved_meta.get("config", {}).get("train", {}), t)
    _warn_on_changed_loss(saved_meta.get("config", {}).get("train", {}), setup.loss_cfg)
    try:
      batches.set_state(data_state)
    except ValueError as e:
      raise ConfigError(f"{ckpt.directory}: {e}: resume with the run's data settings or "
                        "use another workdir") from None
    writer.truncate_after(latest)  # steps logged after the checkpoint are redone
    logger.info("resumed from %s step %d", ckpt.directory, latest)
  else:
    state = train_lib.init_train_state(setup, t.seed)
    writer.truncate_after(0)  # records of a run that died before its first checkpoint
  if jax.process_index() == 0:  # written whole or not at all (decode.py reads it)
    path = os.path.join(workdir, "draft_config.json")
    with open(path + ".tmp", "w") as f:
      json.dump(dataclasses.asdict(setup.draft_cfg), f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

  peak = _peak_flops(t.peak_flops_per_device)
  flops = train_lib.flops_per_step(target.cfg, setup.draft_cfg, t.global_batch * seq, seq,
                                   setup.loss_cfg.ttt_steps)
  start_step = int(jax.device_get(state.step))
  bar = console.progress(t.steps, f"train {setup.draft_cfg.kind}", "step", initial=start_step,
                         enabled=progress and not jax.process_index())
  last = writer.last_record() if start_step >= t.steps else {}  # rerun of a finished run
  window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
  with train_lib.PreemptionFlag() as preempt:
    step = start_step
    while step < t.steps:
      batch = train_lib.stack_micro_batches(next(batches), t.grad_accum)
      first_micro = {k: v[0] for k, v in batch.items()}
      state, metrics = step_fn(state, target.params, _place_batch(setup, batch, micro=True))
      step += 1
      window_steps += 1
      window_tokens += float(np.sum(batch["length"]))  # real (unpadded) tokens
      bar.update(1)
      reset_window = step == start_step + 1  # the first step includes compilation
      if step % t.log_every == 0 or step == t.steps:
        metrics = jax.tree.map(float, jax.device_get(metrics))
        dt = time.perf_counter() - window_start
        metrics["tokens_per_s"] = window_tokens / dt
        metrics["padded_tokens_per_s"] = window_steps * t.global_batch * seq / dt
        if peak:
          metrics["mfu"] = window_steps * flops / dt / (peak * jax.device_count())
        sums = agreement_fn(state.params, target.params,
                            _place_batch(setup, first_micro, micro=False))
        metrics.update(train_lib.summarize_agreement(jax.device_get(sums), t.depths))
        metrics["learning_rate"] = float(setup.learning_rate(step - 1))
        writer.write(step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", top1=f"{metrics['top1_depth1']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        last = metrics
        reset_window = True
      if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
        ev = evaluate(setup, agreement_fn, state.params, prepared, t.eval_batch_size,
                      t.eval_batches, t.depths)
        if ev:
          writer.write(step, "eval", ev)
          last = {**last, **{f"eval_{k}": v for k, v in ev.items()}}
        reset_window = True
      if step % t.checkpoint_every == 0 or step == t.steps or preempt.requested:
        ckpt.save(step, state, batches.get_state(), meta)
      if preempt.requested:
        if not preempt.interrupted:
          logger.warning("preempted at step %d: checkpoint saved", step)
        break
      if reset_window:  # throughput windows time training steps only
        jax.block_until_ready(state)
        window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
  bar.close()
  ckpt.close()  # waits for the last save to commit
  writer.close()
  if preempt.interrupted:
    raise TrainingInterrupted(step)
  return last


# Train settings that shape the optimization: changing them on resume changes the run.
_SCHEDULE_KEYS = ("steps", "learning_rate", "warmup_steps", "decay", "grad_accum",
                  "global_batch", "b1", "b2", "weight_decay", "clip", "clip_value")


def _warn_on_changed_schedule(saved: dict, current) -> None:
  changed = {k: (saved[k], current[k]) for k in _SCHEDULE_KEYS
             if k in saved and saved[k] != current[k]}
  if changed:
    logger.warning("resuming with changed train settings %s (saved, now): the learning-rate "
                   "schedule and optimizer continue under the new values", changed)


def _warn_on_changed_loss(saved: dict, loss_cfg: train_lib.LossConfig) -> None:
  """Training-time-test and token-loss settings change only the loss: a resumed run
  continues under the new ones (a checkpoint saved before they existed was trained with 1
  step over the full vocabulary)."""
  before = (saved.get("ttt_steps", 1), tuple(saved.get("ttt_weights", ())))
  now = (loss_cfg.ttt_steps, tuple(loss_cfg.ttt_weights))
  if before != now:
    logger.warning("resuming with changed train.ttt_steps/ttt_weights %s -> %s: training "
                   "continues with the new unrolled loss", before, now)
  if saved.get("token_loss", "full") != loss_cfg.token_loss:
    logger.warning("resuming with changed train.token_loss %r -> %r: training continues "
                   "with the new token loss", saved.get("token_loss", "full"),
                   loss_cfg.token_loss)
