"""fspad_jax.regenerate: conversations answered again by the target (greedy answers equal
vanilla decoding of each regenerated context, speculative gives the same file, resume after
a kill, train.py's loader reads the output, provenance, the pipeline's regen stage)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from fspad_jax import data as data_lib
from fspad_jax import pipeline, regenerate
from fspad_jax.config import load_repo_config
from fspad_jax.decode_lib import DecodeEngine
from fspad_jax.draft import draft_config_from_target, init_draft
from fspad_jax.draft_checkpoint import save_draft
from fspad_jax.generate import GenerateOptions, VanillaGenerator
from fspad_jax.hf_checkpoint import load_target, load_tokenizer
from fspad_jax.sharding import make_mesh
from fspad_jax.tiny_checkpoint import EOT_ID, make_tiny_checkpoint, make_tiny_conversations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW, BATCH, BUCKET = 8, 4, 128

MULTI = {"id": "multi", "conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a color."},
    {"from": "gpt", "value": "Red."}, {"from": "human", "value": "Why that one?"},
    {"from": "gpt", "value": "It is warm."}, {"from": "human", "value": "And another?"}]}
OPENAI = {"id": 42, "messages": [{"role": "user", "content": "What is a list?"},
                                 {"role": "assistant", "content": "A sequence."}]}
NO_USER = {"id": "lonely", "conversations": [{"from": "gpt", "value": "Hello there."}]}
LONG_LATER = {"id": "long-later", "conversations": [
    {"from": "human", "value": "Say something."}, {"from": "gpt", "value": "ok"},
    {"from": "human", "value": "word " * 2100}]}  # turn 2 exceeds the 2048 positions
LONG_FIRST = {"id": "long-first", "conversations": [{"from": "human", "value": "word " * 2100}]}


def config_for(target, method="vanilla", draft="", **decode):
  """Every prompt that fits is padded to BUCKET tokens: one compiled shape per engine."""
  c = load_repo_config("tiny")
  c.target.path = target
  c.draft.path = draft
  c.decode.update(method=method, max_new_tokens=MAX_NEW, batch_size=BATCH,
                  min_prompt_bucket=BUCKET, tree_depth=3, tree_top_k=2, total_tokens=4,
                  **decode)
  return c


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny target, a random fspad draft for it (EAGLE layout), and an input file: 6
  tiny conversations, a 3-turn one with a system prompt, an OpenAI-style one, one without
  a user turn and two too long for the cache (at turn 2 / at turn 1)."""
  root = tmp_path_factory.mktemp("regen")
  target = make_tiny_checkpoint(str(root / "target"))
  cfg, _, _ = load_target(target, make_mesh((1, 1, -1)))
  dcfg = draft_config_from_target(cfg, "fspad")
  draft = str(root / "draft")
  save_draft(draft, dcfg, nnx.state(init_draft(dcfg, seed=1)))
  tiny = read_jsonl(make_tiny_conversations(str(root / "tiny.jsonl"), num=6))
  records = tiny[:3] + [MULTI, OPENAI, NO_USER] + tiny[3:] + [LONG_LATER, LONG_FIRST]
  inp = str(root / "conversations.json")  # a JSON list, as ShareGPT ships it
  with open(inp, "w") as f:
    json.dump(records, f, indent=1)
  return {"root": root, "target": target, "draft": draft, "input": inp, "records": records}


@pytest.fixture(scope="module")
def engine(files):
  return DecodeEngine(config_for(files["target"]))


@pytest.fixture(scope="module")
def vanilla_run(files, engine):
  out = str(files["root"] / "vanilla" / "regen.jsonl")
  os.makedirs(os.path.dirname(out))
  log = []
  summary = regenerate.regenerate(None, files["input"], out, engine=engine, progress=False,
                                  log=log.append)
  return {"out": out, "summary": summary, "log": log, "records": read_jsonl(out)}


def test_split_turns():
  msgs = [{"role": "assistant", "content": "before any user"},
          {"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
          {"role": "assistant", "content": "a1"}, {"role": "user", "content": " "},
          {"role": "user", "content": "u2"}, {"role": "user", "content": "u3"},
          {"role": "system", "content": "trailing"}]
  assert regenerate.split_turns(msgs) == [
      [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}],
      [{"role": "user", "content": "u2"}], [{"role": "user", "content": "u3"}]]
  assert len(regenerate.split_turns(msgs, max_turns=2)) == 2
  assert regenerate.split_turns([{"role": "assistant", "content": "x"}]) == []


def test_answers_equal_vanilla_greedy_turn_by_turn(files, vanilla_run):
  """Every regenerated answer is what VanillaGenerator greedily decodes (independently
  tokenized, other shapes) from the chat template of the regenerated conversation before
  it; the 3-turn conversation is checked turn by turn, its system prompt kept."""
  by_id = {r["id"]: r for r in vanilla_run["records"]}
  tok = load_tokenizer(files["target"])
  mesh = make_mesh((1, 1, -1))
  _, graphdef, params = load_target(files["target"], mesh)
  generator = VanillaGenerator(graphdef, params, mesh)
  # Conversation -> [(chat before answer k, answer k)], the chats rebuilt from the output.
  cases = []
  for rec in vanilla_run["records"]:
    chat = []
    for turn in rec["conversations"]:
      role = {"system": "system", "human": "user", "gpt": "assistant"}[turn["from"]]
      if role == "assistant":
        cases.append((list(chat), turn["value"]))
      chat.append({"role": role, "content": turn["value"]})
  prompts = [tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"] for c, _ in cases]
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  prompt = np.zeros((len(prompts), lengths.max()), np.int32)  # [n, longest prompt]
  for i, p in enumerate(prompts):
    prompt[i, :len(p)] = p
  options = GenerateOptions(max_new_tokens=MAX_NEW, stop_token_ids=(EOT_ID,),
                            cache_len=int(lengths.max()) + MAX_NEW)
  ref = generator(prompt, lengths, options)
  for i, (chat, answer) in enumerate(cases):
    ids = ref.tokens[i, :ref.num_tokens[i]].tolist()
    assert answer == tok.decode(ids, skip_special_tokens=True).strip(), chat
  multi = [t for t in by_id["multi"]["conversations"]]
  assert [t["from"] for t in multi] == ["system", "human", "gpt", "human", "gpt", "human",
                                        "gpt"]
  assert [t["value"] for t in multi if t["from"] != "gpt"] == [
      "Be brief.", "Name a color.", "Why that one?", "And another?"]
  assert "Red." not in [t["value"] for t in multi]  # the original answers are gone
  assert sum(len(c[0]) > 3 for c in cases) >= 2  # turns 2 and 3 of "multi" were checked


def test_long_empty_and_userless_conversations_are_counted(files, vanilla_run):
  s = vanilla_run["summary"]
  ids = [r["id"] for r in vanilla_run["records"]]
  expected = [str(r["id"]) for r in files["records"]
              if r["id"] not in ("lonely", "long-first")]
  assert ids == expected  # input order, each once; ids as train.py's loader reads them
  assert s["complete"] and s["conversations"] == len(files["records"]) - 1
  assert s["written"] == len(expected) and s["no_user_turn"] == 1
  assert s["stopped"] == {"too_long": 2}
  later = next(r for r in vanilla_run["records"] if r["id"] == "long-later")
  assert len(later["conversations"]) == 2 and "stopped at turn 2" in later["regen"]["stopped"]
  lines = [m for m in vanilla_run["log"] if "is too long: at most" in m]
  assert len(lines) == 2 and any("long-first" in m and "(not written)" in m for m in lines)
  assert all(m.startswith(files["input"] + ":") for m in lines)  # file:line: ...
  assert s["answers"] == sum(len(r["regen"]["finish_reasons"]) for r in vanilla_run["records"])


def test_empty_answer_ends_the_conversation(files, engine, tmp_path, monkeypatch):
  """An empty answer (after stripping) is not kept: the conversation ends before its turn."""
  inp = str(tmp_path / "in.jsonl")
  with open(inp, "w") as f:
    f.write(json.dumps(MULTI) + "\n")
  real, calls = engine.decode_text, []

  def text(ids):
    calls.append(1)
    return real(ids) if len(calls) == 1 else " \n "
  monkeypatch.setattr(engine, "decode_text", text)
  out = str(tmp_path / "out.jsonl")
  s = regenerate.regenerate(None, inp, out, engine=engine, progress=False, log=lambda m: None)
  rec, = read_jsonl(out)
  assert [t["from"] for t in rec["conversations"]] == ["system", "human", "gpt"]
  assert s["stopped"] == {"empty_answer": 1} and "turn 2" in rec["regen"]["stopped"]


def test_speculative_gives_the_identical_file(files, vanilla_run, tmp_path):
  spec = DecodeEngine(config_for(files["target"], method="fspad", draft=files["draft"]))
  out = str(tmp_path / "regen.jsonl")
  s = regenerate.regenerate(None, files["input"], out, engine=spec, progress=False,
                            log=lambda m: None)
  with open(out, "rb") as f, open(vanilla_run["out"], "rb") as g:
    assert f.read() == g.read()
  assert s["tau"] is not None and s["tau"] >= 1.0  # it decoded speculatively
  with open(out + regenerate.PROVENANCE_SUFFIX) as f:
    prov = json.load(f)
  assert prov["method"] == "fspad" and prov["draft"]["path"] == os.path.abspath(files["draft"])


def test_kill_and_rerun_loses_and_duplicates_nothing(files, engine, vanilla_run, tmp_path,
                                                     monkeypatch):
  """An exception after two batches, then a partial line left by a killed writer: the rerun
  decodes only what is missing, and the file equals the uninterrupted run's."""
  monkeypatch.setattr(regenerate, "PART_BATCHES", 1)
  # Static batches, so that the kill lands after whole generate_batch calls; the resume
  # under continuous batching is run_decode's own (tests/test_scheduler.py).
  monkeypatch.setattr(engine, "settings", dataclasses.replace(engine.settings, schedule="static"))
  out = str(tmp_path / "regen.jsonl")
  real, calls = engine.generate_batch, []

  def dying(prompts, seed=0, **rows):
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    calls.append(len(prompts))
    return real(prompts, seed, **rows)
  monkeypatch.setattr(engine, "generate_batch", dying)
  with pytest.raises(KeyboardInterrupt):
    regenerate.regenerate(None, files["input"], out, engine=engine, progress=False,
                          log=lambda m: None)
  monkeypatch.setattr(engine, "generate_batch", real)
  assert not os.path.exists(out)  # written whole at the end only
  turn0 = os.path.join(out + regenerate.WORK_SUFFIX, "turn0.jsonl")
  assert len(read_jsonl(turn0)) == sum(calls) == 2 * BATCH
  with open(turn0, "a") as f:
    f.write('{"id": "multi", "output_')  # a killed writer's partial line
  log, decoded = [], []
  monkeypatch.setattr(engine, "generate_batch",
                      lambda p, seed=0, **rows: decoded.append(len(p)) or real(p, seed, **rows))
  s = regenerate.regenerate(None, files["input"], out, engine=engine, progress=False,
                            log=log.append)
  assert any("partial last line" in m for m in log)
  with open(out, "rb") as f, open(vanilla_run["out"], "rb") as g:
    assert f.read() == g.read()
  assert s["answers"] == vanilla_run["summary"]["answers"]
  # Only what was missing was decoded: turn 1 of the other conversations, then turns 2-3.
  assert sum(decoded) == vanilla_run["summary"]["answers"] - 2 * BATCH
  for k in range(3):
    ids = [r["id"] for r in read_jsonl(os.path.join(out + regenerate.WORK_SUFFIX,
                                                    f"turn{k}.jsonl"))]
    assert len(ids) == len(set(ids))
  # Again: nothing left to decode.
  decoded.clear()
  regenerate.regenerate(None, files["input"], out, engine=engine, progress=False,
                        log=lambda m: None)
  assert decoded == []


def test_train_loader_reads_the_output(files, vanilla_run, tmp_path):
  convs, bad = data_lib.load_conversations(vanilla_run["out"])
  assert bad.total == 0 and len(convs) == len(vanilla_run["records"])
  builder_dir, report = data_lib.prepare_dataset(vanilla_run["out"], files["target"], 64,
                                                 str(tmp_path / "prepared"), val_fraction=0.0)
  assert report["bad"] == {} and report["train"] == len(convs)


def test_provenance(files, vanilla_run):
  with open(vanilla_run["out"] + regenerate.PROVENANCE_SUFFIX) as f:
    prov = json.load(f)
  assert prov["source"]["path"] == os.path.abspath(files["input"])
  assert prov["source"]["sha256"] == regenerate.file_sha256(files["input"])
  assert prov["target"]["path"] == os.path.abspath(files["target"])
  assert prov["target"]["config_sha256"] == regenerate.file_sha256(
      os.path.join(files["target"], "config.json"))
  assert [w["name"] for w in prov["target"]["weights"]] == ["model.safetensors"]
  assert (prov["method"], prov["temperature"], prov["max_new_tokens"]) == ("vanilla", 0.0,
                                                                          MAX_NEW)
  assert prov["draft"] is None and prov["summary"]["written"] == len(vanilla_run["records"])
  lines = {r["id"]: r["regen"]["line"] for r in vanilla_run["records"]}
  with open(files["input"]) as f:
    text = f.read()
  assert text.splitlines()[lines["multi"] - 1].strip() == "{"  # where its record starts
  assert all(r["regen"]["finish_reasons"] for r in vanilla_run["records"])


def test_resume_with_other_settings_is_refused(files, vanilla_run):
  other = DecodeEngine(config_for(files["target"], temperature=1.0))
  with pytest.raises(regenerate.RegenError, match=r"other settings \(changed: temperature\)"):
    regenerate.regenerate(None, files["input"], vanilla_run["out"], engine=other,
                          progress=False, log=lambda m: None)


def test_user_errors_are_one_line(files, engine, tmp_path):
  nothing = tmp_path / "nothing.jsonl"
  nothing.write_text(json.dumps(NO_USER) + "\n{broken\n")
  cases = [(files["input"] + ".missing", str(tmp_path / "o.jsonl"), "does not exist"),
           (files["input"], str(tmp_path / "no_dir" / "o.jsonl"), "output directory"),
           (files["input"], files["input"], "is the input file"),
           (str(nothing), str(tmp_path / "o.jsonl"),
            r"no conversation with a user turn \(1 without one; bad records: 1 invalid_json\)")]
  for inp, out, match in cases:
    with pytest.raises(regenerate.RegenError, match=match):
      regenerate.regenerate(None, inp, out, engine=engine, progress=False)


def test_cli(files, vanilla_run, tmp_path):
  """The entry point gives the library's file."""
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "fspad_jax.regenerate", f"--config={REPO}/configs/tiny.py",
          f"--config.target.path={files['target']}", "--no_progress"]
  out = str(tmp_path / "cli.jsonl")
  r = subprocess.run(base + [f"--config.decode.max_new_tokens={MAX_NEW}",
                             f"--input={files['input']}", f"--output={out}"],
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "regenerate: " in r.stdout and "conversations written" in r.stdout
  with open(out, "rb") as f, open(vanilla_run["out"], "rb") as g:
    assert f.read() == g.read()


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_regen_stage(files, tmp_path):
  """The regen unit on the ci preset's settings over a tiny target and train split: it
  writes the regenerated split, is skipped when done, and drafts train on it only when
  drafts.data / drafts.regen_kinds say so (a ShareGPT draft's spec is unchanged)."""
  config = pipeline.load_preset("ci")
  ctx = pipeline.Context(config=config, paths=pipeline.Paths(str(tmp_path / "work")),
                         progress=False, log=lambda m: None)
  shutil.copytree(files["target"], ctx.paths.target)
  os.makedirs(ctx.paths.data)
  make_tiny_conversations(ctx.paths.train, num=10)
  info = pipeline.run_regen(ctx, "pretrain-hash")
  assert info["conversations"] == config.regen.conversations == info["written"]
  recs = read_jsonl(ctx.paths.regen_train)
  assert len(recs) == config.regen.conversations
  assert os.path.isfile(ctx.paths.regen_train + regenerate.PROVENANCE_SUFFIX)
  assert pipeline.run_regen(ctx, "pretrain-hash") == info
  assert ctx.events[-1][:2] == ("regen", "skipped")

  plain = pipeline.draft_unit(ctx, "fspad", "pretrain-hash").spec
  assert pipeline.draft_trainer_config(ctx, "fspad").data.path == ctx.paths.train
  config.drafts.regen_kinds = ("fspad",)
  assert pipeline.draft_trainer_config(ctx, "fspad").data.path == ctx.paths.regen_train
  assert pipeline.draft_trainer_config(ctx, "eagle").data.path == ctx.paths.train
  spec = pipeline.draft_unit(ctx, "fspad", "pretrain-hash").spec
  assert spec.pop("data_source") == {"regen": pipeline.regen_unit(ctx, "pretrain-hash").hash}
  assert spec == plain
  config.drafts.regen_kinds, config.drafts.data = (), "regen"
  assert pipeline.draft_trainer_config(ctx, "eagle").data.path == ctx.paths.regen_train
  config.drafts.data = "mine"
  with pytest.raises(pipeline.PipelineError, match="drafts.data='mine'"):
    pipeline.draft_trainer_config(ctx, "eagle")
