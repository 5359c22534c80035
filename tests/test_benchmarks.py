"""The benchmark scripts run end to end at the tiny shape and print complete records.

No speed is asserted here (figures live in benchmarks/RESULTS.md, with machine and command);
this keeps the scripts that produced those figures runnable, so that the next session with
a GPU can rerun them as they are.
"""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> (arguments, positive timing fields every record must carry, number of records)
CASES = {
    "decode_bench.py": (
        ["--shape=tiny", "--batch", "1", "2", "--cache_len", "128", "--gen_tokens", "8",
         "--iters", "2"],
        ["bound_ms", "step_ms", "layers_ms", "lm_head_ms", "generate_loop_ms_per_step",
         "generate_tokens_per_s", "bandwidth_GBps"], 2),
    "spec_bench.py": (
        ["--shape=tiny", "--batch", "1", "--prefix", "32", "--iters", "2", "--loop_steps", "2",
         "--vanilla_tokens", "4"],
        ["vanilla_step_ms", "tree_draft_ms", "verify_ms", "full_step_ms", "loop_ms_per_step",
         "device_vanilla_step_ms", "device_tree_draft_ms", "device_verify_ms"], 1),
    "tree_auto_bench.py": (
        ["--shape=tiny", "--batch", "1", "--prefix", "32", "--max_new_tokens", "16"],
        ["timing_s", "vanilla_step_ms", "fixed_6_10_60_expected_tau"], 1),
    "train_bench.py": (
        ["--shape=tiny", "--iters", "2"],
        ["step_ms", "target_tokens_per_s", "target_forward_ms", "agreement_eval_ms",
         "achieved_tflops", "mfu", "peak_memory_GB"], 1),
    "sampling_bench.py": (["--shape", "2,3,64", "--iters", "1"], ["ms_per_call"], 3),
}


def test_profile_script_counts_kernels(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "profile_spec.py"), "--shape=tiny",
       "--prefix", "32", "--steps", "2", "--vanilla_tokens", "4", "--out", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
  for name in ("speculative", "vanilla"):
    summary = record[name]
    assert summary["source"] == "XLA ops on CPU threads"
    assert summary["kernels_per_unit"] > 1 and summary["kernel_ms_per_unit"] > 0
    assert summary["top"] and all(k["ms_per_unit"] > 0 for k in summary["top"])
  # A speculative step (tree draft + verify + commit) runs more ops than a vanilla token.
  assert record["speculative"]["kernels_per_unit"] > record["vanilla"]["kernels_per_unit"]


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_script_runs(script):
  args, fields, num_records = CASES[script]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script)] + args,
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(records) == num_records, proc.stdout[-2000:]
  for record in records:
    assert record["shape"] == ([2, 3, 64] if script == "sampling_bench.py" else "tiny")
    assert record["backend"] == "cpu"
    for field in fields:
      value = record[field]
      assert isinstance(value, (int, float)) and math.isfinite(value), (field, value)
      assert value > 0, (field, value)
    if script == "sampling_bench.py" and record["setting"] == "t0.8_topk20":
      assert record["sorts"] == 0 and record["topk_kernels"] >= 1, record  # not a row sort
    if script == "spec_bench.py":  # differences of two timings: finite (tiny shapes are noisy)
      for field in ("vanilla_loop_ms_per_token", "breakeven_tau",
                    "device_commit_and_bookkeeping_ms", "commit_and_bookkeeping_ms"):
        assert math.isfinite(record[field]), (field, record[field])


def test_step_ops_audit(tmp_path):
  """The compile-only audit at Llama-3-8B widths (1 and 2 layers, abstract weights): the
  write-then-attend cache leaves no cache-sized copy in either step, and a greedy step runs
  no PRNG loop. These are properties of the compiled programs, not timings."""
  out = tmp_path / "ops.json"
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "step_ops.py"), "--layers", "1", "2",
       "--cache_len", "1024", "--json", str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  for step in ("vanilla", "speculative"):
    fit = report[step]["fit"]
    assert fit["per_layer"] > 0 and fit["fixed"] > 0, fit
    for layers, audit in report[step]["by_layers"].items():
      assert audit["big_copies"] == 0, (step, layers, audit)
      assert audit["while_loops"] == [], (step, layers, audit["while_loops"])
  spec = report["speculative"]["by_layers"]["2"]
  assert spec["custom_calls"].get("TopK", 0) >= 1
  # TopK's comparator bodies are not kernels (they were once counted: scalar xor/compare).
  assert "xor" not in spec["ops_by_kind"] and "compare" not in spec["ops_by_kind"], spec
  assert spec["executed_ops"] == spec["ops"]  # a greedy step has no loop
  assert sum(report["speculative_by_source"]["speculative_step"].values()) > 0
  assert report["draft_pass"]["lm_head_rows"] == 128256


@pytest.mark.parametrize("script", ["benchmarks/gpu_session.sh", "benchmarks/prepare_gpu_carry.sh",
                                    "run_demo.sh", ".ci/run"])
def test_shell_script_parses(script):
  """The shell entry points parse (bash -n): the GPU session script and its preparation run
  only where a GPU is lent, so a syntax error would otherwise surface there first."""
  r = subprocess.run(["bash", "-n", os.path.join(REPO, script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
