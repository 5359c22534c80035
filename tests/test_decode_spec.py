"""decode.py with decode.method=eagle|fspad: speculative decoding of JSONL inputs with drafts
from train.py (workdir, step checkpoint) and EAGLE-layout directories, per-record acceptance
metrics, --compare_vanilla, refused mismatched drafts, cache_full."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fspad_jax import console, decode_lib
from fspad_jax.config import load_repo_config
from fspad_jax.decode_lib import DecodeEngine, DecodeError, run_decode
from fspad_jax.decoding import timing
from fspad_jax.draft import draft_config_from_target, init_draft
from fspad_jax.draft_checkpoint import save_draft
from fspad_jax.draft_source import load_draft_for_decode
from fspad_jax.hf_checkpoint import load_target
from fspad_jax.sharding import make_mesh
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW, BATCH = 16, 3
DEPTH, TOP_K, TOTAL = 5, 4, 16  # configs/tiny.py's tree
GOOD = [
    {"id": "p1", "prompt": "Hello world, how are you"},
    {"id": "m1", "messages": [{"role": "user", "content": "Continue: the history of"}]},
    {"id": 7, "turns": ["Name a color.", "Why that one?"]},
    {"id": "i1", "input_ids": [0, 5, 6, 7, 8, 9]},
]


def spec_config(target, method="vanilla", draft="", **decode):
  config = load_repo_config("tiny")
  config.target.path = target
  config.draft.path = draft
  config.decode.method = method
  config.decode.max_new_tokens = MAX_NEW
  config.decode.batch_size = BATCH
  config.decode.update(decode)
  return config


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def entries(record):
  """The completions of a record: itself, or its turns."""
  return record["turns"] if "turns" in record else [record]


def outputs(records):
  """id -> [(output_ids, finish_reason, text)] per turn: what must equal vanilla's."""
  return {json.dumps(r["id"]): [(e["output_ids"], e["finish_reason"], e["text"])
                                for e in entries(r)] for r in records}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A tiny target; an fspad draft trained a few steps by train.py (workdir); an EAGLE-layout
  export of it; a random EAGLE-layout eagle draft; and mismatched drafts."""
  from fspad_jax import trainer
  root = tmp_path_factory.mktemp("spec")
  d = {"target": make_tiny_checkpoint(str(root / "model"))}
  config = load_repo_config("tiny")
  config.target.path = d["target"]
  config.data.path = make_tiny_conversations(str(root / "conv.jsonl"), num=48)
  config.data.max_len = 64
  t = config.train
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.warmup_steps = 12, 12, 0, 12, 2
  t.tensorboard = False
  d["workdir"] = str(root / "work")
  trainer.train(config, d["workdir"], progress=False)
  d["step_dir"] = os.path.join(d["workdir"], "checkpoints", "12")
  mesh = make_mesh((1, 1, -1))
  target_cfg, _, _ = load_target(d["target"], mesh)
  cfg, _, params = load_draft_for_decode(d["workdir"], target_cfg, "fspad", mesh)
  d["fspad_export"] = str(root / "fspad_export")
  save_draft(d["fspad_export"], cfg, params)
  drafts = {"eagle_dir": draft_config_from_target(target_cfg, "eagle"),
            "vocab_dir": draft_config_from_target(target_cfg, "fspad", vocab_size=1000)}
  for name, dcfg in drafts.items():
    d[name] = str(root / name)
    save_draft(d[name], dcfg, nnx.state(init_draft(dcfg, seed=1)))
  # A train.py workdir whose draft is 32 wide (the target is 64): refused from its config.
  d["hidden_workdir"] = str(root / "hidden_work")
  shutil.copytree(d["workdir"], d["hidden_workdir"])
  path = os.path.join(d["hidden_workdir"], "draft_config.json")
  with open(path) as f:
    raw = json.load(f)
  with open(path, "w") as f:
    json.dump({**raw, "hidden_size": 32}, f)
  d["input"] = write_jsonl(root / "in.jsonl", GOOD)
  return d


@pytest.fixture(scope="module")
def vanilla_engine(dirs):
  return DecodeEngine(spec_config(dirs["target"]))


@pytest.fixture(scope="module")
def vanilla_run(dirs, vanilla_engine, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("vanilla") / "out.jsonl")
  summary = run_decode(None, dirs["input"], out, engine=vanilla_engine, progress=False)
  return summary, read_jsonl(out)


def _cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "decode.py")] + args, cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fspad_run(dirs, tmp_path_factory):
  """decode.py end to end: method fspad, draft = the train.py workdir, --compare_vanilla."""
  tmp = tmp_path_factory.mktemp("fspad")
  out = str(tmp / "out.jsonl")
  r = _cli([f"--config={REPO}/configs/tiny.py", f"--config.target.path={dirs['target']}",
            "--config.decode.method=fspad", f"--config.draft.path={dirs['workdir']}",
            f"--config.decode.max_new_tokens={MAX_NEW}", f"--config.decode.batch_size={BATCH}",
            f"--input={dirs['input']}", f"--output={out}", "--compare_vanilla"], tmp)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out + ".summary.json") as f:
    summary = json.load(f)
  # Loading the train.py workdir's Orbax checkpoint: no INFO chatter, no absl-format lines.
  assert console.find_noise(r.stderr) == [], r.stderr[-3000:]
  assert "INFO" not in r.stderr, r.stderr[-3000:]
  assert r.stdout.strip() == decode_lib.format_summary(summary)
  return summary, read_jsonl(out)


@pytest.fixture(scope="module")
def eagle_run(dirs, tmp_path_factory):
  """method eagle, draft = a (random) EAGLE-layout directory."""
  out = str(tmp_path_factory.mktemp("eagle") / "out.jsonl")
  summary = run_decode(spec_config(dirs["target"], "eagle", dirs["eagle_dir"]), dirs["input"],
                       out, progress=False)
  return summary, read_jsonl(out)


def check_metrics(summary, records):
  """Per-record acceptance fields agree with each other and with the summary."""
  all_steps, taus = [], []
  for r in records:
    rec_steps = []
    for e in entries(r):
      a, n = e["accept_lengths"], e["new_tokens"]
      assert all(0 <= x <= DEPTH for x in a)
      assert e["target_forwards"] == len(a) + 1
      committed = sum(a) + len(a)
      if a:
        assert e["mean_accept_len"] == round(committed / len(a), 4)
        # Every step emitted something; only the last one may be cut by stop/length.
        assert committed - (a[-1] + 1) < n - 1 <= committed
      else:
        assert e["mean_accept_len"] is None and n == 1
      if committed != n - 1:
        assert e["finish_reason"] in ("stop", "length")
      rec_steps += a
    if "turns" in r:
      assert r["target_forwards"] == sum(e["target_forwards"] for e in r["turns"])
    if rec_steps:
      taus.append(np.mean(np.asarray(rec_steps) + 1))
      assert r["mean_accept_len"] == round(taus[-1], 4)
    all_steps += rec_steps
  steps = np.asarray(all_steps)
  assert summary["verify_steps"] == len(steps)
  assert summary["target_forwards"] == sum(e["target_forwards"] for r in records
                                           for e in entries(r))
  assert summary["tau"] == round(float(np.mean(steps + 1)), 4) and summary["tau"] >= 1.0
  assert summary["tau_per_record_mean"] == round(float(np.mean(taus)), 4)
  assert summary["acceptance_by_depth"] == [round(float(np.mean(steps >= d)), 4)
                                            for d in range(1, DEPTH + 1)]
  assert summary["tree"] == {"depth": DEPTH, "top_k": TOP_K, "total_tokens": TOTAL}


def test_vanilla_records(vanilla_run):
  """Vanilla: one target forward per token, tau 1, no accept_lengths."""
  summary, records = vanilla_run
  for r in records:
    for e in entries(r):
      assert e["target_forwards"] == e["new_tokens"] and "accept_lengths" not in e
      assert e["mean_accept_len"] == (1.0 if e["new_tokens"] > 1 else None)
  assert summary["target_forwards"] == summary["new_tokens"] and summary["tau"] == 1.0
  assert summary["tree"] is None and summary["draft"] is None
  assert summary["acceptance_by_depth"] is None and "compare_vanilla" not in summary


def test_cli_fspad_workdir_compare_vanilla(fspad_run, vanilla_run, dirs):
  summary, records = fspad_run
  assert summary["method"] == "fspad" and summary["decoded"] == len(GOOD)
  assert summary["draft"]["kind"] == "fspad"
  assert summary["draft"]["path"] == os.path.abspath(dirs["workdir"])
  assert outputs(records) == outputs(vanilla_run[1])  # direct comparison
  cmp = summary["compare_vanilla"]
  assert cmp["greedy"] and cmp["checked"] == cmp["matched"] == len(GOOD)
  assert cmp["mismatches"] == [] and all(r["vanilla_match"] is True for r in records)
  assert cmp["vanilla_new_tokens"] == summary["new_tokens"] == vanilla_run[0]["new_tokens"]
  # Every batch was timed warm (compiled shapes are decoded again).
  assert cmp["speedup"] > 0 and cmp["decode_time_s"] > 0 and cmp["vanilla_decode_time_s"] > 0
  assert summary["tokens_per_s_excl_compile"] == cmp["tokens_per_s"] > 0
  # speedup: the ratio of tokens/s (not of times, which differ in output lengths)
  assert cmp["speedup"] == pytest.approx(cmp["tokens_per_s"] / cmp["vanilla_tokens_per_s"],
                                         rel=1e-3)
  assert "median of 3 interleaved warm calls" in cmp["timing"]
  text = decode_lib.format_summary(summary)
  assert text.splitlines()[0].startswith(f"decode[fspad]: {len(GOOD)} records decoded")
  assert f"tau {summary['tau']:.2f}" in text and "acceptance by depth" in text
  assert f"speedup {cmp['speedup']:.2f}x" in text
  assert f"greedy outputs equal to vanilla: {len(GOOD)}/{len(GOOD)} records" in text


class _FakeEngine:
  """generate_batch's timing interface: call k takes times[k] seconds; compiles once."""

  def __init__(self, name, times, calls, tokens=4):
    self.name, self.times, self.calls, self.tokens = name, list(times), calls, tokens
    self.last_call_compiled = False

  def generate_batch(self, prompts, seed=0):
    k = sum(1 for c in self.calls if c == self.name)
    self.calls.append(self.name)
    self.last_call_compiled = k == 0
    return [decode_lib.Completion(output_ids=[1] * self.tokens, finish_reason="length",
                                  prompt_tokens=1, decode_time_s=self.times[k])
            for _ in prompts]


def test_paired_timer_interleaves_and_takes_medians():
  calls = []
  spec = _FakeEngine("spec", [9.0, 1.0, 5.0, 2.0], calls, tokens=6)  # call 0 compiles
  vanilla = _FakeEngine("vanilla", [7.0, 4.0, 1.0, 40.0], calls, tokens=3)
  timer = timing.PairedTimer(repeats=3)
  out, vanilla_out = timer.run(spec, vanilla, [[0], [0]], seed=0)
  assert len(out) == len(vanilla_out) == 2
  assert calls == ["spec", "vanilla"] + ["spec", "vanilla"] * 3  # alternating
  assert timer.warm == 2.0 and timer.vanilla_warm == 4.0  # medians of the warm calls
  assert timer.total == 9.0  # the call whose outputs are kept (it compiled)
  s = timer.summary()
  assert s["tokens_per_s"] == 12 / 2.0 and s["vanilla_tokens_per_s"] == 6 / 4.0
  assert s["speedup"] == 4.0  # tokens/s ratio: (12 / 2) / (6 / 4)


def test_eagle_layout_dir_equals_vanilla(eagle_run, vanilla_run, dirs):
  summary, records = eagle_run
  assert summary["method"] == "eagle" and summary["draft"]["kind"] == "eagle"
  assert outputs(records) == outputs(vanilla_run[1])
  assert all("vanilla_match" not in r for r in records) and "compare_vanilla" not in summary


@pytest.mark.parametrize("run", ["fspad_run", "eagle_run"])
def test_acceptance_metrics(run, request):
  check_metrics(*request.getfixturevalue(run))


def test_step_dir_loads_the_same_draft(dirs):
  """One step's Orbax checkpoint (and the workdir: its latest step) load the same draft."""
  engine = DecodeEngine(spec_config(dirs["target"], "fspad", dirs["step_dir"]))
  assert engine.draft_info["kind"] == "fspad"
  assert engine.draft_info["path"] == os.path.abspath(dirs["step_dir"])
  mesh = make_mesh((1, 1, -1))
  a, b = (nnx.to_pure_dict(load_draft_for_decode(p, engine.cfg, "fspad", mesh)[2])
          for p in (dirs["step_dir"], dirs["workdir"]))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cache_full_rows(dirs, vanilla_engine, tmp_path):
  """A fixed cache too small for the whole answer: rows end with cache_full (one prompt
  leaves no room for even one tree), their output a prefix of vanilla's; --compare_vanilla
  reports them as mismatches at their first missing position. Draft: the EAGLE-layout
  export of the trained fspad draft."""
  cache_len = 34  # prompts up to 34 - MAX_NEW = 18 tokens; one tree needs 17 free slots
  rows = [{"id": f"c{n}", "input_ids": list(range(3, 3 + n))} for n in (4, 6, 9, 18)]
  inp, out = write_jsonl(tmp_path / "in.jsonl", rows), str(tmp_path / "out.jsonl")
  config = spec_config(dirs["target"], "fspad", dirs["fspad_export"], cache_len=cache_len)
  summary = run_decode(config, inp, out, progress=False, compare_vanilla=True)
  records = {r["id"]: r for r in read_jsonl(out)}
  assert summary["decoded"] == len(rows) and summary["draft"]["kind"] == "fspad"
  long = records["c18"]
  assert long["finish_reason"] == "cache_full" and long["new_tokens"] == 1
  assert long["accept_lengths"] == [] and long["target_forwards"] == 1
  full = [r for r in records.values() if r["finish_reason"] == "cache_full"]
  assert len(full) >= 2 and summary["finish_reasons"]["cache_full"] == len(full)
  mismatches = {m["id"]: m for m in summary["compare_vanilla"]["mismatches"]}
  ref = vanilla_engine.generate([r["input_ids"] for r in rows])
  for row, v in zip(rows, ref):
    r = records[row["id"]]
    assert r["output_ids"] == v.output_ids[:r["new_tokens"]]
    if r["finish_reason"] == "cache_full":
      assert r["new_tokens"] < len(v.output_ids) and not r["vanilla_match"]
      assert mismatches[r["id"]] == {"id": r["id"], "position": r["new_tokens"],
                                     "finish_reason": "cache_full",
                                     "vanilla_finish_reason": v.finish_reason}
      assert sum(r["accept_lengths"]) + len(r["accept_lengths"]) == r["new_tokens"] - 1
    else:
      assert r["vanilla_match"] and r["id"] not in mismatches
  assert summary["compare_vanilla"]["matched"] == len(rows) - len(full)


def test_sampling_compare_reports_speed_only(dirs, tmp_path):
  out = str(tmp_path / "out.jsonl")
  config = spec_config(dirs["target"], "fspad", dirs["workdir"], temperature=1.0, top_k=20)
  summary = run_decode(config, write_jsonl(tmp_path / "in.jsonl", GOOD[3:]), out,
                       progress=False, compare_vanilla=True)
  cmp = summary["compare_vanilla"]
  assert not cmp["greedy"] and cmp["checked"] is None and cmp["mismatches"] is None
  assert cmp["speedup"] > 0
  assert all("vanilla_match" not in r for r in read_jsonl(out))


@pytest.mark.parametrize("method,draft,match", [
    ("fspad", "eagle_dir", r"an 'eagle' draft, but decode.method='fspad' runs fspad"),
    ("eagle", "workdir", r"a 'fspad' draft, but decode.method='eagle' runs eagle"),
    ("fspad", "hidden_workdir", r"hidden_size=32, but the target's is 64"),
    ("fspad", "vocab_dir", r"vocab_size=1000, but the target's is 512"),
    ("eagle", "", r"config key draft.path is not set"),
    ("fspad", "/no/such/draft", r"draft.path='/no/such/draft': no such directory"),
])
def test_mismatched_draft_refused(dirs, tmp_path, method, draft, match):
  out = tmp_path / "out.jsonl"
  config = spec_config(dirs["target"], method, dirs.get(draft, draft))
  with pytest.raises(decode_lib.USER_ERRORS, match=match) as e:
    run_decode(config, dirs["input"], str(out), progress=False)
  assert "\n" not in str(e.value) and not out.exists()  # refused before decoding


def test_tree_settings_validated(dirs):
  with pytest.raises(DecodeError, match=r"decode.total_tokens=100 exceeds the 68 nodes"):
    decode_lib.decode_settings(spec_config(dirs["target"], "fspad", total_tokens=100))
  with pytest.raises(DecodeError, match=r"decode.tree_depth=0"):
    decode_lib.decode_settings(spec_config(dirs["target"], "eagle", tree_depth=0))
  tiny, llama = load_repo_config("tiny"), load_repo_config("llama3_8b")
  assert (tiny.decode.tree_depth, tiny.decode.tree_top_k, tiny.decode.total_tokens) == (
      DEPTH, TOP_K, TOTAL)
  s = decode_lib.decode_settings(llama)
  assert (s.tree_depth, s.tree_top_k, s.total_tokens) == (6, 10, 60)
  assert tiny.draft.path == llama.draft.path == ""
  assert {"vanilla", "eagle", "fspad"} <= set(decode_lib.METHODS)


def test_cli_mismatched_draft_is_one_line(dirs, tmp_path):
  r = _cli([f"--config={REPO}/configs/tiny.py", f"--config.target.path={dirs['target']}",
            "--config.decode.method=fspad", f"--config.draft.path={dirs['eagle_dir']}",
            f"--input={dirs['input']}", "--output=out.jsonl"], tmp_path)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("decode.py: error: ") and "'eagle' draft, but" in last
  assert not (tmp_path / "out.jsonl").exists()
