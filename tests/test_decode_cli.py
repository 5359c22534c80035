"""decode.py and fspad_jax.decode_lib: JSONL batch decoding, resume, malformed input, CLI."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fspad_jax import console, decode_lib
from fspad_jax.config import load_repo_config
from fspad_jax.decode_lib import DecodeEngine, DecodeError, bucket_length, run_decode
from fspad_jax.generate import FINISH_REASONS, GenerateOptions, VanillaGenerator
from fspad_jax.hf_checkpoint import load_target, load_tokenizer
from fspad_jax.sharding import make_mesh
from fspad_jax.tiny_checkpoint import EOT_ID, make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW, BATCH = 6, 3

# (line content, reason substring): valid records and malformed lines, interleaved below.
GOOD = [
    {"id": "p1", "prompt": "Hello world, how are you"},
    {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is a list?"}]},
    {"id": 7, "turns": ["Name a color.", "Why that one?"]},
    {"id": "i1", "input_ids": [0, 5, 6, 7, 8, 9]},
    {"id": "p2", "prompt": "The quick brown fox"},
]
BAD = [
    ("this is not json", "invalid JSON"),
    (json.dumps({"prompt": "no id"}), "missing 'id'"),
    (json.dumps({"id": "x1", "prompt": "a", "input_ids": [1]}), "exactly one"),
    (json.dumps({"id": "x2"}), "exactly one"),
    (json.dumps({"id": "x3", "input_ids": [0, 99999]}), "vocabulary"),
    (json.dumps({"id": "x4", "prompt": ""}), "empty prompt"),
    (json.dumps({"id": "x5", "input_ids": "0 1 2"}), "list of integers"),
    (json.dumps({"id": "x6", "input_ids": [5] * 3000}), "too long"),
    (json.dumps({"id": "x7", "messages": [{"role": "user"}]}), "messages[0]"),
    (json.dumps({"id": "p1", "prompt": "again"}), "duplicate id"),
    (json.dumps({"id": True, "prompt": "bool id"}), "'id' must be"),
]


def tiny_config(path, **decode):
  config = load_repo_config("tiny")
  config.target.path = path
  config.decode.max_new_tokens = MAX_NEW
  config.decode.batch_size = BATCH
  config.decode.update(decode)
  return config


def write_input(path, good=GOOD, bad=BAD):
  """Writes the good records, each followed by a share of the bad lines, and one blank line;
  returns {bad line number: reason substring}."""
  lines, expected = [], {}
  for i, rec in enumerate(good):
    lines.append(json.dumps(rec))
    if i == 0:
      lines.append("   ")  # blank lines are not records
    for text, reason in bad[i::len(good)]:
      lines.append(text)
      expected[len(lines)] = reason
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return expected


def without_times(rec):
  """A record minus its timings (which differ between runs)."""
  rec = {k: v for k, v in rec.items() if k != "decode_time_s"}
  if "turns" in rec:
    rec["turns"] = [without_times(t) for t in rec["turns"]]
  return rec


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def by_id(records):
  return {json.dumps(r["id"]): r for r in records}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
  return DecodeEngine(tiny_config(tiny_llama_dir))


@pytest.fixture(scope="module")
def lib_run(engine, tmp_path_factory):
  """One library run over GOOD + BAD: (input path, expected problems, summary, output, log)."""
  d = tmp_path_factory.mktemp("lib_run")
  inp, out = str(d / "in.jsonl"), str(d / "out.jsonl")
  expected = write_input(inp)
  log = []
  summary = run_decode(engine.config, inp, out, engine=engine, progress=False, log=log.append)
  return inp, expected, summary, out, log


def test_bucket_length():
  got = [bucket_length(n) for n in (1, 64, 65, 96, 97, 129, 193, 1000, 1025, 5000)]
  assert got == [64, 64, 96, 96, 128, 192, 256, 1024, 1536, 6144]


def test_output_format(lib_run, engine):
  _, _, _, out, _ = lib_run
  records = read_jsonl(out)
  assert sorted(json.dumps(r["id"]) for r in records) == sorted(
      json.dumps(r["id"]) for r in GOOD)
  tok = engine.tokenizer
  singles = [r for r in records if "turns" not in r]
  turns = [r for r in records if "turns" in r]
  assert len(singles) == 4 and len(turns) == 1
  for r in singles + turns[0]["turns"]:
    assert set(r) >= {"output_ids", "text", "new_tokens", "finish_reason", "decode_time_s"}
    assert r["new_tokens"] == len(r["output_ids"]) and 1 <= r["new_tokens"] <= MAX_NEW
    assert all(isinstance(t, int) and 0 <= t < engine.cfg.vocab_size for t in r["output_ids"])
    assert r["text"] == tok.decode(r["output_ids"], skip_special_tokens=True)
    assert r["finish_reason"] in ("stop", "length")
    if r["finish_reason"] == "stop":
      assert r["output_ids"][-1] in engine.stop_token_ids
    else:
      assert r["new_tokens"] == MAX_NEW
    assert r["decode_time_s"] > 0
  t = turns[0]
  assert t["id"] == 7 and len(t["turns"]) == 2
  assert t["new_tokens"] == sum(x["new_tokens"] for x in t["turns"])
  assert t["turns"][1]["prompt_tokens"] > t["turns"][0]["prompt_tokens"] + 5


def test_malformed_lines_reported_and_counted(lib_run):
  inp, expected, summary, _, log = lib_run
  assert len(expected) == len(BAD)
  reported = {p["line"]: p["reason"] for p in summary["problems"]}
  assert sorted(reported) == sorted(expected)
  for line, reason in expected.items():
    assert reason in reported[line], (line, reported[line])
    assert any(m.startswith(f"{inp}:{line}: ") for m in log), (line, log)
  assert summary["malformed"] == len(BAD)
  assert summary["records"] == summary["decoded"] == len(GOOD)
  assert summary["input_lines"] == len(GOOD) + len(BAD) and summary["blank_lines"] == 1
  assert summary["skipped_done"] == 0 and not summary["recovered_partial_line"]


def test_summary(lib_run):
  _, _, summary, out, _ = lib_run
  records = read_jsonl(out)
  tokens = sum(r["new_tokens"] for r in records)
  assert summary["new_tokens"] == tokens
  assert summary["method"] == "vanilla" and summary["config"]["decode"]["batch_size"] == BATCH
  assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] >= summary["decode_time_s"]
  # 5 records + 1 second turn on 3 slots: a few host visits, few compiled shapes.
  assert summary["schedule"] == "continuous" and summary["batches"] == 0
  assert summary["host_visits"] >= 2 and 1 <= summary["compiled_shapes"] <= 8
  assert EOT_ID in summary["stop_token_ids"]
  with open(out + ".summary.json") as f:
    assert json.load(f) == summary


def test_greedy_equals_vanilla_generator(lib_run, tiny_llama_dir):
  """Outputs equal VanillaGenerator on independently tokenized prompts (incl. turn 2)."""
  _, _, _, out, _ = lib_run
  got = by_id(read_jsonl(out))
  tok = load_tokenizer(tiny_llama_dir)

  def chat_ids(messages):
    r = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(r if isinstance(r, list) else r["input_ids"])

  turns = GOOD[2]["turns"]
  first_answer = got["7"]["turns"][0]["text"].strip()
  cases = [  # (prompt ids, expected output entry)
      (tok(GOOD[0]["prompt"])["input_ids"], got['"p1"']),
      (chat_ids(GOOD[1]["messages"]), got['"m1"']),
      (chat_ids([{"role": "user", "content": turns[0]}]), got["7"]["turns"][0]),
      (chat_ids([{"role": "user", "content": turns[0]},
                 {"role": "assistant", "content": first_answer},
                 {"role": "user", "content": turns[1]}]), got["7"]["turns"][1]),
      (GOOD[3]["input_ids"], got['"i1"']),
  ]
  mesh = make_mesh((1, 1, -1))
  _, graphdef, params = load_target(tiny_llama_dir, mesh)
  lengths = np.array([len(p) for p, _ in cases], np.int32)  # [n]
  prompt = np.zeros((len(cases), lengths.max()), np.int32)  # [n, max_len]
  for i, (p, _) in enumerate(cases):
    prompt[i, :len(p)] = p
  options = GenerateOptions(max_new_tokens=MAX_NEW, stop_token_ids=(EOT_ID,),
                            cache_len=int(lengths.max()) + MAX_NEW)
  ref = VanillaGenerator(graphdef, params, mesh)(prompt, lengths, options)
  for i, (p, entry) in enumerate(cases):
    assert entry["prompt_tokens"] == len(p)
    assert entry["output_ids"] == ref.tokens[i, :ref.num_tokens[i]].tolist(), i
    assert entry["finish_reason"] == FINISH_REASONS[int(ref.finish_reason[i])]


def test_resume_skips_done_ids(lib_run, engine, tmp_path):
  _, _, _, full_out, _ = lib_run
  reference = by_id(read_jsonl(full_out))
  inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
  write_input(inp, good=GOOD[:2], bad=[])
  s1 = run_decode(engine.config, inp, out, engine=engine, progress=False, log=lambda m: None)
  assert s1["decoded"] == 2
  with open(out) as f:
    first = f.read()
  write_input(inp)  # all records now
  log = []
  s2 = run_decode(engine.config, inp, out, engine=engine, progress=False, log=log.append)
  assert s2["decoded"] == len(GOOD) - 2 and s2["skipped_done"] == 2
  with open(out) as f:
    assert f.read().startswith(first)  # earlier lines untouched
  records = read_jsonl(out)
  ids = [json.dumps(r["id"]) for r in records]
  assert len(ids) == len(set(ids)) == len(GOOD)
  # Greedy decoding does not depend on which records share a batch.
  for r in records:
    assert without_times(r) == without_times(reference[json.dumps(r["id"])])
  s3 = run_decode(engine.config, inp, out, engine=engine, progress=False, log=lambda m: None)
  assert s3["decoded"] == 0 and s3["skipped_done"] == len(GOOD) and s3["batches"] == 0
  assert len(read_jsonl(out)) == len(GOOD)


def test_truncated_last_line_is_recovered(lib_run, engine, tmp_path):
  inp, _, _, full_out, _ = lib_run
  out = str(tmp_path / "out.jsonl")
  with open(full_out, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")[:-1]
  cut = b"\n".join(lines[:-1]) + b"\n" + lines[-1][:len(lines[-1]) // 2]  # killed mid-write
  with open(out, "wb") as f:
    f.write(cut)
  log = []
  s = run_decode(engine.config, inp, out, engine=engine, progress=False, log=log.append)
  assert s["recovered_partial_line"] and s["decoded"] == 1
  assert any("partial last line" in m for m in log)
  records = read_jsonl(out)  # every line parses
  assert len(records) == len(GOOD)
  assert without_times(records[-1]) == without_times(json.loads(lines[-1]))


def test_corrupt_middle_line_is_an_error(lib_run, engine, tmp_path):
  inp, _, _, full_out, _ = lib_run
  out = str(tmp_path / "out.jsonl")
  lines = open(full_out).read().split("\n")
  lines[1] = lines[1][:10]
  with open(out, "w") as f:
    f.write("\n".join(lines))
  with pytest.raises(DecodeError, match=f"{out}:2: corrupt output line"):
    run_decode(engine.config, inp, out, engine=engine, progress=False)


def test_strict_aborts_with_line_number(lib_run, engine, tmp_path):
  inp, expected, _, _, _ = lib_run
  out = str(tmp_path / "out.jsonl")
  first_bad = min(expected)
  with pytest.raises(DecodeError, match=f"{inp}:{first_bad}: invalid JSON"):
    run_decode(engine.config, inp, out, engine=engine, strict=True, progress=False)
  assert not os.path.exists(out)  # aborted before decoding anything


def test_extra_stop_token_and_generate_api(lib_run, tiny_llama_dir):
  """decode.stop_token_ids ends generation at the first occurrence, finish_reason stop."""
  _, _, _, full_out, _ = lib_run
  ref = by_id(read_jsonl(full_out))['"i1"']["output_ids"]
  k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i] and ref[i] != EOT_ID)
  eng = DecodeEngine(tiny_config(tiny_llama_dir, stop_token_ids=(ref[k],), batch_size=2))
  assert ref[k] in eng.stop_token_ids and EOT_ID in eng.stop_token_ids
  got = eng.generate([GOOD[3]["input_ids"]] * 3)  # 2 batches: one full, one padded
  for c in got:
    assert c.output_ids == ref[:k + 1] and c.finish_reason == "stop"


def test_sampling_seed_is_reproducible(tiny_llama_dir, tmp_path):
  eng = DecodeEngine(tiny_config(tiny_llama_dir, temperature=1.0, top_k=50, top_p=0.9))
  inp = str(tmp_path / "in.jsonl")
  write_input(inp, good=GOOD[3:], bad=[])
  outs = []
  for i, seed in enumerate((1, 1, 2)):
    out = str(tmp_path / f"out{i}.jsonl")
    s = run_decode(None, inp, out, engine=eng, seed=seed, progress=False)
    assert s["seed"] == seed and s["decoded"] == 2
    outs.append([without_times(r) for r in read_jsonl(out)])
  assert outs[0] == outs[1] and outs[0] != outs[2]


def test_batch_shapes(engine):
  assert engine.batch_shape(10) == (64, 128)  # bucket 64, 64 + MAX_NEW rounded up to 64
  assert engine.batch_shape(70) == (96, 128)
  fixed = copy.copy(engine)
  fixed.settings = dataclasses.replace(engine.settings, cache_len=100)
  assert fixed.batch_shape(10) == (64, 100)
  assert fixed.batch_shape(70) == (100 - MAX_NEW, 100)  # the bucket capped by the cache
  one_shape = copy.copy(engine)
  one_shape.settings = dataclasses.replace(engine.settings, min_prompt_bucket=96)
  assert one_shape.batch_shape(10) == one_shape.batch_shape(96) == (96, 128)
  assert one_shape.batch_shape(97) == engine.batch_shape(97)  # longer: the next bucket


def test_default_stop_ids_read_generation_config(tmp_path):
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [10, 11]}))
  assert decode_lib.default_stop_token_ids(str(tmp_path), (4,), None) == {4, 10, 11}


@pytest.mark.parametrize("key,value,match", [
    ("decode.method", "medusa",
     r"decode.method='medusa' is not supported \(supported: eagle, eagle3, fspad, vanilla\)"),
    ("decode.top_p", 0.0, r"decode.top_p=0.0: expected a finite number > 0.0 and <= 1.0"),
    ("decode.temperature", -1.0, r"decode.temperature=-1.0: expected a finite number >= 0"),
    ("decode.max_new_tokens", 0, "decode.max_new_tokens"),
    ("decode.batch_size", "4", "decode.batch_size"),
    ("decode.min_prompt_bucket", 0, r"decode.min_prompt_bucket=0: expected an integer >= 1"),
    ("target.path", "", "target.path is not set"),
    ("target.path", "/no/such/dir", "target.path='/no/such/dir'"),
])
def test_config_errors(tiny_llama_dir, tmp_path, key, value, match):
  inp = tmp_path / "in.jsonl"
  inp.write_text(json.dumps(GOOD[0]) + "\n")
  config = tiny_config(tiny_llama_dir).to_dict()  # a plain dict works too (and is not
  section, name = key.split(".")                 # type-safe, so wrong types get through)
  config[section][name] = value
  with pytest.raises(DecodeError, match=match):
    run_decode(config, str(inp), str(tmp_path / "out.jsonl"), progress=False)


def test_missing_input_file(tiny_llama_dir, tmp_path):
  with pytest.raises(DecodeError, match="input file .*nope.jsonl.* does not exist"):
    run_decode(tiny_config(tiny_llama_dir), str(tmp_path / "nope.jsonl"),
               str(tmp_path / "out.jsonl"), progress=False)


def _cli(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "decode.py")] + args, cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(lib_run, tiny_llama_dir, tmp_path):
  _, _, _, full_out, _ = lib_run
  reference = by_id(read_jsonl(full_out))
  inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
  good = GOOD[:4]  # one of each kind
  expected = write_input(inp, good=good, bad=BAD[:1])
  r = _cli([f"--config={REPO}/configs/tiny.py", f"--config.target.path={tiny_llama_dir}",
            f"--config.decode.max_new_tokens={MAX_NEW}", f"--config.decode.batch_size={BATCH}",
            f"--input={inp}", f"--output={out}"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out + ".summary.json") as f:
    summary = json.load(f)
  assert summary["decoded"] == 4 and summary["malformed"] == 1
  # stdout: the short human summary, not the JSON
  assert r.stdout.strip() == decode_lib.format_summary(summary)
  assert len(r.stdout.splitlines()) <= 4
  assert "decode[vanilla]: 4 records decoded (1 malformed or too long skipped)" in r.stdout
  assert f"{summary['new_tokens']} new tokens" in r.stdout
  (line,) = expected
  assert f"{inp}:{line}: invalid JSON" in r.stderr
  # Not a terminal: one plain progress line at the end, no bar, no library chatter.
  assert "  decode[vanilla]: 4/4 rec (" in r.stderr
  assert console.find_noise(r.stderr) == [], r.stderr[-3000:]
  records = by_id(read_jsonl(out))
  assert sorted(records) == sorted(json.dumps(g["id"]) for g in good)
  for key, rec in records.items():
    assert without_times(rec) == without_times(reference[key])


def test_cli_error_is_one_line(tmp_path):
  (tmp_path / "in.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
  r = _cli([f"--config={REPO}/configs/tiny.py", "--config.target.path=/x",
            "--config.decode.method=fspad2", "--input=in.jsonl", "--output=out.jsonl"],
           tmp_path)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      "decode.py: error: config key decode.method='fspad2' is not supported "
      "(supported: eagle, eagle3, fspad, vanilla)")
  assert "Traceback" not in r.stderr


def test_cli_all_records_skipped_exits_nonzero(tiny_llama_dir, tmp_path):
  """Every record malformed or too long for the cache: exit 1 with one line, and the summary
  file still lists the problems."""
  (tmp_path / "in.jsonl").write_text(
      "not json\n" + json.dumps({"id": "long", "input_ids": [5] * 3000}) + "\n")
  r = _cli([f"--config={REPO}/configs/tiny.py", f"--config.target.path={tiny_llama_dir}",
            "--input=in.jsonl", "--output=out.jsonl"], tmp_path)
  assert r.returncode == 1, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("decode.py: error: no record was decoded: all 2 input record(s) "
                         "were skipped (first: in.jsonl:1: invalid JSON"), last
  assert "Traceback" not in r.stderr and r.stdout == ""
  with open(tmp_path / "out.jsonl.summary.json") as f:
    summary = json.load(f)
  assert summary["decoded"] == 0 and summary["malformed"] == 2
  assert "too long" in summary["problems"][1]["reason"]


def test_resumed_job_with_everything_done_is_not_an_error(lib_run, engine, tmp_path):
  inp, _, _, out, _ = lib_run
  copy_out = str(tmp_path / "out.jsonl")
  with open(out) as f, open(copy_out, "w") as g:
    g.write(f.read())
  summary = run_decode(engine.config, inp, copy_out, engine=engine, progress=False,
                       log=lambda m: None)
  assert summary["decoded"] == 0 and summary["skipped_done"] == len(GOOD)


def test_format_summary_is_short(lib_run):
  text = decode_lib.format_summary(lib_run[2])
  assert len(text.splitlines()) == 2 and "tau" not in text  # vanilla: no acceptance line
  assert text.startswith(f"decode[vanilla]: {len(GOOD)} records decoded ({len(BAD)} "
                         f"malformed or too long skipped)")


def test_llama3_config_file():
  config = load_repo_config("llama3_8b")
  assert config.target.dtype == "bfloat16" and config.decode.method == "vanilla"
  assert "Meta-Llama-3-8B-Instruct" in config.target.path
  assert decode_lib.decode_settings(config).max_new_tokens >= 256
