"""Finds and loads a trained draft for decoding, from any of the places one can live:

  * a train.py workdir (its `draft_config.json` and latest complete Orbax checkpoint),
  * one step's Orbax checkpoint (`<workdir>/checkpoints/<step>`),
  * an EAGLE/FSPAD-layout directory (config.json + safetensors or pytorch_model.bin).

Only the draft's params are restored from an Orbax checkpoint (the optimizer state is left
on disk), directly into their shardings. The draft must fit the target: same hidden size and
vocabulary, and a kind the decoding method accepts.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from fspad_jax import hot_vocab
from fspad_jax.config import ConfigError, ModelConfig, RopeConfig
from fspad_jax.draft import DraftConfig, abstract_draft, check_feature_layers
from fspad_jax.hf_checkpoint import param_shardings
from fspad_jax.sharding import ShardingRules

# decode.method -> draft kinds it runs (the FSPAD ablations and 'fspad3' decode like FSPAD;
# 'eagle3' heads, with their own LM head, under their own method name).
METHOD_KINDS = {"eagle": ("eagle",), "fspad": ("fspad", "fs_only", "pad_only", "fspad3"),
                "eagle3": ("eagle3",)}


def draft_config_from_json(raw: dict, source: str) -> DraftConfig:
  try:
    raw = dict(raw)
    raw["rope"] = RopeConfig(**raw["rope"])
    if "feature_layers" in raw:  # a JSON list; older configs have none (the final feature)
      raw["feature_layers"] = tuple(raw["feature_layers"])
    return DraftConfig(**raw)
  except (KeyError, TypeError) as e:
    raise ConfigError(f"{source}: not a fspad_jax draft config ({e})") from None


def _orbax_step_dir(path: str) -> tuple[str, str] | None:
  """(step dir, draft_config.json) for a workdir or a step dir; None if neither."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "draft_config.json")):
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise ConfigError(f"{path}: a train.py workdir without a checkpoints/ directory")
    # A step is complete once Orbax wrote its commit_success.txt (train_lib.Checkpointer).
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()
             and os.path.isfile(os.path.join(ckpt_dir, d, "commit_success.txt"))]
    if not steps:
      raise ConfigError(f"{ckpt_dir}: no complete checkpoint yet")
    return os.path.join(ckpt_dir, str(max(steps))), os.path.join(path, "draft_config.json")
  if os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")):
    if not os.path.isfile(os.path.join(path, "commit_success.txt")):
      raise ConfigError(f"{path}: an incomplete checkpoint (no commit_success.txt)")
    workdir = os.path.dirname(os.path.dirname(path))
    return path, os.path.join(workdir, "draft_config.json")
  return None


def load_draft_for_decode(path: str, target_cfg: ModelConfig, method: str, mesh,
                          rules: ShardingRules | None = None, dtype: str | None = None
                          ) -> tuple[DraftConfig, nnx.GraphDef, nnx.State]:
  """Loads the draft at `path` for `method` ('eagle' | 'fspad'); refuses one that does not
  fit the target. Returns (cfg, graphdef, params) with params placed by their shardings."""
  rules = rules or ShardingRules()
  dtype = dtype or target_cfg.dtype
  if method not in METHOD_KINDS:
    raise ConfigError(f"decode.method={method!r} takes no draft")
  if not path or not os.path.isdir(path):
    raise ConfigError(f"config key draft.path={path!r}: no such directory")
  orbax = _orbax_step_dir(path)
  if orbax is not None:
    step_dir, cfg_path = orbax
    if not os.path.isfile(cfg_path):
      raise ConfigError(f"{step_dir}: cannot find the run's draft_config.json at {cfg_path}")
    try:
      with open(cfg_path, "rb") as f:
        raw = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{cfg_path}: corrupt draft config ({e}); train.py rewrites it on "
                        "its next run of that workdir") from None
    cfg = draft_config_from_json(raw, cfg_path)
    cfg = cfg.replace(dtype=dtype)
    _check_fit(cfg, target_cfg, method, path)
    params = _restore_params(step_dir, cfg, mesh, rules)
    graphdef, _ = nnx.split(abstract_draft(cfg))
    return cfg, graphdef, params
  from fspad_jax import eagle3_checkpoint
  if eagle3_checkpoint.is_eagle3_dir(path):
    cfg, graphdef, params = eagle3_checkpoint.load_eagle3_draft(path, target_cfg, dtype=dtype,
                                                                mesh=mesh, rules=rules)
    _check_fit(cfg, target_cfg, method, path)
    return cfg, graphdef, params
  from fspad_jax.draft_checkpoint import load_draft
  cfg, graphdef, params = load_draft(path, target_cfg, dtype=dtype, mesh=mesh, rules=rules)
  _check_fit(cfg, target_cfg, method, path)
  return cfg, graphdef, params


def load_draft_hot_ids(path: str, cfg: DraftConfig, target_cfg: ModelConfig):
  """The hot vocabulary of the draft at `path` (loaded by load_draft_for_decode as `cfg`):
  `hot_vocab.npy` of a train.py run, or an EAGLE-layout directory's `d2t` map; None for a
  full-vocabulary draft."""
  if not cfg.hot_vocab_size:
    return None
  orbax = _orbax_step_dir(path)
  if orbax is not None:
    return hot_vocab.load_hot_ids(os.path.dirname(orbax[1]), target_cfg.vocab_size,
                                  expected=cfg.hot_vocab_size)
  from fspad_jax.draft_checkpoint import read_hot_ids
  return read_hot_ids(path, vocab_size=target_cfg.vocab_size)


def _check_fit(cfg: DraftConfig, target_cfg: ModelConfig, method: str, path: str):
  """The draft at `path` must be a kind `method` runs, with the target's widths, vocabulary
  and layers: one line otherwise."""
  from fspad_jax.draft_checkpoint import check_fits_target  # pylint: disable=import-outside-toplevel
  if cfg.kind not in METHOD_KINDS[method]:
    article = "an" if cfg.kind[0] in "aeiou" else "a"
    raise ConfigError(f"{path}: {article} {cfg.kind!r} draft, but decode.method={method!r} runs "
                      f"{' / '.join(METHOD_KINDS[method])} drafts")
  check_fits_target(cfg, target_cfg, path)
  check_feature_layers(cfg, target_cfg)


# Feature sampling's gate/up kernel was stored [d, 2, d_ff] before it became [2, d, d_ff]
# (draft.FeatureSampling): checkpoints of either layout decode.
LEGACY_FS_KERNEL = ("feature_sampling", "gate_up_kernel")


def stored_fs_kernel_shape(state_dir: str) -> tuple[int, ...] | None:
  """The shape of the FS gate/up kernel in an Orbax train state, None if it has none."""
  import orbax.checkpoint as ocp
  from etils import epath
  # The handler reads the tree's own metadata; a Checkpointer would also look for the step's
  # _CHECKPOINT_METADATA here (CheckpointManager writes it one level up) and log a warning.
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  tree = getattr(meta, "item_metadata", None) or meta
  try:
    return tuple(tree["params"][LEGACY_FS_KERNEL[0]][LEGACY_FS_KERNEL[1]].shape)
  except (KeyError, TypeError):
    return None


def is_legacy_fs_layout(state_dir: str, cfg: DraftConfig) -> bool:
  shape = stored_fs_kernel_shape(state_dir) if cfg.feature_sampling else None
  return shape == (cfg.hidden_size, 2, cfg.intermediate_size)


def _restore_params(step_dir: str, cfg: DraftConfig, mesh, rules: ShardingRules):
  """The float32 master params of a train.py checkpoint, cast to cfg.dtype, sharded."""
  import orbax.checkpoint as ocp
  state_dir = os.path.join(step_dir, "state")
  abstract = nnx.state(abstract_draft(cfg.replace(dtype="float32")))
  shardings = nnx.to_pure_dict(param_shardings(abstract, mesh, rules))
  target = {"params": jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nnx.to_pure_dict(abstract), shardings)}
  legacy = is_legacy_fs_layout(state_dir, cfg)
  if legacy:  # read the old [d, 2, d_ff] kernel, transpose it below
    group, name = LEGACY_FS_KERNEL
    new = target["params"][group][name]
    target["params"][group][name] = jax.ShapeDtypeStruct(
        (new.shape[1], new.shape[0], new.shape[2]), new.dtype)
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  if legacy:
    group, name = LEGACY_FS_KERNEL
    restored["params"][group][name] = jax.device_put(
        jax.numpy.transpose(restored["params"][group][name], (1, 0, 2)),
        shardings[group][name])
  params = jax.tree.map(lambda x: x.astype(cfg.dtype), restored["params"])
  state = nnx.state(abstract_draft(cfg))
  nnx.replace_by_pure_dict(state, params)
  return state
