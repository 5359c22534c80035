"""train.py's user mistakes and faults: each ends in one line naming its cause, exits non-zero,
and loses no checkpoint or metrics record (issue 11, the train.py side).

Refusals that happen before training run through the real CLI (a subprocess each, ~10 s of
JAX import); the resume refusals share one 2-step run; a partial metrics line and Ctrl-C
share one more run. Data layouts and the tfds error path run in-process.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fspad_jax import data as data_lib
from fspad_jax import trainer
from fspad_jax.config import ConfigError, load_repo_config
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAX_LEN = 128  # every tiny conversation fits
CACHE_ENV = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA cache for the subprocesses: the 2-step run and the Ctrl-C run compile
  the same program (constant schedule, so train.steps does not enter it)."""
  CACHE_ENV.update({"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  yield
  CACHE_ENV.clear()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("errors")
  cfg = tiny_config(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    num_layers=1)
  model = make_tiny_checkpoint(str(root / "model"), cfg, seed=3)
  other = make_tiny_checkpoint(str(root / "other_model"), cfg, seed=4)  # same shapes
  data = make_tiny_conversations(str(root / "conversations.jsonl"), num=40)
  other_data = make_tiny_conversations(str(root / "other.jsonl"), num=40, seed=1)
  return {"root": root, "model": model, "other_model": other, "data": data,
          "other_data": other_data}


def cli(assets, workdir, *extra, **flags):
  """The train.py command line: tiny config, constant schedule, no eval, no TensorBoard."""
  base = {"target.path": assets["model"], "data.path": assets["data"],
          "data.max_len": MAX_LEN, "train.eval_every": 0, "train.tensorboard": False,
          "train.depths": 1, "train.log_every": 1, "train.decay": "constant",
          "train.warmup_steps": 0, "train.global_batch": 4, "train.eval_batch_size": 4}
  base.update(flags)
  return ([sys.executable, os.path.join(REPO, "train.py"), "--config=configs/tiny.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in base.items()]
          + list(extra))


def env():
  e = dict(os.environ, HF_HUB_OFFLINE="1", **CACHE_ENV)
  e["PYTHONPATH"] = os.pathsep.join([REPO, e.get("PYTHONPATH", "")])
  e.pop("XLA_FLAGS", None)
  return e


def run_cli(cmd, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=timeout)


def assert_one_line_error(proc, *fragments, code=1):
  """Exit `code`, and the last stderr line is train.py's error naming every fragment; no
  traceback anywhere."""
  assert proc.returncode == code, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("train.py: "), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in last, (fragment, last)
  return last


def snapshot(workdir) -> dict:
  """Every file under the workdir's checkpoints plus metrics.jsonl, with a content hash."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel.startswith(("checkpoints", "metrics.jsonl")):
        with open(path, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def complete_steps(workdir) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.exists(os.path.join(root, n, "commit_success.txt")))


def metric_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


# ----------------------------------------------------------------------------- data layouts


def _strip_ids(path):
  """The conversations without ids (so the split hashes the record index, not an id)."""
  with open(path) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop("id")
  return records


def test_one_line_list_jsonl_and_indented_list_prepare_alike(assets, tmp_path):
  """A JSON list written by json.dump without indentation puts every record on line 1: the
  examples are keyed (and split) by record index, so all three layouts give the same data."""
  records = _strip_ids(assets["data"])
  layouts = {"one_line.json": json.dumps(records),
             "records.jsonl": "".join(json.dumps(r) + "\n" for r in records),
             "indented.json": json.dumps(records, indent=2)}
  results = {}
  for name, text in layouts.items():
    path = tmp_path / name
    path.write_text(text)
    builder_dir, report = data_lib.prepare_dataset(str(path), assets["model"], MAX_LEN,
                                                   str(tmp_path / "prepared"),
                                                   val_fraction=0.2)
    assert report["records"] == len(records) and not report["bad"], report
    assert report["train"] + report["validation"] == len(records), report
    assert report["validation"] > 0 and report["train"] > 0, report  # not all on one side
    rows = {}
    for split in ("train", "validation"):
      batches = data_lib.TrainBatches(builder_dir, split, 1, shuffle=False, num_epochs=1,
                                      drop_remainder=False, shard_index=0, shard_count=1)
      rows[split] = sorted(bytes(b["input_ids"]) for b in batches)
    results[name] = rows
  assert results["one_line.json"] == results["records.jsonl"] == results["indented.json"]


def test_a_tfds_failure_is_one_line_with_its_real_cause(assets, tmp_path, monkeypatch):
  """Whatever tensorflow-datasets fails on, the user sees its innermost cause (here: two
  examples with one key, which tfds would describe by importing TensorFlow)."""
  tokenize_all = data_lib._tokenize_all

  def duplicated_keys(*args, **kwargs):
    examples, truncated = tokenize_all(*args, **kwargs)
    return {s: [e._replace(index=0) for e in v] for s, v in examples.items()}, truncated
  monkeypatch.setattr(data_lib, "_tokenize_all", duplicated_keys)
  with pytest.raises(data_lib.DataError) as info:
    data_lib.prepare_dataset(assets["data"], assets["model"], MAX_LEN, str(tmp_path / "p"))
  message = str(info.value)
  assert "\n" not in message and "DuplicatedKeysError" in message, message
  assert "tensorflow" not in message.lower().replace("tensorflow-datasets", ""), message


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("key,value,expected", [
    ("train.learning_rate", -1e-3, "train.learning_rate=-0.001 must be > 0"),
    ("train.learning_rate", float("nan"), "train.learning_rate=nan must be a finite number"),
    ("train.noise", -0.1, "train.noise=-0.1 must be >= 0"),
    ("train.w_cls", float("inf"), "train.w_cls=inf must be a finite number"),
    ("train.clip_value", 0.0, "train.clip_value=0.0 must be > 0"),
    ("train.warmup_steps", -5, "train.warmup_steps=-5 must be >= 0"),
    ("train.global_batch", 0, "train.global_batch=0 must be >= 1"),
    ("train.seed", -1, "train.seed=-1 must be >= 0"),
    ("train.b2", 1.0, "train.b2=1.0 must be >= 0 and < 1"),
    ("data.max_len", 1, "data.max_len=1 must be >= 2"),
    ("data.val_fraction", 1.5, "data.val_fraction=1.5 must be >= 0 and < 1"),
    ("train.decay", "cosin", "train.decay='cosin': expected one of linear, cosine"),
    ("train.fusion_lr_scale", -0.1, "train.fusion_lr_scale=-0.1 must be >= 0"),
    ("train.fusion_init", "eye", "train.fusion_init='eye': expected one of random, last"),
])
def test_numeric_keys_are_checked_before_anything_loads(key, value, expected):
  config = load_repo_config("tiny")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=re.escape("config key " + expected)):
    trainer.validate_numbers(config)


def test_default_configs_pass_the_numeric_checks():
  for name in ("tiny", "llama3_8b", "vicuna_7b", "llama3_70b"):
    trainer.validate_numbers(load_repo_config(name))


# ----------------------------------------------------------------------------- CLI refusals


def _corrupt_targets(assets, root):
  """Model directories that must be refused from their files alone."""
  cases = {}
  truncated = root / "truncated"
  shutil.copytree(assets["model"], truncated)
  weights = truncated / "model.safetensors"
  os.truncate(weights, os.path.getsize(weights) - 1000)
  cases["truncated"] = (truncated, ["model.safetensors", "truncated"])
  pickle_only = root / "pickle_only"
  shutil.copytree(assets["model"], pickle_only)
  os.rename(pickle_only / "model.safetensors", pickle_only / "pytorch_model.bin")
  cases["pickle_only"] = (pickle_only, ["pickle_only", "pickle-based weights"])
  layers = root / "layers"
  shutil.copytree(assets["model"], layers)
  raw = json.loads((layers / "config.json").read_text())
  raw["num_hidden_layers"] = 1_000_000
  (layers / "config.json").write_text(json.dumps(raw))
  cases["num_hidden_layers"] = (layers, ["config.json", "num_hidden_layers=1000000",
                                         "hold 1 layer"])
  return cases


def test_cli_refusals_before_training(assets, tmp_path):
  """Each case: one line naming the key or file, exit 1, in seconds, nothing trained."""
  bad_records = tmp_path / "bad.jsonl"
  bad_records.write_text("not json\n[1, 2]\n{\"conversations\": []}\n")
  no_assistant = tmp_path / "no_assistant.jsonl"
  no_assistant.write_text("".join(json.dumps({"conversations": [
      {"from": "human", "value": f"question {i}"}]}) + "\n" for i in range(5)))
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases = [
      ({"train.learning_rate": -0.001}, [], ["train.learning_rate=-0.001 must be > 0"]),
      ({}, ["--config.train.seed=-1"], ["train.seed=-1 must be >= 0"]),
      ({"data.path": str(bad_records)}, [], ["bad.jsonl", "no usable training conversation",
                                             "invalid_json"]),
      ({"data.path": str(no_assistant)}, [], ["no_assistant.jsonl", "no_assistant"]),
      ({"workdir": str(a_file / "w")}, [], ["--workdir=", "cannot write there"]),
  ]
  for name, (target, fragments) in _corrupt_targets(assets, tmp_path).items():
    cases.append(({"target.path": str(target)}, [], fragments))
  for flags, extra, fragments in cases:
    workdir = flags.pop("workdir", str(tmp_path / "w"))
    start = time.perf_counter()
    proc = run_cli(cli(assets, workdir, *extra, **flags), timeout=180)
    assert_one_line_error(proc, *fragments)
    assert time.perf_counter() - start < 120
    assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints")), flags


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
  """A finished 2-step run (checkpoints at steps 1 and 2), shared by the resume cases."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  proc = run_cli(cli(assets, workdir, **{"train.steps": 2, "train.checkpoint_every": 1}))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert complete_steps(workdir) == [1, 2] and metric_steps(workdir) == [1, 2]
  return workdir


def test_resume_refuses_changed_inputs_before_loading(assets, trained, tmp_path):
  """A rerun on the workdir with another draft kind, target (same shapes), data file or
  data setting: one line naming what changed, before the target loads; nothing changes."""
  before = snapshot(trained)
  cases = [
      ({"draft.kind": "eagle"}, ["holds a 'fspad' draft", "draft.kind='eagle'"]),
      ({"target.path": assets["other_model"]}, ["target.path=", "other_model",
                                                "weights differ"]),
      ({"data.path": assets["other_data"]}, ["data.path=", "other.jsonl",
                                             "not the data this workdir was trained on"]),
      ({"data.max_len": MAX_LEN + 16}, [f"data.max_len {MAX_LEN} -> {MAX_LEN + 16}"]),
  ]
  for flags, fragments in cases:
    proc = run_cli(cli(assets, trained, **{"train.steps": 4, **flags}), timeout=180)
    assert_one_line_error(proc, *fragments)
    assert "Orbax" not in proc.stderr and "resumed from" not in proc.stderr
  assert snapshot(trained) == before  # no checkpoint or metrics record lost or added


def test_changed_draft_shape_is_refused_from_the_stored_meta(assets, trained):
  """Any draft field that changes the checkpoint's tree (here the MLP width) is refused from
  the stored metadata alone, naming the field; the compute dtype is not such a field."""
  from fspad_jax import train_lib
  from fspad_jax.config import load_hf_config
  config = load_repo_config("tiny")
  config.target.path, config.data.path = assets["model"], assets["data"]
  config.data.max_len = MAX_LEN
  ckpt = train_lib.Checkpointer(str(trained), keep=2)
  try:
    meta = ckpt.restore_meta(ckpt.latest_step())
  finally:
    ckpt.close()
  fingerprints = trainer.run_fingerprints(config)
  target_cfg = load_hf_config(assets["model"])
  trainer.check_resumable(meta, trainer.draft_config(config, target_cfg), fingerprints,
                          config, "W")  # the same run: accepted
  config.draft.dtype = "bfloat16"
  trainer.check_resumable(meta, trainer.draft_config(config, target_cfg), fingerprints,
                          config, "W")
  config.draft.shape.intermediate_size = 32
  with pytest.raises(ConfigError, match=r"W holds a draft of another shape "
                                        r"\(intermediate_size 64 -> 32\)"):
    trainer.check_resumable(meta, trainer.draft_config(config, target_cfg), fingerprints,
                            config, "W")


def test_partial_metrics_line_concurrent_run_then_ctrl_c(assets, trained, tmp_path):
  """A partial last metrics line (a crash mid-append) is dropped and the run resumes; a
  second run on the same workdir is refused while it runs; Ctrl-C then saves the step
  reached, says so in one line and exits 130; every record survives, none twice."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "split": "tra')  # no newline: cut short
  log_path = tmp_path / "run.log"
  cmd = cli(assets, workdir, **{"train.steps": 100_000, "train.checkpoint_every": 100_000})
  with open(log_path, "w") as log:  # a file, not a pipe: absl logs would fill a pipe
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while len(metric_steps_safe(workdir)) < 4:
      assert proc.poll() is None, log_path.read_text()[-3000:]
      assert time.time() < deadline, "no training progress"
      time.sleep(0.05)
    second = run_cli(cmd, timeout=180)  # a concurrent run on the same workdir
    assert_one_line_error(second, "--workdir=", "another train.py (pid", "train.lock")
    assert proc.poll() is None, "the concurrent run disturbed the first one"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log_path.read_text()[-3000:]
  finally:
    proc.kill()
  log = log_path.read_text()
  assert "dropping a partial last line" in log and "resumed from" in log
  assert "Traceback" not in log, log[-3000:]
  saved = complete_steps(workdir)[-1]
  assert saved >= 4
  assert log.strip().splitlines()[-1] == (
      f"train.py: interrupted (Ctrl-C): checkpoint of step {saved} saved; rerun the same "
      "command to resume")
  assert metric_steps(workdir) == list(range(1, saved + 1))  # steps 1, 2 kept, none twice


def metric_steps_safe(workdir) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [line for line in f.read().split("\n")[:-1] if line.strip()]
