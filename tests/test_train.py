"""Draft training: learning, loss math, gradient accumulation, per-depth agreement, resume
and faults, sharding, config validation, the train.py CLI and the shipped configs.

Everything runs on CPU in float32 on one tiny checkpoint (8 heads / 8 KV heads / d_ff 128 /
vocab 512, so every sharded axis divides 8 ways) and one prepared conversation file.
"""

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections.config_flags import config_flags

from fspad_jax import data as data_lib
from fspad_jax import train_lib, trainer
from fspad_jax.config import (ConfigError, load_config_module, load_repo_config,
                              repo_config_path)
from fspad_jax.draft import DRAFT_KINDS, draft_config_from_target, init_draft, init_draft_cache
from fspad_jax.target import Target
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations, tiny_config
from process_group import ProcessGroup
from train_runner import (LOOP_MAX_LEN, TTT_STEPS, flat_params, step_batch,
                          step_config, train_loop_config, train_steps)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAX_LEN = LOOP_MAX_LEN  # 141 train / 13 validation conversations survive at this length
MESHES = ["8,1,1", "1,8,1", "1,1,8", "2,2,2"]
# The learning test's schedule; the CLI test reuses it (the same program: one compile).
LEARN = {"warmup_steps": 5, "decay": "constant"}
# The resume tests' run, in-process and on the command line. A constant rate after warmup,
# so that a run started with steps=20 and resumed with steps=60 follows the same schedule
# as one 60-step run (a linear/cosine decay's horizon is train.steps).
RESUME = {"steps": 60, "checkpoint_every": 10, "log_every": 10, "decay": "constant",
          "warmup_steps": 5, "depths": 1, "keep_checkpoints": 2}


# ----------------------------------------------------------------------------- helpers

CACHE_ENV = {}  # the persistent compilation cache, for subprocesses too


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for this module and its subprocesses: the many runs of one
  config (resume, kill, SIGTERM) compile it once. Restored to the previous state after."""
  from jax.experimental.compilation_cache import compilation_cache as cache_lib
  settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  saved = {k: getattr(jax.config, k) for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
    CACHE_ENV[k.upper()] = str(v)
  cache_lib.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  cache_lib.reset_cache()
  CACHE_ENV.clear()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """One tiny checkpoint, a conversations file, and its data prepared once at MAX_LEN."""
  root = tmp_path_factory.mktemp("train")
  cfg = tiny_config(hidden_size=64, num_heads=8, num_kv_heads=8, intermediate_size=128)
  model = make_tiny_checkpoint(str(root / "model"), cfg, seed=3)
  conversations = make_tiny_conversations(str(root / "conversations.jsonl"), num=200)
  prepared = str(root / "prepared")
  builder_dir, report = data_lib.prepare_dataset(conversations, model, MAX_LEN, prepared,
                                                 val_fraction=0.05)
  assert report["train"] >= 100 and report["validation"] >= 8, report
  return {"root": str(root), "model": model, "data": conversations, "prepared": prepared,
          "builder_dir": builder_dir}


@pytest.fixture(scope="module")
def target(assets):
  return Target.from_pretrained(assets["model"], mesh_shape=(1, 1, 1),
                                devices=jax.devices()[:1])


def make_config(assets, kind="fspad", **train):
  """configs/tiny.py on the test assets: no eval, no TensorBoard, 2 agreement depths."""
  config = load_repo_config("tiny")
  config.target.path, config.data.path = assets["model"], assets["data"]
  config.data.max_len, config.data.prepared_dir = MAX_LEN, assets["prepared"]
  config.draft.kind = kind
  config.train.update({"eval_every": 0, "tensorboard": False, "depths": 2, **train})
  return config


def read_metrics(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def restore(workdir, config, target, step=None):
  """(step, TrainState, data state, meta) of a workdir's checkpoint (default: latest)."""
  setup = trainer.build_setup(config, target)
  abstract = jax.eval_shape(lambda: train_lib.init_train_state(setup, 0))
  ckpt = train_lib.Checkpointer(str(workdir), keep=config.train.keep_checkpoints)
  try:
    step = ckpt.latest_step() if step is None else step
    state, data_state, meta = ckpt.restore(step, abstract, setup.state_shardings(abstract))
  finally:
    ckpt.close()
  return step, state, data_state, meta


def complete_steps(workdir) -> list[int]:
  """Finalized checkpoint steps: <step>/commit_success.txt (orbax writes the marker last,
  then, on a local disk, renames <step>.orbax-checkpoint-tmp to <step>)."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.exists(os.path.join(root, n, "commit_success.txt")))


def assert_trees_close(actual: dict, expected: dict, atol: float, what: str = ""):
  assert actual.keys() == expected.keys()
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], atol=atol, rtol=0, err_msg=f"{what} {k}")


def count_train_steps(monkeypatch) -> list:
  """Records every call of the jitted train step that trainer.train builds."""
  calls = []
  real = train_lib.make_train_step

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)
    def counted(*a):
      calls.append(1)
      return step_fn(*a)
    return counted

  monkeypatch.setattr(train_lib, "make_train_step", make)
  return calls


def subprocess_env(**extra) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
  env["HF_HUB_OFFLINE"] = "1"
  env.pop("XLA_FLAGS", None)
  env.update(CACHE_ENV)
  env.update(extra)
  return env


def train_cli(assets, workdir, kind="fspad", **train) -> list[str]:
  """The train.py command line equivalent to make_config(assets, kind, **train)."""
  flags = {"target.path": assets["model"], "data.path": assets["data"],
           "data.max_len": MAX_LEN, "data.prepared_dir": assets["prepared"],
           "draft.kind": kind, "train.eval_every": 0, "train.tensorboard": False,
           "train.depths": 2, **{f"train.{k}": v for k, v in train.items()}}
  return ([sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()])


def start_cli(cmd, log_path) -> subprocess.Popen:
  with open(log_path, "w") as log:  # a file, not a pipe: absl logs would fill a pipe
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for(condition, proc, timeout=180.0, what=""):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"train.py exited ({proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def randomized_params(params, seed=1, scale=0.15):
  """Every float param random (norm weights near 1, biases non-zero): a non-trivial draft."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)).astype(x.dtype)
      for k, x in zip(keys, leaves)])


# ----------------------------------------------------------------------------- 1. learning


@pytest.mark.parametrize("kind", ["eagle", "fspad"])
def test_draft_learns(assets, tmp_path, kind):
  config = make_config(assets, kind, **LEARN, steps=60, log_every=10, checkpoint_every=1000)
  trainer.train(config, str(tmp_path), progress=False)
  logs = read_metrics(tmp_path)
  assert [r["step"] for r in logs] == list(range(10, 61, 10))
  first, last = logs[0], logs[-1]
  final_top1 = np.mean([r["top1_depth1"] for r in logs[-2:]])  # two logs: less batch noise
  assert first["top1_depth1"] < 0.5 * final_top1 and final_top1 > 0.15, \
      [round(r["top1_depth1"], 3) for r in logs]
  for key in ("loss", "loss_reg", "loss_cls"):
    assert last[key] < first[key] - 0.02, (key, [round(r[key], 3) for r in logs])
  with open(tmp_path / "draft_config.json") as f:
    assert json.load(f)["kind"] == kind
  assert complete_steps(tmp_path) == [60]


# ----------------------------------------------------------------------------- 2. loss math


def smooth_l1(d, beta=1.0):
  d = np.abs(d)
  return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind,w_reg,w_cls,noise", [
    ("fspad", 1.0, 0.1, 0.0), ("eagle", 0.5, 2.0, 0.0), ("fspad", 1.0, 0.1, 0.2)])
def test_draft_loss_matches_reference(target, kind, w_reg, w_cls, noise):
  """train_lib.draft_loss == w_reg * SmoothL1(regress(j), f(j+1)) + w_cls * softCE, averaged
  over positions j with loss_mask[j+1] and j+1 < length, written out in numpy. The draft runs
  through Draft.__call__ with a KV cache (not the training path's cache-less forward)."""
  dcfg = draft_config_from_target(target.cfg, kind, dtype="float32")
  graphdef, params = nnx.split(init_draft(dcfg))
  draft = nnx.merge(graphdef, randomized_params(params))
  model = nnx.merge(target.graphdef, target.params)
  batch = step_batch(target.cfg.vocab_size, rows=4, seq=12, seed=2)
  batch["length"][1] = 7
  batch["loss_mask"][1, :] = 1  # a mask running past the row's length: cut by the length rule
  batch["loss_mask"][2, :] = 0  # a row with nothing to train
  rng = jax.random.key(7)
  loss_cfg = train_lib.LossConfig(w_reg=w_reg, w_cls=w_cls, noise=noise)
  loss, sums = jax.jit(lambda b: train_lib.draft_loss(draft, model, b, rng, loss_cfg))(
      {k: jnp.asarray(v) for k, v in batch.items()})

  ids, lengths = batch["input_ids"], batch["length"]
  rows, seq = ids.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
  feats = np.asarray(model.features(jnp.asarray(ids), positions, None)[0], np.float64)
  emb_table = np.asarray(model.embedding[...], np.float64)
  lm_head = (emb_table.T if target.cfg.tie_word_embeddings
             else np.asarray(model.lm_head[...], np.float64))
  next_emb = np.concatenate([emb_table[ids[:, 1:]], np.zeros((rows, 1, emb_table.shape[1]))], 1)
  draft_in = feats
  if noise:  # EAGLE's uniform noise: (U(0,1) - 0.5) * noise * 512 / seq, same key
    u = np.asarray(jax.random.uniform(rng, feats.shape), np.float64)
    draft_in = feats + (u - 0.5) * noise * 512.0 / seq
  out = draft(jnp.asarray(draft_in, jnp.float32), jnp.asarray(next_emb, jnp.float32), positions,
              init_draft_cache(dcfg, rows, seq))
  predict, regress = np.asarray(out.predict, np.float64), np.asarray(out.regress, np.float64)

  j = np.arange(seq)[None]
  trained = np.zeros((rows, seq), bool)
  trained[:, :-1] = (batch["loss_mask"][:, 1:] > 0) & (j[:, :-1] + 1 < lengths[:, None])
  f_next = np.concatenate([feats[:, 1:], np.zeros_like(feats[:, :1])], 1)
  reg = smooth_l1(regress - f_next).mean(-1)
  target_logp = log_softmax(f_next @ lm_head)
  draft_logp = log_softmax(predict @ lm_head)
  ce = -(np.exp(target_logp) * draft_logp).sum(-1)
  top1 = draft_logp.argmax(-1) == target_logp.argmax(-1)
  n = trained.sum()
  assert 0 < n < trained[:, :-1].size and not trained[2].any()
  expected = {"reg_sum": (reg * trained).sum(), "cls_sum": (ce * trained).sum(),
              "top1_sum": (top1 * trained).sum(), "weight": n, "tokens": lengths.sum()}
  for k, v in expected.items():
    np.testing.assert_allclose(float(sums[k]), v, rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(float(loss), (w_reg * expected["reg_sum"] +
                                           w_cls * expected["cls_sum"]) / n, rtol=2e-5)


# ----------------------------------------------------------------------------- 3. accumulation


@pytest.fixture(scope="module")
def one_device_steps(assets, target):
  """2 steps of step_config (16 rows, grad_accum 2) on 1 device: (batch, metrics, params)."""
  config = step_config(assets["model"], (1, 1, 1))
  batch = step_batch(target.cfg.vocab_size)
  _, state, history = train_steps(config, steps=2, batch=batch, target=target)
  return batch, history, flat_params(state.params)


def test_grad_accumulation_matches_one_batch(assets, target, one_device_steps):
  """grad_accum=2 over 16 rows == grad_accum=1 over the same rows, though the two
  micro-batches train different numbers of tokens (gradients weighted per token)."""
  batch, accumulated, accumulated_params = one_device_steps
  j = np.arange(batch["input_ids"].shape[1] - 1)[None]
  trained = (batch["loss_mask"][:, 1:] > 0) & (j + 1 < batch["length"][:, None])
  per_micro = trained.reshape(2, -1).sum(1)
  assert abs(per_micro[0] - per_micro[1]) > 0.2 * per_micro.max(), per_micro
  config = step_config(assets["model"], (1, 1, 1), grad_accum=1)
  _, state, history = train_steps(config, steps=2, batch=batch, target=target)
  for step, (one, two) in enumerate(zip(history, accumulated)):
    assert one["trained_tokens"] == two["trained_tokens"] == per_micro.sum()
    for k in ("loss", "loss_reg", "loss_cls", "top1", "grad_norm"):
      np.testing.assert_allclose(two[k], one[k], rtol=1e-5, err_msg=f"step {step} {k}")
  # lr 1e-3: a wrong weighting moves params by ~lr; Adam turns float32 rounding into ~1e-6.
  assert_trees_close(accumulated_params, flat_params(state.params), atol=1e-5, what="params")


# ----------------------------------------------------------------------------- 4. agreement

DEPTHS = 4


@pytest.fixture(scope="module")
def agreement_run(assets, target):
  """A draft fitted for 40 steps to one batch of real conversations (so that it agrees
  with the target far from always-0), and make_agreement_fn's output on that batch plus
  each pass's top-1 predictions, recorded from inside the jitted function.

  Returns (setup, params, batch, sums, top1 [depth] -> [rows, seq])."""
  builder = data_lib.TrainBatches(assets["builder_dir"], "train", 8, shuffle=False,
                                  shard_index=0, shard_count=1)
  batch = {k: v for k, v in next(builder).items() if k != "attention_mask"}  # [8, 48]
  config = step_config(assets["model"], (1, 1, 1), grad_accum=1, global_batch=8)
  config.train.learning_rate = 1e-2
  setup, state, history = train_steps(config, steps=40, batch=batch, target=target)
  assert history[-1]["top1"] > 0.5, history[-1]

  traced, recorded = [], {}  # jax.lax.top_k runs once per pass, on the draft's logits
  real_top_k = jax.lax.top_k

  def recording_top_k(x, k):
    values, indices = real_top_k(x, k)
    traced.append(len(traced) + 1)  # the pass being traced
    jax.debug.callback(lambda i, depth=traced[-1]: recorded.__setitem__(depth, np.asarray(i)),
                       indices)
    return values, indices

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax.lax, "top_k", recording_top_k)
    agreement = train_lib.make_agreement_fn(setup, depths=DEPTHS)
    sums = jax.device_get(agreement(state.params, target.params, batch))
  assert traced == list(range(1, DEPTHS + 1)) and sorted(recorded) == traced
  top1 = {k: recorded[k][..., 0] for k in traced}
  return setup, state.params, batch, sums, top1


def test_agreement_depth1_equals_training_top1(agreement_run, target):
  setup, params, batch, sums, _ = agreement_run
  draft = nnx.merge(setup.draft_graphdef, params)
  model = nnx.merge(target.graphdef, target.params)
  _, loss_sums = train_lib.draft_loss(draft, model, batch, jax.random.key(0),
                                      train_lib.LossConfig(noise=0.0))
  assert loss_sums["top1_sum"] > 10 and float(sums["top1_depth2"]) > 10  # far from 0
  assert float(sums["top1_depth1"]) == float(loss_sums["top1_sum"])
  assert float(sums["count_depth1"]) == float(loss_sums["weight"])
  for k in ("reg_sum", "cls_sum", "weight"):
    np.testing.assert_allclose(float(sums[k]), float(loss_sums[k]), rtol=1e-5, err_msg=k)
  # Pass k counts only trained positions whose chain starts at an anchor j-k+1 >= 0.
  weights = np.asarray(train_lib.target_outputs(model, batch["input_ids"], batch["loss_mask"],
                                                batch["length"]).weights)
  for k in range(2, DEPTHS + 1):
    assert float(sums[f"count_depth{k}"]) == weights[:, k - 1:].sum()


def test_agreement_matches_autoregressive_drafting(agreement_run, target):
  """Pass k's top-1 at position a+k-1 == the draft run autoregressively with its KV cache:
  true features up to anchor a, then its own `regress` fed back k-1 times (data tokens)."""
  setup, params, batch, _, agreement_top1 = agreement_run
  model = nnx.merge(target.graphdef, target.params)

  @jax.jit
  def draft_call(features, embeddings, positions, cache):  # Draft.__call__ + LM head
    out = nnx.merge(setup.draft_graphdef, params)(features, embeddings, positions, cache)
    return jnp.argmax(model.logits(out.predict[:, -1]), -1), out.regress[:, -1:], out.cache

  ids = jnp.asarray(batch["input_ids"])
  rows, seq = ids.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
  feats, _ = jax.jit(model.features)(ids, positions, None)
  next_emb = train_lib.shifted_embeddings(model, ids)  # e(t(j+1)) at j
  compared, chain_changed = 0, 0
  for anchor in (0, 13, 29, 44):
    cache = init_draft_cache(setup.draft_cfg, rows, seq + DEPTHS)
    for k in range(1, DEPTHS + 1):
      pos = anchor + k - 1
      if k == 1:  # the committed prefix 0..anchor with true features, causally
        reference, regress, cache = draft_call(feats[:, :pos + 1], next_emb[:, :pos + 1],
                                               positions[:, :pos + 1], cache)
      else:  # the previous step's regress with the data token t(pos+1), at position pos
        reference, regress, cache = draft_call(regress, next_emb[:, pos:pos + 1],
                                               positions[:, pos:pos + 1], cache)
      cache = cache.replace(lengths=jnp.full((rows,), pos + 1, jnp.int32))  # commit
      np.testing.assert_array_equal(agreement_top1[k][:, pos], reference,
                                    err_msg=f"anchor {anchor} depth {k}")
      compared += rows
      chain_changed += int(np.sum(reference != agreement_top1[1][:, pos]))
  assert compared == 4 * DEPTHS * rows
  assert chain_changed > 0  # fed-back features change predictions: the check has teeth


# ----------------------------------------------------------------------------- 5. resume


@pytest.fixture(scope="module")
def reference_run(assets, target, tmp_path_factory):
  """An uninterrupted RESUME run: (config, final params)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  config = make_config(assets, **RESUME)
  trainer.train(config, str(workdir), progress=False)
  step, state, _, _ = restore(workdir, config, target)
  assert step == RESUME["steps"]
  return config, flat_params(state.params)


@pytest.fixture(scope="module")
def interrupted_workdir(assets, tmp_path_factory):
  """A RESUME run stopped after 20 steps: complete checkpoints at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("interrupted") / "w"
  trainer.train(make_config(assets, **{**RESUME, "steps": 20}), str(workdir), progress=False)
  assert complete_steps(workdir) == [10, 20]
  return workdir


def resume_and_compare(workdir, reference_run, target, monkeypatch, resumed_from):
  config, expected = reference_run
  steps_run = count_train_steps(monkeypatch)
  trainer.train(config, str(workdir), progress=False)
  assert len(steps_run) == RESUME["steps"] - resumed_from, "did not resume where expected"
  step, state, _, _ = restore(workdir, config, target)
  assert step == RESUME["steps"]
  assert_trees_close(flat_params(state.params), expected, atol=1e-6, what="resumed")


def test_resume_matches_uninterrupted(interrupted_workdir, reference_run, target, tmp_path,
                                      monkeypatch):
  workdir = tmp_path / "w"
  shutil.copytree(interrupted_workdir, workdir)
  resume_and_compare(workdir, reference_run, target, monkeypatch, resumed_from=20)
  steps = [r["step"] for r in read_metrics(workdir)]
  assert steps == [10, 20, 30, 40, 50, 60]  # the resumed run appended to the same log


@pytest.mark.parametrize("damage", [
    "tmp_dir",
    "no_commit_marker",
])
def test_half_written_checkpoint_is_never_loaded(interrupted_workdir, reference_run, target,
                                                 tmp_path, monkeypatch, damage):
  """Step 20 half-written (killed mid-save): resume must use step 10."""
  workdir = tmp_path / "w"
  shutil.copytree(interrupted_workdir, workdir)
  step_dir = workdir / "checkpoints" / "20"
  for path in glob.glob(str(step_dir / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(path) and "manifest" in os.path.basename(path):
      os.remove(path)  # the array data is unreadable without its manifests
  if damage == "tmp_dir":  # how orbax leaves a save that died before its final rename
    os.rename(step_dir, workdir / "checkpoints" / "20.orbax-checkpoint-tmp")
  else:  # a step directory without its commit markers (e.g. a non-atomic copy or rename)
    for marker in glob.glob(str(step_dir / "**" / "commit_success.txt"), recursive=True):
      os.remove(marker)
  ckpt = train_lib.Checkpointer(str(workdir), keep=RESUME["keep_checkpoints"])
  try:
    latest = ckpt.latest_step()
  finally:
    ckpt.close()
  assert latest == 10, f"the half-written step {latest} would be restored"
  resume_and_compare(workdir, reference_run, target, monkeypatch, resumed_from=10)


def test_sigkill_then_rerun_matches_uninterrupted(assets, reference_run, target, tmp_path):
  workdir = tmp_path / "w"
  cmd = train_cli(assets, workdir, **RESUME)
  proc = start_cli(cmd, tmp_path / "killed.log")
  try:
    wait_for(lambda: complete_steps(workdir), proc, what="the first checkpoint")
    time.sleep(random.uniform(0.0, 0.1))  # any moment after it: mid-step or mid-save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before the kill"
  finally:
    proc.kill()
  resumed_from = complete_steps(workdir)[-1]
  assert RESUME["checkpoint_every"] <= resumed_from < RESUME["steps"]
  rerun = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = re.search(r"resumed from \S+ step (\d+)", rerun.stderr)
  assert resumed and int(resumed.group(1)) == resumed_from, rerun.stderr[-3000:]
  config, expected = reference_run
  step, state, _, _ = restore(workdir, config, target)
  assert step == RESUME["steps"]
  assert_trees_close(flat_params(state.params), expected, atol=1e-6, what="after SIGKILL")


def test_sigterm_saves_current_step_and_exits_cleanly(assets, target, tmp_path):
  workdir = tmp_path / "w"
  steps = 100_000  # never reached: only SIGTERM ends this run
  overrides = {**RESUME, "steps": steps, "checkpoint_every": steps, "log_every": 1}
  proc = start_cli(train_cli(assets, workdir, **overrides), tmp_path / "sigterm.log")
  try:
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc,
             what="three logged steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "sigterm.log").read_text()[-3000:]
  finally:
    proc.kill()
  log = (tmp_path / "sigterm.log").read_text()
  saved = complete_steps(workdir)
  assert len(saved) == 1 and 3 <= saved[0] < steps, saved  # only the SIGTERM save
  assert f"preempted at step {saved[0]}: checkpoint saved" in log
  assert read_metrics(workdir)[-1]["step"] == saved[0]  # the step it had reached
  config = make_config(assets, **overrides)
  step, state, data_state, meta = restore(workdir, config, target)
  assert int(state.step) == step == saved[0]
  assert data_state["next_batch"] == saved[0]
  assert meta["draft_config"]["kind"] == "fspad"


# ----------------------------------------------------------------------------- 6. sharding


def runner_cmd(assets, out, devices, *extra):
  return [sys.executable, os.path.join(HERE, "train_runner.py"), "--model_dir", assets["model"],
          "--out", str(out), "--devices", str(devices), "--data", assets["data"],
          "--prepared_dir", assets["prepared"], *extra]


MULTI_DEVICE_TESTS = ("test_eight_simulated_devices_match_one", "test_two_processes_match_one",
                      "test_batch_not_divisible_by_data_axes",
                      "test_eight_simulated_devices_match_one_with_ttt")
TTT_MESH = "2,2,2"


@pytest.fixture(scope="module", autouse=True)
def multi_device_jobs(compilation_cache, tmp_path_factory, request):
  """Starts the two multi-device subprocess jobs in the background at the module's first
  test (when one of MULTI_DEVICE_TESTS is selected), so they overlap with the others:
    "eight": one 8-device process: 2 steps on every mesh, the validation errors that need
             several devices, and a whole trainer.train run on a (2, 2, 2) mesh;
    "two":   that trainer.train run on 2 processes x 4 devices (jax.distributed, gloo), a
             ProcessGroup: restarted (fresh port and workdir) if gloo's connection timed
             out on a loaded machine; its workdir is root / f"two-{attempt}"."""
  if not any(item.name in MULTI_DEVICE_TESTS for item in request.session.items):
    yield None
    return
  assets = request.getfixturevalue("assets")
  root = tmp_path_factory.mktemp("multi_device")
  with open(root / "eight.log", "w") as log:  # a file: no pipe to fill up
    eight = subprocess.Popen(
        runner_cmd(assets, root / "eight.npz", 8, "--meshes", *MESHES, "--check_validation",
                   "--ttt_meshes", TTT_MESH,
                   "--train_workdir", str(root / "eight")),
        env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)

  def two_commands(port, attempt):
    return [runner_cmd(assets, root / "two.npz", 4, "--num_processes", "2", "--process_id",
                       str(i), "--coordinator", f"localhost:{port}",
                       "--train_workdir", str(root / f"two-{attempt}")) for i in range(2)]

  two = ProcessGroup(two_commands, root, "two", subprocess_env(), attempts=2).start()
  yield root, eight, two
  if eight.poll() is None:
    eight.kill()
  two.kill()


def finished_eight(jobs):
  root, eight, _ = jobs
  eight.wait(timeout=600)
  log = (root / "eight.log").read_text()
  assert eight.returncode == 0, log[-3000:]
  assert "devices 8 processes 1 ok" in log, log[-3000:]


def finished_two(jobs):
  """The two-process job's workdir, once both processes succeeded."""
  root, _, two = jobs
  logs = two.wait(timeout=600)
  for code, log in zip(two.returncodes, logs):
    assert code == 0, log[-3000:]
    assert "devices 8 processes 2 ok" in log, log[-3000:]
  return root / f"two-{two.attempt}"


@pytest.fixture(scope="module")
def eight_devices(multi_device_jobs):
  """The "eight" job's results (npz as a dict) and its trainer.train workdir."""
  finished_eight(multi_device_jobs)
  root = multi_device_jobs[0]
  return dict(np.load(root / "eight.npz")), root / "eight"


def test_eight_simulated_devices_match_one(one_device_steps, eight_devices):
  results, _ = eight_devices
  _, history, expected = one_device_steps
  for mesh in MESHES:
    for i, metrics in enumerate(history):
      for k in ("loss", "loss_reg", "loss_cls", "grad_norm", "trained_tokens"):
        np.testing.assert_allclose(results[f"{mesh}/{k}_{i}"], metrics[k], rtol=1e-5,
                                   err_msg=f"mesh {mesh} step {i} {k}")
    params = {k[len(f"{mesh}/param/"):]: v for k, v in results.items()
              if k.startswith(f"{mesh}/param/")}
    assert_trees_close(params, expected, atol=2e-5, what=f"mesh {mesh}")


def test_eight_simulated_devices_match_one_with_ttt(assets, target, eight_devices):
  """The training-time-test loss (ttt_steps=3) on a (2, 2, 2) mesh == on 1 device."""
  results, _ = eight_devices
  config = step_config(assets["model"], (1, 1, 1), ttt_steps=TTT_STEPS)
  _, state, history = train_steps(config, steps=2, batch=step_batch(target.cfg.vocab_size),
                                  target=target)
  for i, metrics in enumerate(history):
    assert f"loss_cls_step{TTT_STEPS}" in metrics
    for k in ("loss", "loss_reg", "loss_cls", "grad_norm", f"loss_reg_step{TTT_STEPS}"):
      np.testing.assert_allclose(results[f"ttt/{TTT_MESH}/{k}_{i}"], metrics[k], rtol=1e-5,
                                 err_msg=f"step {i} {k}")
  prefix = f"ttt/{TTT_MESH}/param/"
  params = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
  assert_trees_close(params, flat_params(state.params), atol=2e-5, what="ttt params")


def test_two_processes_match_one(assets, target, eight_devices, multi_device_jobs):
  """trainer.train on 2 processes x 4 devices (jax.distributed, gloo) == 1 x 8: logged
  losses and agreement, and the final checkpoint (train_loop_config: ttt_steps=2)."""
  _, workdir_8 = eight_devices
  workdir = finished_two(multi_device_jobs)
  for split in ("train", "eval"):
    two, one = read_metrics(workdir, split), read_metrics(workdir_8, split)
    assert [r["step"] for r in two] == [r["step"] for r in one] and one
    for a, b in zip(two, one):
      for k in b:
        if k.startswith(("loss", "top1", "top3", "grad_norm")):
          np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=f"{split} {k}")
  config = train_loop_config(assets["model"], assets["data"], assets["prepared"], (1, 1, 1))
  step_2, state_2, _, _ = restore(workdir, config, target)
  step_1, state_1, _, _ = restore(workdir_8, config, target)
  assert step_2 == step_1 == config.train.steps
  assert_trees_close(flat_params(state_2.params), flat_params(state_1.params), atol=1e-6)


# ----------------------------------------------------------------------------- 7. validation


def test_bad_configs_fail_before_anything_compiles(assets, tmp_path, monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError("reached model loading/compilation with an invalid config")
  monkeypatch.setattr(trainer.Target, "from_pretrained", must_not_run)
  monkeypatch.setattr(train_lib, "make_train_step", must_not_run)
  compiles = []
  listener = lambda event, *a, **k: compiles.append(event) if "compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  cases = [
      ({"draft.kind": "medusa"}, r"draft.kind='medusa': expected one of eagle, fspad"),
      ({"mesh.shape": (2, 1, 1)}, r"mesh.shape: .*needs 2 devices, but 1 are available"),
      ({"target.path": ""}, r"config key target.path is not set"),
      ({"target.path": str(tmp_path)}, r"not a model directory \(no config.json\)"),
      ({"data.path": ""}, r"data.path='': no such file"),
      ({"data.path": str(tmp_path / "missing.jsonl")}, r"missing.jsonl': no such file"),
      ({"train.global_batch": 6, "train.grad_accum": 4}, r"positive multiple of"),
      ({"train.steps": 0}, r"train.steps=0 must be >= 1"),
  ]
  try:
    for overrides, message in cases:
      config = make_config(assets)
      for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
      with pytest.raises(ConfigError, match=message):
        trainer.train(config, str(tmp_path / "w"), progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles and not (tmp_path / "w").exists()


def test_batch_not_divisible_by_data_axes(eight_devices):
  results, _ = eight_devices
  expected = {
      "batch": "global_batch / train.grad_accum = 12 is not divisible by the mesh's data x "
               "fsdp = 8 devices",
      "accum_batch": "= 2 is not divisible by the mesh's data x fsdp = 4 devices",
      "eval_batch": "eval_batch_size=6 is not divisible by the mesh's data x fsdp = 4",
      "mesh": "mesh shape (3, 1, 1) (data, fsdp, tensor) needs 3 devices, but 8 are",
  }
  for name, fragment in expected.items():
    message = str(results[f"validation/{name}"])
    assert message.startswith("ConfigError: ") and fragment in message, (name, message)


def test_cli_bad_config_is_one_line_error(assets, tmp_path):
  proc = subprocess.run(train_cli(assets, tmp_path / "w", "x", steps=3),
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert lines == ["train.py: error: config key draft.kind='x': expected one of eagle, fspad, "
                   "fs_only, pad_only, eagle3, fspad3"], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- 8. CLI


def test_cli_overrides_run_eagle(assets, tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      train_cli(assets, workdir, "eagle", **LEARN, steps=3, log_every=1, checkpoint_every=2),
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
  with open(workdir / "draft_config.json") as f:
    draft_cfg = json.load(f)
  assert draft_cfg["kind"] == "eagle" and draft_cfg["hidden_size"] == 64
  assert complete_steps(workdir) == [2, 3]
  last = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert last["loss"] == read_metrics(workdir)[-1]["loss"]


# ----------------------------------------------------------------------------- configs


# Shapes of the targets the shipped configs name (from their config.json).
TARGET_SHAPES = {
    "llama3_8b": {"num_heads": 32, "num_kv_heads": 8, "intermediate_size": 14336,
                  "vocab_size": 128256},
    "vicuna_7b": {"num_heads": 32, "num_kv_heads": 32, "intermediate_size": 11008,
                  "vocab_size": 32000},
    "llama3_70b": {"num_heads": 64, "num_kv_heads": 8, "intermediate_size": 28672,
                   "vocab_size": 128256},
}


def _config_args():
  """(name, None) for every config, plus (name, preset) for each entry of its PRESETS."""
  args = []
  for name in ["tiny", *TARGET_SHAPES]:
    module = load_config_module(repo_config_path(name))
    args += [(name, None)] + [(name, preset) for preset in getattr(module, "PRESETS", {})]
  return args


def _keys(config, prefix=""):
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = type(v)
  return out


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags'
@pytest.mark.parametrize("name,arg", _config_args())
def test_config_files_load_and_are_consistent(name, arg):
  """Each configs/*.py (and each preset) loads the way config_flags loads it, has every key
  of configs/tiny.py, and its batch fits its mesh. No checkpoint is needed."""
  path = os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else "")
  config = config_flags.ConfigFileFlagParser(name="config").parse(path)
  schema, keys = _keys(load_repo_config("tiny")), _keys(config)
  missing = sorted(set(schema) - set(keys))
  assert not missing, f"{path} lacks {missing}"
  for key, kind in schema.items():
    numeric = {int, float}
    assert keys[key] is kind or {keys[key], kind} <= numeric | {tuple, list}, (key, keys[key])
  d, t = config.draft, config.train
  assert d.kind in DRAFT_KINDS and d.dtype in ("float32", "bfloat16")
  assert t.decay in ("linear", "cosine", "constant") and t.clip in ("value", "global_norm", "none")
  assert t.steps >= 1 and t.global_batch % t.grad_accum == 0
  shape = tuple(config.mesh.shape)
  assert len(shape) == 3 and shape.count(-1) <= 1
  data_ways = shape[0] * shape[1]
  if -1 in shape[:2]:
    data_ways = 1  # "the remaining devices" on a data axis: only checked on real hardware
  micro = t.global_batch // t.grad_accum
  assert micro % data_ways == 0 and t.eval_batch_size % data_ways == 0, (shape, micro)
  if name in TARGET_SHAPES:
    tensor = shape[2]
    target_shape = TARGET_SHAPES[name]
    if tensor > 1:  # weights split over tensor divide evenly (else silently replicated)
      for k, v in target_shape.items():
        assert v % tensor == 0, (k, v, tensor)
    assert config.data.max_len == 2048 and not config.data.path  # the data must be given
    assert d.shape.intermediate_size in (0, target_shape["intermediate_size"])
    assert t.b1 == 0.9 and t.b2 == 0.95 and t.clip == "value" and t.clip_value == 0.5
    assert t.global_batch == 16 and d.kind == "fspad" and d.dtype == "bfloat16"
    with open(path.split(":")[0]) as f:
      assert "python train.py --config=configs/" in f.read()  # documents its command line
