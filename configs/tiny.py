"""Tiny CPU config: train a draft on, or decode with, any Hugging Face model directory.

  python train.py --config=configs/tiny.py --config.target.path=/tmp/tiny_llama \
    --config.data.path=conversations.jsonl --workdir=/tmp/tiny_train
  python decode.py --config=configs/tiny.py --config.target.path=/tmp/tiny_llama \
    --input=prompts.jsonl --output=/tmp/tiny_out.jsonl \
    [--config.decode.method=fspad --config.draft.path=/tmp/tiny_train --compare_vanilla]

Runs in about a minute on 2 CPU cores at the defaults (float32, max_len 128, 200 steps).

(A model directory to try it on: `python -c "from fspad_jax.tiny_checkpoint import
make_tiny_checkpoint; make_tiny_checkpoint('/tmp/tiny_llama')"`.)
"""

import ml_collections


def target_config() -> ml_collections.ConfigDict:
  """The model being decoded (a Hugging Face model directory)."""
  c = ml_collections.ConfigDict()
  c.path = ""  # required: --config.target.path=DIR
  c.dtype = "float32"  # float32 | bfloat16
  # '' = the tokenizer's own; or a name in hf_checkpoint.CHAT_TEMPLATES / .jinja / Jinja
  c.chat_template = ""
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.shape = (1, 1, -1)
  return c


def decode_config() -> ml_collections.ConfigDict:
  """Decoding method and sampling settings."""
  c = ml_collections.ConfigDict()
  c.method = "vanilla"  # vanilla | eagle | fspad | eagle3 (all but vanilla need draft.path)
  c.temperature = 0.0  # 0 = greedy
  c.top_p = 1.0
  c.top_k = 0  # 0 = off
  c.max_new_tokens = 16
  c.batch_size = 4
  c.cache_len = 0  # 0 = derived per batch from prompt length + max_new_tokens
  c.stop_token_ids = ()  # extra stop ids, on top of the checkpoint's eos ids
  c.seed = 0
  # EAGLE-2 dynamic tree (eagle/fspad): depth D, top-K per level, draft nodes verified.
  c.tree_depth = 5
  c.tree_top_k = 4
  c.total_tokens = 16
  # "auto": depth/top-k/nodes (or vanilla) sized from measured costs; "auto:depth=4" pins
  # the depth, as does --config.decode.tree_depth=4 on decode.py's command line (the three
  # values above are the fixed tree's and do not pin).
  c.tree = ""
  return c


def draft_config() -> ml_collections.ConfigDict:
  """The draft head: its kind, compute dtype, and shape overrides (0 = the target's) for
  training; `path` for decoding (it runs in the target's dtype)."""
  c = ml_collections.ConfigDict()
  c.path = ""  # decode: a train.py workdir, one step's checkpoint or an EAGLE-layout dir
  # eagle | fspad | fs_only | pad_only | eagle3 (EAGLE-3's head: own LM head, multi-layer
  # features, no regression loss; decode.method=eagle3) | fspad3 (FSPAD on EAGLE-3's layers)
  c.kind = "fspad"
  # Target layers the draft reads (0 = embeddings, i = output of decoder layer i, -1 = the final
  # feature); several are fused by one fc (k*d -> d), and the draft regresses and feeds back
  # that fused feature. () = the kind's default: (-1,), or EAGLE-3's (2, L//2, L-3) for
  # eagle3 / fspad3.
  c.feature_layers = ()
  c.dtype = "float32"  # compute dtype; master weights are always float32
  c.shape = ml_collections.ConfigDict(
      {"intermediate_size": 0, "num_heads": 0, "num_kv_heads": 0, "head_dim": 0})
  # Hot vocabulary (FR-Spec): draft over the N most frequent assistant tokens of the data,
  # read from the target's LM head restricted to them; 0 = the full vocabulary.
  c.vocab_size = 0
  # Decoding: "int8" quantizes the draft head (and its hot LM head) weight-only, per output
  # channel, at load; "" keeps the compute dtype. Lossless either way (the target verifies).
  c.weight_dtype = ""
  return c


def data_config() -> ml_collections.ConfigDict:
  """Training conversations (ShareGPT JSON/JSONL), prepared once into array_record."""
  c = ml_collections.ConfigDict()
  c.path = ""  # required for train.py: --config.data.path=FILE
  c.max_len = 128
  c.val_fraction = 0.05
  c.prepared_dir = ""  # default: <workdir>/data
  return c


def train_config() -> ml_collections.ConfigDict:
  """Optimization (EAGLE/FSPAD recipe, scaled down), logging and checkpointing."""
  c = ml_collections.ConfigDict()
  c.steps = 200
  c.global_batch = 8
  c.grad_accum = 1
  c.learning_rate = 3e-3
  c.warmup_steps = 20
  c.decay = "linear"  # linear | cosine | constant
  c.b1, c.b2 = 0.9, 0.95
  c.weight_decay = 0.0
  c.clip = "value"  # value | global_norm | none
  c.clip_value = 0.5
  c.w_reg, c.w_cls = 1.0, 0.1
  c.noise = 0.2
  # Training-time test (EAGLE-3): the draft unrolled on its own features for ttt_steps
  # steps (1 = teacher forcing), one loss per step weighted by ttt_weights (() = 0.8^k).
  c.ttt_steps = 1
  c.ttt_weights = ()
  # Hot-vocabulary drafts (draft.vocab_size > 0): the token loss over the full vocabulary
  # ("full") or over the hot ids against the target's renormalized hot distribution ("hot").
  c.token_loss = "full"
  # Multi-layer drafts (more than one draft.feature_layers): the fusion fc starts "random"
  # (EAGLE-3's) or "last" (the identity on the deepest layer: the single-layer draft's input).
  c.fusion_init = "random"
  c.fusion_lr_scale = 1.0  # the fusion fc's learning rate relative to train.learning_rate
  c.seed = 0
  c.depths = 5  # agreement measured at draft depths 1..depths
  c.log_every = 20
  c.eval_every = 100
  c.eval_batch_size = 8
  c.eval_batches = 4  # 0 = the whole validation split
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.tensorboard = True
  c.peak_flops_per_device = 0.0  # 0 = from the device kind (MFU omitted when unknown)
  return c


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.target = target_config()
  config.mesh = mesh_config()
  config.decode = decode_config()
  config.draft = draft_config()
  config.data = data_config()
  config.train = train_config()
  return config
