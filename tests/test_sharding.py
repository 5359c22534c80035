"""Sharded execution equals one device: simulated CPU meshes and 2 local processes."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flax import nnx

from fspad_jax.draft import draft_config_from_target, init_draft
from fspad_jax.draft_checkpoint import save_draft
from fspad_jax.sharding import ShardingError, ShardingRules, make_mesh
from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, tiny_config
from process_group import ProcessGroup
from sharding_case import continuous_case, run_case

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = ["8,1,1", "1,8,1", "1,1,8", "2,2,2"]
TENSOR_MESH = "1,1,8"
CONTINUOUS_MESH = "2,2,2"  # continuous batching (the decode.py path): every axis at once


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  # 8 heads / 8 KV heads / d_ff 128 / vocab 512: every tensor axis divides 8 ways.
  cfg = tiny_config(hidden_size=64, num_heads=8, num_kv_heads=8, intermediate_size=128)
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("shard")), cfg, seed=3)


@pytest.fixture(scope="module")
def draft_dir(model_dir, tmp_path_factory):
  """A random EAGLE-layout eagle draft for the target."""
  from fspad_jax.hf_checkpoint import load_target
  cfg, _, _ = load_target(model_dir, make_mesh((1, 1, 1), jax.devices()[:1]))
  dcfg = draft_config_from_target(cfg, "eagle")
  path = str(tmp_path_factory.mktemp("shard_draft"))
  save_draft(path, dcfg, nnx.state(init_draft(dcfg, seed=2)))
  return path


@pytest.fixture(scope="module")
def single_device(model_dir, draft_dir):
  one = jax.devices()[:1]
  return (*run_case(model_dir, (1, 1, 1), devices=one),
          continuous_case(model_dir, (1, 1, 1), draft_dir, devices=one))


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
  env.pop("XLA_FLAGS", None)
  return env


def _check(results, single_device):
  ref_logits, ref_tokens, ref_continuous = single_device
  for m in MESHES:
    np.testing.assert_allclose(results[f"logits_{m}"], ref_logits, atol=1e-5, err_msg=m)
    np.testing.assert_array_equal(results[f"tokens_{m}"], ref_tokens, err_msg=m)
  # Continuous batching: the same tokens, vanilla and speculative, with the slot state's KV
  # cache split over every mesh axis (batch over data x fsdp, KV heads over tensor).
  for method in ("vanilla", "eagle"):
    np.testing.assert_array_equal(results[f"continuous_{method}"], ref_continuous["vanilla"],
                                  err_msg=method)
  spec = str(results["continuous_cache_spec"])
  assert spec == "P(None, ('data', 'fsdp'), None, 'tensor', None, None)", spec


def test_eight_simulated_devices_match_one(model_dir, draft_dir, single_device, tmp_path):
  out = tmp_path / "r.npz"
  subprocess.run([sys.executable, os.path.join(HERE, "sharded_runner.py"),
                  "--model_dir", model_dir, "--out", str(out), "--devices", "8",
                  "--meshes", *MESHES, "--continuous_mesh", CONTINUOUS_MESH,
                  "--draft_dir", draft_dir], check=True, env=_env(), timeout=900)
  results = np.load(out)
  _check(results, single_device)
  # Tensor parallelism: a forward that writes K/V (one decode token, a 10-token block)
  # all-gathers nothing: the cache write is a scatter over (row, slot) indices with K/V,
  # heads and head_dim as its window, so each shard writes its own KV heads. (With heads
  # as an index of the scatter, the new K/V and the indices were all-gathered over
  # `tensor` at every layer.)
  np.testing.assert_array_equal(results[f"forward_all_gathers_{TENSOR_MESH}"], [0, 0])


def test_two_processes_match_one(model_dir, draft_dir, single_device, tmp_path):
  out = tmp_path / "mp.npz"

  def commands(port, attempt):
    return [[sys.executable, os.path.join(HERE, "sharded_runner.py"), "--model_dir", model_dir,
             "--out", str(out), "--devices", "4", "--num_processes", "2", "--process_id",
             str(i), "--coordinator", f"localhost:{port}", "--meshes", *MESHES,
             "--continuous_mesh", CONTINUOUS_MESH, "--draft_dir", draft_dir]
            for i in range(2)]

  group = ProcessGroup(commands, tmp_path, "mp", _env()).start()
  logs = group.wait(timeout=900)
  for code, log in zip(group.returncodes, logs):
    assert code == 0, log[-3000:]
    assert "devices 8 processes 2 ok" in log, log[-3000:]
  _check(np.load(out), single_device)


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
  with pytest.raises(ShardingError, match="'embed' and 'mlp' of gate_up_kernel"):
    ShardingRules(mlp=("fsdp",))
  with pytest.raises(ShardingError, match="'batch' and 'act_embed'"):
    ShardingRules(act_embed=("data",))
  with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
    ShardingRules(heads=("model",))


def test_mesh_shape_errors():
  with pytest.raises(ShardingError, match=r"needs 8 devices, but 1 are available"):
    make_mesh((2, 2, 2), devices=jax.devices()[:1])


def test_indivisible_dimension_is_replicated():
  rules = ShardingRules()
  mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
  assert rules.spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == \
      jax.sharding.PartitionSpec(None, None, None)
