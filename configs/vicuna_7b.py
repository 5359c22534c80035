"""Vicuna-7B v1.5 target (Llama-2 architecture: MHA, 32 KV heads, d_ff 11008, vocab 32000),
bf16: training its FSPAD draft head (the EAGLE/FSPAD papers' main setting), and decoding.

  python train.py --config=configs/vicuna_7b.py:gpu8 \
    --config.target.path=/ckpt/vicuna-7b-v1.5 \
    --config.data.path=/data/ShareGPT_V4.3_unfiltered_cleaned_split.json \
    --workdir=/ckpt/fspad-vicuna-7b
  python train.py --config=configs/vicuna_7b.py:v5e16 ...   # TPU v5e-16, same flags
  python train.py --config=configs/vicuna_7b.py:v4-32 ...   # TPU v4-32, same flags
  python decode.py --config=configs/vicuna_7b.py --config.target.path=/ckpt/vicuna-7b-v1.5 \
    --config.decode.method=fspad --config.draft.path=/ckpt/fspad-vicuna-7b \
    --input=mt_bench.jsonl --output=runs/vicuna_7b_fspad.jsonl --compare_vanilla

Expected runtime (estimated, not measured: train_lib.flops_per_step gives ~5.7e14 FLOP per
step of 16 x 2048 tokens; at 40% MFU): ~0.18 s/step, ~4.5 h for 85k steps on 8x H100 80GB;
~0.45 s/step, ~11 h on v5e-16; ~0.33 s/step, ~8 h on v4-32.

The data is rendered with a chat template. lmsys/vicuna-7b-v1.5 ships none, so
target.chat_template selects FastChat's Vicuna v1.1 format built into fspad_jax
("<system> USER: {user} ASSISTANT: {reply}</s>"); decoding uses the same template.
"""

import ml_collections


def target_config() -> ml_collections.ConfigDict:
  """The frozen target (a Hugging Face model directory, or a cached repo id for decoding)."""
  c = ml_collections.ConfigDict()
  c.path = "lmsys/vicuna-7b-v1.5"  # a local directory, or a repo id in the local HF cache
  c.dtype = "bfloat16"  # float32 | bfloat16
  # Vicuna v1.5 ships no chat template: FastChat's vicuna_v1.1 conversation format
  c.chat_template = "vicuna_v1.1"
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.shape = (1, 1, -1)  # decoding: tensor-parallel over all local devices
  return c


def decode_config() -> ml_collections.ConfigDict:
  """Decoding method and sampling settings (EAGLE/FSPAD evaluation protocol)."""
  c = ml_collections.ConfigDict()
  c.method = "vanilla"  # vanilla | eagle | fspad | eagle3 (all but vanilla need draft.path)
  c.temperature = 0.0  # 0 = greedy; 1.0 for the sampling runs
  c.top_p = 1.0
  c.top_k = 0  # 0 = off
  c.max_new_tokens = 1024
  c.batch_size = 1  # speculative decoding is measured at batch 1
  c.cache_len = 0  # 0 = derived per batch from prompt length + max_new_tokens
  c.stop_token_ids = ()  # extra stop ids, on top of </s>
  c.seed = 0
  # EAGLE-2 dynamic tree (eagle/fspad): depth D, top-K per level, draft nodes verified.
  c.tree_depth = 6
  c.tree_top_k = 10
  c.total_tokens = 60
  c.tree = ""  # "auto": depth/top-k/nodes (or vanilla) sized from measured costs
  return c


def draft_config() -> ml_collections.ConfigDict:
  """The draft head: `path` for decoding; kind, compute dtype and shape overrides (0 = the
  target's: one Vicuna layer, 32 heads, d_ff 11008) for training."""
  c = ml_collections.ConfigDict()
  c.path = ""  # decode: a train.py workdir, one step's checkpoint or an EAGLE-layout dir
  c.kind = "fspad"  # eagle | fspad | fs_only | pad_only | eagle3 | fspad3 (configs/tiny.py)
  # Target layers the draft reads; () = the kind's default (configs/tiny.py explains).
  c.feature_layers = ()
  c.dtype = "bfloat16"  # compute dtype; master weights and Adam state stay float32
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
  """ShareGPT conversations (~68k dialogues), prepared once into array_record."""
  c = ml_collections.ConfigDict()
  c.path = ""  # required: --config.data.path=ShareGPT_V4.3_unfiltered_cleaned_split.json
  c.max_len = 2048
  c.val_fraction = 0.02
  c.prepared_dir = ""  # default: <workdir>/data
  return c


def train_config() -> ml_collections.ConfigDict:
  """FSPAD's recipe: AdamW(0.9, 0.95), lr 5e-5, 2000 warmup steps then linear decay,
  gradients clipped by value at 0.5, global batch 16, ~20 epochs = 85k steps."""
  c = ml_collections.ConfigDict()
  c.steps = 85_000
  c.global_batch = 16
  c.grad_accum = 1
  c.learning_rate = 5e-5
  c.warmup_steps = 2000
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
  # Multi-layer drafts: the fusion fc starts "random" (EAGLE-3) or "last" (identity on the
  # deepest layer); fusion_lr_scale scales its learning rate (0.1 served FSPAD best on mini).
  c.fusion_init = "random"
  c.fusion_lr_scale = 1.0
  c.seed = 0
  c.depths = 5
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batch_size = 16
  c.eval_batches = 50
  c.checkpoint_every = 2500
  c.keep_checkpoints = 3
  c.tensorboard = True
  c.peak_flops_per_device = 0.0  # 0 = from the device kind
  return c


# Training meshes (data, fsdp, tensor), as for configs/llama3_8b.py: the 13.5 GB bf16 target
# and the ~0.42B-param draft (+ float32 Adam state) are sharded by FSDP; tensor parallelism
# is not needed at this size, and the 16-row batch caps data x fsdp at 16.
PRESETS = {
    "gpu8": (1, 8, 1),  # one 8-GPU host: 2 rows and ~1.7 GB of target weights per GPU
    "v5e16": (1, 16, 1),  # 16 GB HBM per chip: shard everything 16 ways, 1 row per chip
    "v4-32": (2, 8, 1),  # 16 chips (32 cores) with 32 GB each: 2 replicas x 8-way FSDP
}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """`preset` (after ':' in --config=configs/vicuna_7b.py:gpu8) picks a training mesh."""
  config = ml_collections.ConfigDict()
  config.target = target_config()
  config.mesh = mesh_config()
  config.decode = decode_config()
  config.draft = draft_config()
  config.data = data_config()
  config.train = train_config()
  if preset is not None:
    if preset not in PRESETS:
      raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    config.mesh.shape = PRESETS[preset]
  return config
