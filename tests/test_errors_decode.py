"""decode.py under user mistakes and faults (issue 11), through the real CLI: each mistake is
one line naming the file, line or key, with a non-zero exit; no job loses, duplicates or
mixes output records (a concurrent job, a rerun with other settings, Ctrl-C)."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fspad_jax import cli
from fspad_jax.config import load_repo_config
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERROR = "decode.py: error: "


@pytest.fixture(scope="module")
def target(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_target")))


def _argv(args, target, max_new):
  # SIGINT as Python's default (a shell's background job may ignore it), then decode.py.
  return [sys.executable, "-c", "import runpy, signal, sys; "
          "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')",
          os.path.join(REPO, "decode.py"), f"--config={REPO}/configs/tiny.py",
          f"--config.decode.max_new_tokens={max_new}",
          *([f"--config.target.path={target}"] if target else []), *args]


def start(cwd, *args, target=None, max_new=4) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.Popen(_argv(args, target, max_new), cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
  stdout, stderr = p.communicate(timeout=timeout)
  return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def decode(cwd, *args, target=None, max_new=4) -> subprocess.CompletedProcess:
  return finish(start(cwd, *args, target=target, max_new=max_new))


def decode_all(cwd, cases, target=None) -> list[subprocess.CompletedProcess]:
  """Independent runs at once (each mostly imports JAX)."""
  return [finish(p) for p in [start(cwd, *args, target=target) for args in cases]]


def one_error_line(r) -> str:
  """The run failed with exactly one line on stderr (no traceback, no other output)."""
  assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(ERROR), r.stderr[-2000:]
  assert r.stdout == ""
  return lines[0][len(ERROR):]


def ids_in(path) -> list:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["id"] for line in f]  # every line whole JSON


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------- mistakes refused up front


def test_flag_and_config_mistakes_before_anything_loads(target, tmp_path):
  (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "adir").mkdir()
  io = ["--input=in.jsonl", "--output=out.jsonl"]
  cases = [  # (arguments, the one line, exactly)
      (["--config.decode.temprature=0.5", *io],
       "--config.decode.temprature: no such config key (did you mean "
       "--config.decode.temperature?)"),
      (["--config.decode.temperature=nan", *io],
       "config key decode.temperature=nan: expected a finite number >= 0.0"),
      (["--config.decode.top_p=inf", *io],
       "config key decode.top_p=inf: expected a finite number > 0.0 and <= 1.0"),
      (["--config.decode.top_k=-1", *io],
       "config key decode.top_k=-1: expected an integer >= 0"),
      (["--config.decode.seed=-3", *io], "config key decode.seed=-3: expected an integer >= 0"),
      (["--seed=-1", *io], "--seed=-1: expected an integer >= 0"),
      (["--input=adir", "--output=out.jsonl"],
       "input path 'adir' is a directory, not a JSONL file"),
      (["--input=in.jsonl", "--output=adir"],
       "output path 'adir' is a directory; give a file path, e.g. 'adir/out.jsonl'"),
      (["--input=empty.jsonl", "--output=out.jsonl"],
       "input file 'empty.jsonl' is empty: no record to decode"),
  ]
  for (args, expected), r in zip(cases, decode_all(tmp_path, [c for c, _ in cases], target)):
    assert one_error_line(r) == expected, args
  assert sorted(os.listdir(tmp_path)) == ["adir", "empty.jsonl", "in.jsonl"]  # nothing written


def test_train_py_config_typo_is_one_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                      f"--config={REPO}/configs/tiny.py", "--config.train.lerning_rate=1",
                      f"--workdir={tmp_path}/w"], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [
      "train.py: error: --config.train.lerning_rate: no such config key (did you mean "
      "--config.train.learning_rate?)"]


def test_config_key_suggestions():
  config = load_repo_config("tiny")
  assert cli.unknown_key_message(config, "decode.temperature") is None
  assert cli.unknown_key_message(config, "decod.temperatur") == (
      "--config.decod.temperatur: no such config key (did you mean "
      "--config.decode.temperature?)")
  assert cli.unknown_key_message(config, "zzzz") == (
      "--config.zzzz: no such config key (config has: data, decode, draft, mesh, target, "
      "train)")
  assert "is a value, not a section" in cli.unknown_key_message(config, "decode.top_k.x")


def test_checkpoint_dependent_mistakes(target, tmp_path):
  """tree_top_k larger than the vocabulary; a non-integer eos id in generation_config.json."""
  (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
  (tmp_path / "draft").mkdir()
  bad_target = str(tmp_path / "target")
  shutil.copytree(target, bad_target)
  with open(os.path.join(bad_target, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [2, "</s>"]}, f)
  tree, eos = decode_all(tmp_path, [
      [f"--config.target.path={target}", "--config.decode.method=fspad",
       "--config.draft.path=draft", "--config.decode.tree_top_k=100000", "--input=in.jsonl",
       "--output=a.jsonl"],
      [f"--config.target.path={bad_target}", "--input=in.jsonl", "--output=b.jsonl"]])
  assert one_error_line(tree) == ("config key decode.tree_top_k=100000 exceeds the target's "
                                  "vocabulary (size 512)")
  assert one_error_line(eos) == (f"{bad_target}/generation_config.json: eos_token_id [2, "
                                 f"'</s>']: expected a token id (an integer >= 0) or a list "
                                 f"of them")
  assert not os.path.exists(tmp_path / "a.jsonl") and not os.path.exists(tmp_path / "b.jsonl")


# ------------------------------------------------------------------- malformed input lines


def test_malformed_text_is_reported_by_line(target, tmp_path):
  """Invalid UTF-8, blank text in any field, unknown roles and lone surrogates are
  malformed lines (line number and reason); train.py's role names are accepted."""
  lines = [
      b'{"id": "ok1", "prompt": "Hello there"}',
      b'{"id": "utf", "prompt": "caf\xe9"}',  # Latin-1, not UTF-8
      b'{"id": "blank", "prompt": " \\t\\n "}',
      b'{"id": "msg", "messages": [{"role": "user", "content": "   "}]}',
      b'{"id": "turn", "turns": ["Name a color.", "  "]}',
      b'{"id": "role", "messages": [{"role": "tool", "content": "x"}]}',
      b'{"id": "sur", "prompt": "a\\ud800b"}',
      b'{"id": "ok2", "messages": [{"role": "human", "content": "Hi"}]}',  # train's name
  ]
  (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  r = decode(tmp_path, "--input=in.jsonl", "--output=out.jsonl", target=target)
  assert r.returncode == 0, r.stderr[-2000:]
  expected = {2: "invalid UTF-8 (byte 0xe9", 3: "empty prompt (blank or whitespace only)",
              4: "empty messages[0] content", 5: "empty turns[1]",
              6: "messages[0] has role 'tool', which train.py rejects too",
              7: "prompt holds an unpaired surrogate escape"}
  for line, reason in expected.items():
    assert any(m.startswith(f"in.jsonl:{line}: {reason}") for m in r.stderr.splitlines()), (
        line, r.stderr)
  assert "Traceback" not in r.stderr
  assert sorted(ids_in(tmp_path / "out.jsonl")) == ["ok1", "ok2"]
  with open(tmp_path / "out.jsonl.summary.json") as f:
    assert json.load(f)["malformed"] == len(expected)


# ------------------------------------------------------ one owner, one set of settings


def test_lock_settings_and_duplicates(target, tmp_path):
  """A held lock refuses a second job; a lock file left by a dead job does not; a rerun
  with other settings is refused (or continues on purpose); duplicates are reported."""
  write_jsonl(tmp_path / "in.jsonl", [{"id": i, "input_ids": [0, 5 + i]} for i in range(3)])
  out = tmp_path / "out.jsonl"
  lock_path = str(out) + ".lock"
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX)  # another job owns the output
  os.write(fd, json.dumps({"pid": 4242, "host": "otherhost", "since": "then"}).encode())
  r = decode(tmp_path, "--input=in.jsonl", "--output=out.jsonl", target=target)
  assert one_error_line(r) == ("output 'out.jsonl' is being written by another decode.py job "
                               "(pid 4242 on otherhost, since then); wait for it to end, or "
                               "give another --output")
  assert not out.exists()
  os.close(fd)  # its owner died: the lock file stays, unlocked

  r = decode(tmp_path, "--input=in.jsonl", "--output=out.jsonl", target=target)
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(ids_in(out)) == [0, 1, 2] and not os.path.exists(lock_path)  # released
  with open(str(out) + ".settings.json") as f:
    assert json.load(f)["settings"]["decode.temperature"] == 0.0

  before = out.read_bytes()
  r = decode(tmp_path, "--input=in.jsonl", "--output=out.jsonl",
             "--config.decode.temperature=0.7", target=target)
  assert one_error_line(r) == (
      "out.jsonl holds records decoded with other settings: decode.temperature 0.0 -> 0.7 "
      "(see out.jsonl.settings.json); give another --output, or pass "
      "--allow_changed_settings to add to it anyway")
  assert out.read_bytes() == before

  # Two jobs that ran before outputs were locked left an id twice: reported, not repeated.
  first = before.split(b"\n")[0] + b"\n"
  out.write_bytes(before + first)
  write_jsonl(tmp_path / "in.jsonl", [{"id": i, "input_ids": [0, 5 + i]} for i in range(4)])
  r = decode(tmp_path, "--input=in.jsonl", "--output=out.jsonl",
             "--config.decode.temperature=0.7", "--allow_changed_settings", target=target)
  assert r.returncode == 0, r.stderr[-2000:]
  warnings = [m for m in r.stderr.splitlines() if m.startswith("warning:")]
  assert len(warnings) == 2, r.stderr
  assert warnings[0].startswith(f"warning: out.jsonl: 1 id(s) have more than one record "
                                f"(first: id {ids_in(out)[0]} on lines 1, 4)")
  assert warnings[1].startswith("warning: adding to out.jsonl, whose records were decoded "
                                "with other settings (--allow_changed_settings): "
                                "decode.temperature 0.0 -> 0.7")
  ids = ids_in(out)
  assert len(ids) == 5 and sorted(set(ids)) == [0, 1, 2, 3]  # only id 3 was added
  with open(str(out) + ".summary.json") as f:
    summary = json.load(f)
  assert summary["duplicate_ids_in_output"] == 1
  assert summary["changed_settings"] == ["decode.temperature"]


# -------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_a_rerun_resumes(target, tmp_path):
  n = 150  # short records, so that Ctrl-C lands mid-job yet the rerun is quick
  write_jsonl(tmp_path / "in.jsonl", [{"id": i, "input_ids": [0, 5 + i % 50, 7]}
                                      for i in range(n)])
  out = tmp_path / "out.jsonl"
  args = ("--input=in.jsonl", "--output=out.jsonl", "--config.decode.batch_size=1")
  p = start(tmp_path, *args, target=target)
  deadline = time.monotonic() + 240
  # Two whole lines: then at most a third, mid-write, is cut back off by the Ctrl-C.
  while (not out.exists() or out.read_bytes().count(b"\n") < 2) and time.monotonic() < deadline:
    time.sleep(0.01)
  p.send_signal(signal.SIGINT)
  r = finish(p, timeout=120)
  assert r.returncode == 130, r.stderr[-2000:]
  written = len(ids_in(out))  # every line whole
  assert 2 <= written < n, "the job ended before Ctrl-C reached it"
  assert r.stderr.strip().splitlines()[-1] == (
      f"decode.py: interrupted (Ctrl-C): {written} record(s) written to out.jsonl by this "
      f"run, {written} in all, each line whole; rerun the same command to decode the rest")
  assert "Traceback" not in r.stderr and r.stdout == ""
  assert not os.path.exists(str(out) + ".lock")
  r = decode(tmp_path, *args, target=target)
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(ids_in(out)) == list(range(n))  # none lost, none twice
