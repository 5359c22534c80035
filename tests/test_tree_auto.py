"""decode.tree=auto (fspad_jax.decoding.tree_auto): the expected-tau model by hand and
against a decode of a tiny draft, the choice from injected cost tables, pins, the timing
cache and its keys, and greedy equality with vanilla through run_decode."""

import json

import numpy as np
import pytest

from fspad_jax import decode_lib
from fspad_jax.config import load_repo_config
from fspad_jax.decode_lib import DecodeEngine, DecodeError, run_decode
from fspad_jax.decoding import tree_auto
from fspad_jax.decoding.tree_auto import Acceptance, Costs
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations

MAX_NEW, BATCH = 16, 2
PROMPTS = [{"id": i, "input_ids": [0] + [(7 * i + 3 * j) % 200 + 5 for j in range(4 + i)]}
           for i in range(4)]


# ------------------------------------------------------------------------- pure model


def test_rank_probs_match_top1_and_top3():
  acc = Acceptance(top1=(0.6, 0.5), top3=(0.8, 0.9), source="test")
  q = tree_auto.rank_probs(acc, depth=3, top_k=10)
  np.testing.assert_allclose(q[:, 0], [0.6, 0.5, 0.5])  # depth 3 repeats the deepest
  np.testing.assert_allclose(q[:, :3].sum(1), [0.8, 0.9, 0.9])
  assert np.all(np.diff(q[:, 1:], axis=1) <= 0) and np.all(q.sum(1) <= 1 + 1e-12)


def test_expected_accept_by_hand():
  # A chain (top_k 1): a1 + a1 a2 + a1 a2 a3.
  q = np.array([[0.8], [0.5], [0.25]])
  assert tree_auto.expected_accept(q, 3, 1, 3) == pytest.approx(0.8 + 0.4 + 0.1)
  # K=2, D=2: level-0 values .6, .3; level-1 candidates .6*.7 .6*.2 .3*.7 .3*.2 =
  # .42 .12 .21 .06; the 3 best nodes: .6 + .42 + .3.
  q = np.array([[0.6, 0.3], [0.7, 0.2]])
  assert tree_auto.expected_accept(q, 2, 2, 3) == pytest.approx(0.6 + 0.42 + 0.3)
  assert tree_auto.expected_accept(q, 2, 2, 6) == pytest.approx(0.9 + 0.42 + 0.12 + 0.21 + 0.06)
  # K=2, D=3: only the best 2 of level 1 (.42, .21) are expanded at level 2 with q3 = (.5, .1).
  q = np.array([[0.6, 0.3], [0.7, 0.2], [0.5, 0.1]])
  level2 = [0.42 * 0.5, 0.42 * 0.1, 0.21 * 0.5, 0.21 * 0.1]
  everything = 0.9 + 0.42 + 0.12 + 0.21 + 0.06 + sum(level2)
  assert tree_auto.expected_accept(q, 3, 2, 10) == pytest.approx(everything)
  assert tree_auto.expected_tau(Acceptance((0.6, 0.7), (0.6, 0.7), ""), 2, 1, 2) == \
      pytest.approx(1 + 0.6 + 0.42)


def costs(draft_ms: float, verify_slope_ms: float = 0.1) -> Costs:
  verify = {t: (10.0 + verify_slope_ms * (t - 1)) / 1e3 for t in (1, 5, 9, 17, 33, 65)}
  return Costs({k: draft_ms / 1e3 for k in (2, 10)}, verify, 0.5 / 1e3)


GOOD_DRAFT = Acceptance((0.8, 0.75, 0.7, 0.7, 0.7), (0.95, 0.9, 0.9, 0.9, 0.9), "test")


def test_choice_vanilla_when_drafting_is_expensive_tree_when_cheap():
  grid = tree_auto.candidates()
  cheap = tree_auto.choose_tree(GOOD_DRAFT, costs(0.2), grid)
  assert not cheap.vanilla and cheap.expected_speedup > tree_auto.MIN_GAIN
  d, k, n = cheap.tree
  assert cheap.expected_tau == pytest.approx(tree_auto.expected_tau(GOOD_DRAFT, d, k, n))
  # It is the grid's best by the model.
  rate = lambda t: tree_auto.expected_tau(GOOD_DRAFT, *t) / tree_auto.step_seconds(
      costs(0.2), *t)
  assert rate(cheap.tree) == pytest.approx(max(rate(t) for t in grid))
  expensive = tree_auto.choose_tree(GOOD_DRAFT, costs(20.0), grid)
  assert expensive.vanilla and expensive.expected_speedup == 1.0
  assert expensive.best_tree_speedup < 1.0
  # A verify that grows steeply with tokens makes smaller trees win.
  steep = tree_auto.choose_tree(GOOD_DRAFT, costs(0.2, verify_slope_ms=2.0), grid)
  assert steep.tree[2] < cheap.tree[2]
  # A useless draft never pays.
  bad = Acceptance((0.01,), (0.02,), "test")
  assert tree_auto.choose_tree(bad, costs(0.01), grid).vanilla


def test_pins_restrict_the_search_and_parse(tmp_path):
  grid = tree_auto.candidates({"depth": 3, "nodes": 8})
  assert {(d, n) for d, _, n in grid} == {(3, 8)} and {k for _, k, _ in grid} == set(
      tree_auto.TOP_KS)
  choice = tree_auto.choose_tree(GOOD_DRAFT, costs(0.2), tree_auto.candidates({"top_k": 4}))
  assert choice.tree[1] == 4
  assert tree_auto.candidates({"depth": 1, "top_k": 2, "nodes": 64}) == []  # 64 > 2 nodes
  config = load_repo_config("tiny")
  config.decode.method = "fspad"
  for value, want in [("", ("", ())), ("auto", ("auto", ())),
                      ("auto:depth=3, nodes=8", ("auto", (("depth", 3), ("nodes", 8))))]:
    config.decode.tree = value
    s = decode_lib.decode_settings(config)
    assert (s.tree, s.tree_pins) == want
  for bad in ["Auto", "auto:depth", "auto:width=3", "auto:depth=0", "auto:depth=2,depth=3",
              "auto:depth=x"]:
    config.decode.tree = bad
    with pytest.raises(DecodeError, match=r"^config key decode.tree="):
      decode_lib.decode_settings(config)
  # Under auto the fixed tree's sizes are not checked against each other (pins are).
  config.decode.tree, config.decode.total_tokens = "auto", 1000
  decode_lib.decode_settings(config)


def test_command_line_tree_sizes_pin_auto(monkeypatch, tmp_path):
  """Explicit tree sizes on decode.py's command line win over decode.tree=auto (they become
  pins); the config file's own sizes do not; a size contradicting a pin is one line, exit 1."""
  from absl import flags
  from ml_collections import config_flags
  from fspad_jax.decoding.settings import pin_overridden_tree_keys

  def parsed(*overrides):
    argv = ["decode.py", "--config=configs/tiny.py", "--config.decode.method=fspad",
            *overrides]
    monkeypatch.setattr("sys.argv", argv)  # ml_collections reads the overrides from argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    values(argv)
    config = values.config
    pin_overridden_tree_keys(config, config_flags.get_override_values(values["config"]))
    return decode_lib.decode_settings(config)

  s = parsed("--config.decode.tree=auto", "--config.decode.tree_depth=3",
             "--config.decode.total_tokens=8")
  assert (s.tree, s.tree_pins) == ("auto", (("depth", 3), ("nodes", 8)))
  s = parsed("--config.decode.tree=auto:top_k=4", "--config.decode.tree_depth=2")
  assert s.tree_pins == (("depth", 2), ("top_k", 4))
  assert parsed("--config.decode.tree=auto").tree_pins == ()  # the file's 5/4/16 do not pin
  s = parsed("--config.decode.tree_depth=3")  # fixed tree: the key is the tree's depth
  assert (s.tree, s.tree_pins, s.tree_depth) == ("", (), 3)
  with pytest.raises(DecodeError, match=r"^config key decode.tree_depth=3 contradicts the "
                                        r"pin depth=2"):
    parsed("--config.decode.tree=auto:depth=2", "--config.decode.tree_depth=3")
  # decode.py applies it before loading anything: one line, non-zero exit.
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run(
      [sys.executable, os.path.join(root, "decode.py"), "--config=configs/tiny.py",
       "--config.decode.tree=auto:depth=2", "--config.decode.tree_depth=3",
       f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert "config key decode.tree_depth=3 contradicts the pin depth=2" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_costs_cache_reused_and_keyed(tmp_path, monkeypatch):
  monkeypatch.setenv(tree_auto.COSTS_FILE_ENV, str(tmp_path / "costs.json"))
  calls = []

  def measure():
    calls.append(1)
    return costs(1.0)
  fields = {"device_kind": "cpu", "batch": 2, "cache_len": 256}
  c1, info1 = tree_auto.load_or_measure_costs(fields, measure)
  c2, info2 = tree_auto.load_or_measure_costs(dict(fields), measure)
  assert (info1["source"], info2["source"], len(calls)) == ("measured", "cache", 1)
  assert c2 == c1
  _, info3 = tree_auto.load_or_measure_costs({**fields, "batch": 8}, measure)
  assert info3["source"] == "measured" and len(calls) == 2
  table = json.loads((tmp_path / "costs.json").read_text())
  assert len(table) == 2 and {v["fields"]["batch"] for v in table.values()} == {2, 8}


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A tiny target and an fspad draft trained by train.py (its metrics.jsonl holds the
  per-depth agreement tree=auto reads)."""
  from fspad_jax import trainer
  root = tmp_path_factory.mktemp("tree_auto")
  d = {"target": make_tiny_checkpoint(str(root / "model"))}
  config = load_repo_config("tiny")
  config.target.path = d["target"]
  config.data.path = make_tiny_conversations(str(root / "conv.jsonl"), num=48)
  config.data.max_len = 64
  t = config.train
  t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.warmup_steps = 8, 8, 0, 8, 2
  t.tensorboard = False
  d["workdir"] = str(root / "work")
  trainer.train(config, d["workdir"], progress=False)
  d["input"] = str(root / "in.jsonl")
  with open(d["input"], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in PROMPTS)
  d["costs"] = str(root / "costs.json")
  return d


def auto_config(d, **decode):
  config = load_repo_config("tiny")
  config.target.path = d["target"]
  config.draft.path = d["workdir"]
  config.decode.update({"method": "fspad", "tree": "auto", "max_new_tokens": MAX_NEW,
                        "batch_size": BATCH, **decode})
  return config


def test_auto_through_run_decode_equals_vanilla_and_caches(dirs, tmp_path, monkeypatch):
  monkeypatch.setenv(tree_auto.COSTS_FILE_ENV, dirs["costs"])
  # Force a tree (min gain 0) so that speculative decoding really runs.
  monkeypatch.setattr(tree_auto, "MIN_GAIN", 0.0)
  engine = DecodeEngine(auto_config(dirs))
  auto = engine.tree_auto
  assert auto["timing"]["source"] == "measured" and auto["choice"] != "vanilla"
  c = auto["choice"]
  assert (engine.settings.tree_depth, engine.settings.tree_top_k,
          engine.settings.total_tokens) == (c["depth"], c["top_k"], c["nodes"])
  out = str(tmp_path / "out.jsonl")
  summary = run_decode(None, dirs["input"], out, engine=engine, progress=False,
                       compare_vanilla=True)
  cmp = summary["compare_vanilla"]
  assert cmp["matched"] == cmp["checked"] == len(PROMPTS)
  assert summary["tree"] == {"depth": c["depth"], "top_k": c["top_k"],
                             "total_tokens": c["nodes"]}
  assert summary["tree_auto"]["measured_tau"] == summary["tau"]
  assert summary["tree_auto"]["decoded_with"] == "fspad"
  assert "tree auto: depth" in decode_lib.format_summary(summary)
  # The model against the decode: expected tau (from train.py's agreement) vs measured.
  print("expected tau", auto["expected_tau"], "measured", summary["tau"])
  assert abs(auto["expected_tau"] - summary["tau"]) < 0.5 + 0.25 * summary["tau"]

  # A second start-up reuses the timings (the job's shapes, same key); pins override the
  # search; a different batch is another key and is timed again (a stand-in timer here).
  print("timing_s", auto["timing"]["timing_s"])
  generator = engine._generate.generator
  restart = lambda **changes: tree_auto.choose_for_engine(
      _with_settings(engine, **changes), generator)[1]
  again = restart(tree="auto", tree_pins=())
  assert again["timing"]["source"] == "cache" and again["costs_ms"] == auto["costs_ms"]
  assert again["choice"] == auto["choice"]
  pinned = restart(tree_pins=(("depth", 2), ("nodes", 4), ("top_k", 2)))
  assert pinned["choice"] == {"depth": 2, "top_k": 2, "nodes": 4}
  assert pinned["timing"]["source"] == "cache"
  timed = []
  monkeypatch.setattr(tree_auto, "measure_costs",
                      lambda *a, **k: timed.append(a[1]) or costs(1.0))
  other = restart(batch_size=BATCH + 1)
  assert other["timing"]["source"] == "measured" and timed == [BATCH + 1]
  assert restart(batch_size=BATCH + 1)["timing"]["source"] == "cache"


def _with_settings(engine, **changes):
  import copy
  import dataclasses
  twin = copy.copy(engine)
  twin.settings = dataclasses.replace(engine.settings, **changes)
  return twin


def test_auto_falls_back_to_vanilla(dirs, tmp_path, monkeypatch):
  monkeypatch.setenv(tree_auto.COSTS_FILE_ENV, dirs["costs"])
  monkeypatch.setattr(tree_auto, "MIN_GAIN", 1e9)  # no tree can promise this
  engine = DecodeEngine(auto_config(dirs))
  assert engine.tree_auto["choice"] == "vanilla"
  out = str(tmp_path / "out.jsonl")
  summary = run_decode(None, dirs["input"], out, engine=engine, progress=False)
  assert summary["method"] == "vanilla" and summary["tree_auto"]["decoded_with"] == "vanilla"
  assert summary["verify_steps"] == summary["new_tokens"] - len(PROMPTS)  # one per token
  assert "tree auto: vanilla decoding" in decode_lib.format_summary(summary)


def test_auto_without_agreement_is_one_line(dirs, tmp_path):
  from fspad_jax.draft import draft_config_from_target, init_draft
  from fspad_jax.draft_checkpoint import save_draft
  from fspad_jax.hf_checkpoint import load_target
  from fspad_jax.sharding import make_mesh
  from flax import nnx
  cfg, _, _ = load_target(dirs["target"], make_mesh((1, 1, -1)))
  export = str(tmp_path / "eagle_layout")
  dcfg = draft_config_from_target(cfg, "fspad")
  save_draft(export, dcfg, nnx.state(init_draft(dcfg, seed=1)))
  config = auto_config(dirs)
  config.draft.path = export
  with pytest.raises(DecodeError, match=r"decode.tree='auto' needs the draft's per-depth"):
    DecodeEngine(config)
