"""The training data pipeline: parsing, loss masks, bad records, tfds preparation, grain reading."""

import glob
import json
import os

import numpy as np
import pytest

from fspad_jax.data import (Conversation, DataError, Example, Rejected, TrainBatches,
                            load_conversations, pad_token_id, prepare_dataset,
                            tokenize_conversation)
from fspad_jax.hf_checkpoint import load_tokenizer
from fspad_jax.tiny_checkpoint import build_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "sharegpt_mixed.jsonl")
EOT = "<|eot_id|>"
GOOD_LINES = [1, 2, 10, 11, 13]  # parse fine (line 10 is over-long only at a short max_len)
PARSE_BAD = {"invalid_json": [3], "empty": [5], "unknown_role": [6], "non_text": [7],
             "no_assistant": [8], "malformed": [9, 12]}
MAX_LEN = 96


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  build_tokenizer(d)
  return d


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return load_tokenizer(tokenizer_dir)


def _masked_runs(example: Example):
  """Token-id lists of the maximal runs of loss_mask == 1."""
  runs, current = [], []
  for token, m in zip(example.input_ids[:example.length], example.loss_mask[:example.length]):
    if m:
      current.append(int(token))
    elif current:
      runs.append(current)
      current = []
  return runs + ([current] if current else [])


def _synthetic_jsonl(path, n=40):
  """n good conversations (both layouts) followed by the mixed fixture's lines."""
  lines = []
  for i in range(n):
    q, a = f"Question {i}: how many?", f"Answer {i} is {i * 7}."
    if i % 2:
      lines.append(json.dumps({"id": f"s{i}", "conversations": [
          {"from": "human", "value": q}, {"from": "gpt", "value": a}]}))
    else:
      lines.append(json.dumps({"messages": [
          {"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
  with open(FIXTURE) as f:
    lines += f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir):
  root = tmp_path_factory.mktemp("prepared")
  data_path = _synthetic_jsonl(str(root / "synthetic.jsonl"))
  builder_dir, report = prepare_dataset(data_path, tokenizer_dir, MAX_LEN, str(root / "out"),
                                        val_fraction=0.2)
  return data_path, builder_dir, report, str(root / "out")


def _row_keys(batches):
  return [bytes(row) for batch in batches for row in batch["input_ids"]]


# ----------------------------------------------------------------------------- parsing


def test_both_layouts_parse_and_roles_normalize():
  conversations, report = load_conversations(FIXTURE)
  assert [c.line for c in conversations] == GOOD_LINES
  by_line = {c.line: c for c in conversations}
  assert [m["role"] for m in by_line[1].messages] == ["system", "user", "assistant", "user",
                                                      "assistant"]
  assert by_line[1].record_id == "sys-1" and by_line[2].record_id is None
  assert by_line[2].messages[1] == {"role": "assistant", "content": "Blue."}
  assert [m["role"] for m in by_line[11].messages] == ["user", "assistant"]  # user / chatgpt


def test_bad_records_counted_with_line_numbers():
  _, report = load_conversations(FIXTURE)
  assert report.counts == {k: len(v) for k, v in PARSE_BAD.items()}
  assert report.lines == PARSE_BAD
  assert "line 6" in report.to_dict()["unknown_role"]["detail"]


def test_json_list_layout_gives_line_numbers(tmp_path):
  records = [{"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                           {"from": "gpt", "value": "hello"}]},
             "not a record",
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                              "content": ["parts"]}]},
             {"messages": [{"role": "user", "content": "b"}, {"role": "assistant",
                                                              "content": "c"}]}]
  path = tmp_path / "list.json"
  path.write_text(json.dumps(records, indent=1))
  conversations, report = load_conversations(str(path))
  starts = [i + 1 for i, line in enumerate(path.read_text().splitlines())
            if line.startswith(" {") or line.startswith(' "')]
  assert [c.line for c in conversations] == [starts[0], starts[3]]
  assert report.lines == {"malformed": [starts[1]], "non_text": [starts[2]]}
  path.write_text(json.dumps(records, indent=1)[:-40])  # truncated file
  with pytest.raises(DataError, match="list.json"):
    load_conversations(str(path))


# ----------------------------------------------------------------------------- tokenizing


def test_loss_mask_covers_exactly_the_assistant_replies(tokenizer):
  conversations, _ = load_conversations(FIXTURE)
  for conv in conversations:
    example = tokenize_conversation(tokenizer, conv, max_len=512)
    assert isinstance(example, Example) and not example.truncated
    replies = [m["content"].strip() for m in conv.messages if m["role"] == "assistant"]
    decoded = [tokenizer.decode(run) for run in _masked_runs(example)]
    assert decoded == [r + EOT for r in replies], conv.line
    full = tokenizer.apply_chat_template(conv.messages, tokenize=True)["input_ids"]
    assert example.input_ids[:example.length].tolist() == list(full)
    assert example.input_ids.shape == example.loss_mask.shape == (512,)
    assert example.input_ids.dtype == example.loss_mask.dtype == np.int32
    assert (example.input_ids[example.length:] == pad_token_id(tokenizer)).all()
    assert not example.loss_mask[example.length:].any()


def test_truncation_and_over_long(tokenizer):
  conversations, _ = load_conversations(FIXTURE)
  over_long = next(c for c in conversations if c.line == 10)
  assert tokenize_conversation(tokenizer, over_long, MAX_LEN).kind == "over_long"
  reply_first = Conversation(messages=[{"role": "user", "content": "Go."}, {
      "role": "assistant", "content": "word " * 200}], line=1)
  example = tokenize_conversation(tokenizer, reply_first, 32)
  assert example.truncated and example.length == 32 and example.loss_mask[-1] == 1


def test_template_failures_are_render_errors(tokenizer_dir):
  tokenizer = load_tokenizer(tokenizer_dir)
  conv = Conversation(messages=[{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}], line=7)
  tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
  rejected = tokenize_conversation(tokenizer, conv, 64)
  assert isinstance(rejected, Rejected) and rejected.kind == "render_error"
  assert "roles must alternate" in rejected.detail
  tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
  assert tokenize_conversation(tokenizer, conv, 64).kind == "render_error"


# ----------------------------------------------------------------------------- preparing


def test_prepare_writes_array_record_and_reuses(prepared, tokenizer_dir):
  data_path, builder_dir, report, out_dir = prepared
  assert glob.glob(os.path.join(builder_dir, "*-train.array_record-*"))
  assert glob.glob(os.path.join(builder_dir, "*-validation.array_record-*"))
  bad = {k: v["lines"] for k, v in report["bad"].items()}
  offset = 40  # the fixture's lines follow 40 synthetic ones
  assert bad == {**{k: [offset + l for l in v] for k, v in PARSE_BAD.items()},
                 "over_long": [offset + 10]}
  assert report["train"] + report["validation"] == 40 + 4 and report["validation"] > 0
  assert report["records"] == 40 + 12 and not report["reused"]
  mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(builder_dir, "*"))}
  again_dir, again = prepare_dataset(data_path, tokenizer_dir, MAX_LEN, out_dir, 0.2)
  assert again_dir == builder_dir and again["reused"] and again["bad"] == report["bad"]
  assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(builder_dir, "*"))} == mtimes
  other_dir, _ = prepare_dataset(data_path, tokenizer_dir, MAX_LEN + 8, out_dir, 0.2)
  assert other_dir != builder_dir


def test_reading_gives_every_good_record(prepared, tokenizer):
  data_path, builder_dir, report, _ = prepared
  expected = {}
  conversations, _ = load_conversations(data_path)
  for conv in conversations:
    example = tokenize_conversation(tokenizer, conv, MAX_LEN)
    if isinstance(example, Example):
      expected[bytes(example.input_ids)] = example
  rows = {}
  for split in ("train", "validation"):
    batches = list(TrainBatches(builder_dir, split, batch_size=3, shard_index=0, shard_count=1,
                                shuffle=False, num_epochs=1, drop_remainder=False))
    assert sum(len(b["length"]) for b in batches) == report[split]
    for batch in batches:
      assert batch["input_ids"].dtype == batch["loss_mask"].dtype == np.int32
      assert batch["length"].dtype == np.int32 and batch["length"].ndim == 1
      for ids, mask, attn, length in zip(batch["input_ids"], batch["loss_mask"],
                                         batch["attention_mask"], batch["length"]):
        rows[bytes(ids)] = (mask, attn, length)
  assert rows.keys() == expected.keys()
  for key, (mask, attn, length) in rows.items():
    assert (mask == expected[key].loss_mask).all() and length == expected[key].length
    assert attn.sum() == length and attn[:length].all()


def _split_rows(builder_dir):
  """Every stored row of both splits, in file order: (ids, mask, length) bytes."""
  out = {}
  for split in ("train", "validation"):
    batches = TrainBatches(builder_dir, split, batch_size=1, shard_index=0, shard_count=1,
                           shuffle=False, num_epochs=1, drop_remainder=False)
    out[split] = [(bytes(b["input_ids"]), bytes(b["loss_mask"]), int(b["length"][0]))
                  for b in batches]
  return out


def test_parallel_tokenizing_gives_the_same_data(prepared, tokenizer_dir, tmp_path,
                                                 monkeypatch):
  """Worker processes (3 uneven slices) write exactly what the in-process path writes."""
  from fspad_jax import data as data_lib
  data_path, builder_dir, report, _ = prepared
  calls = []
  real = data_lib._tokenize_in_workers
  monkeypatch.setattr(data_lib, "_tokenize_in_workers",
                      lambda *a: calls.append(a[2]) or real(*a))
  par_dir, par_report = prepare_dataset(data_path, tokenizer_dir, MAX_LEN,
                                        str(tmp_path / "par"), 0.2, num_workers=3)
  assert calls == [3]
  assert os.path.basename(os.path.dirname(os.path.dirname(par_dir))) == os.path.basename(
      os.path.dirname(os.path.dirname(builder_dir)))  # same preparation key
  assert {k: v for k, v in par_report.items() if k != "reused"} == {
      k: v for k, v in report.items() if k != "reused"}
  assert _split_rows(par_dir) == _split_rows(builder_dir)


def test_failed_worker_falls_back_to_in_process(prepared, tokenizer, caplog):
  from fspad_jax import data as data_lib
  conversations, _ = load_conversations(prepared[0])
  with caplog.at_level("WARNING"):
    got = list(data_lib._tokenized(tokenizer, conversations, MAX_LEN, 2, ("/no/such/dir", "")))
  assert "a tokenizing worker failed" in caplog.text and "/no/such/dir" in caplog.text
  want = [tokenize_conversation(tokenizer, c, MAX_LEN) for c in conversations]
  assert [type(g) for g in got] == [type(w) for w in want]
  # In-process results come compacted, as workers send them: the unpadded rows.
  assert all(bytes(g.input_ids) == bytes(w.input_ids[:w.length])
             and bytes(g.loss_mask) == bytes(w.loss_mask[:w.length].astype(np.uint8))
             for g, w in zip(got, want) if isinstance(w, Example))


def test_worker_that_cannot_start_falls_back(prepared, tokenizer, tokenizer_dir, monkeypatch,
                                             caplog):
  import subprocess
  from fspad_jax import data as data_lib

  def no_interpreter(*args, **kwargs):
    raise OSError("no interpreter")
  monkeypatch.setattr(subprocess, "Popen", no_interpreter)
  conversations, _ = load_conversations(prepared[0])
  with caplog.at_level("WARNING"):
    got = list(data_lib._tokenized(tokenizer, conversations, MAX_LEN, 2, (tokenizer_dir, "")))
  assert "could not start a tokenizing worker (no interpreter)" in caplog.text
  assert len(got) == len(conversations)


def test_workers_from_an_unguarded_script(prepared, tokenizer_dir, tmp_path):
  """A script without `if __name__ == "__main__"` (which multiprocessing would re-import in
  every worker) prepares with workers and exits."""
  import subprocess
  import sys
  script = tmp_path / "unguarded.py"
  script.write_text(
      "from fspad_jax.data import prepare_dataset\n"
      f"d, r = prepare_dataset({prepared[0]!r}, {tokenizer_dir!r}, {MAX_LEN}, "
      f"{str(tmp_path / 'out')!r}, 0.2, num_workers=2)\n"
      "print('TRAIN', r['train'])\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=repo))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"TRAIN {prepared[2]['train']}" in proc.stdout
  assert "worker failed" not in proc.stderr


def test_num_workers_resolution():
  from fspad_jax.data import PARALLEL_MIN_CONVERSATIONS, resolve_num_workers
  assert resolve_num_workers(3, 10) == 3
  assert resolve_num_workers(0, PARALLEL_MIN_CONVERSATIONS - 1) == 1
  assert 1 <= resolve_num_workers(0, PARALLEL_MIN_CONVERSATIONS) <= 16


def test_shuffle_is_deterministic_per_seed_and_per_epoch(prepared):
  builder_dir = prepared[1]

  def first(seed, n):
    it = TrainBatches(builder_dir, batch_size=4, seed=seed, shard_index=0, shard_count=1)
    return _row_keys(next(it) for _ in range(n))

  n = TrainBatches(builder_dir, batch_size=4, shard_index=0, shard_count=1).examples_per_epoch
  a, b, c = first(0, n // 2 + 1), first(0, n // 2 + 1), first(1, n // 2 + 1)  # > 2 epochs
  assert a == b and a != c
  epoch0, epoch1 = a[:n], a[n:2 * n]
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_two_shards_are_disjoint_and_cover_the_split(prepared):
  builder_dir = prepared[1]
  shards = [_row_keys(TrainBatches(builder_dir, batch_size=2, seed=3, shard_index=i,
                                   shard_count=2, num_epochs=1, drop_remainder=False))
            for i in range(2)]
  whole = _row_keys(TrainBatches(builder_dir, batch_size=2, shard_index=0, shard_count=1,
                                 shuffle=False, num_epochs=1, drop_remainder=False))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(whole)
  assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_get_state_set_state_resumes_exactly(prepared):
  builder_dir = prepared[1]
  kwargs = dict(batch_size=3, seed=5, shard_index=1, shard_count=2)
  uninterrupted = TrainBatches(builder_dir, **kwargs)
  reference = [next(uninterrupted) for _ in range(16)]  # crosses epoch boundaries
  assert 16 * 3 > 2 * uninterrupted.examples_per_epoch
  first = TrainBatches(builder_dir, **kwargs)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state["next_batch"] == 5
  resumed = TrainBatches(builder_dir, **kwargs)
  resumed.set_state(state)
  for want in reference[5:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="seed"):
    TrainBatches(builder_dir, **{**kwargs, "seed": 6}).set_state(state)


def test_empty_validation_split_is_left_out(tmp_path, tokenizer_dir):
  builder_dir, report = prepare_dataset(FIXTURE, tokenizer_dir, MAX_LEN, str(tmp_path), 0.0)
  assert report["validation"] == 0 and report["train"] == len(GOOD_LINES) - 1
  assert len(list(TrainBatches(builder_dir, batch_size=1, shard_index=0, shard_count=1,
                               num_epochs=1))) == report["train"]
  with pytest.raises(ValueError, match="no 'validation' split"):
    TrainBatches(builder_dir, "validation", batch_size=1, shard_index=0, shard_count=1)
  all_bad = tmp_path / "bad.jsonl"
  all_bad.write_text('{"conversations": []}\nnot json\n')
  with pytest.raises(DataError, match="no usable training conversation"):
    prepare_dataset(str(all_bad), tokenizer_dir, MAX_LEN, str(tmp_path), 0.0)
