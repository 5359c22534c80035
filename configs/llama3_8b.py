"""Meta-Llama-3-8B-Instruct target, bf16: decoding, and training its FSPAD draft head.

  python decode.py --config=configs/llama3_8b.py \
    --config.target.path=/path/to/Meta-Llama-3-8B-Instruct \
    --input=mt_bench.jsonl --output=runs/llama3_8b_vanilla.jsonl
  python decode.py --config=configs/llama3_8b.py --config.decode.method=fspad \
    --config.draft.path=/ckpt/fspad-llama3-8b --input=mt_bench.jsonl \
    --output=runs/llama3_8b_fspad.jsonl --compare_vanilla

target.path is a local model directory, or a repo id already in the Hugging Face cache.

Training the FSPAD head (ShareGPT, ~68k dialogues; data.path is required), one preset per
hardware (the mesh; everything else is the same recipe):

  python train.py --config=configs/llama3_8b.py:gpu8 \
    --config.target.path=/ckpt/Meta-Llama-3-8B-Instruct \
    --config.data.path=/data/ShareGPT_V4.3_unfiltered_cleaned_split.json \
    --workdir=/ckpt/fspad-llama3-8b
  python train.py --config=configs/llama3_8b.py:v5e16 ...   # TPU v5e-16, same flags
  python train.py --config=configs/llama3_8b.py:v4-32 ...   # TPU v4-32, same flags

Expected runtime (estimated, not measured: train_lib.flops_per_step gives ~6.9e14 FLOP per
step of 16 x 2048 tokens; at 40% MFU): ~0.22 s/step, ~5 h for 85k steps on 8x H100 80GB;
~0.55 s/step, ~13 h on v5e-16; ~0.4 s/step, ~9 h on v4-32. Check the real MFU in the first
log lines (metrics.jsonl "mfu"). Preemptible hosts: rerun the same command to resume.
"""

import ml_collections


def target_config() -> ml_collections.ConfigDict:
  """The model being decoded."""
  c = ml_collections.ConfigDict()
  c.path = "meta-llama/Meta-Llama-3-8B-Instruct"  # local dir or cached HF repo id
  c.dtype = "bfloat16"  # float32 | bfloat16
  # '' = the tokenizer's own; or a name in hf_checkpoint.CHAT_TEMPLATES / .jinja / Jinja
  c.chat_template = ""
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.shape = (1, 1, -1)  # tensor-parallel over all local devices
  return c


def decode_config() -> ml_collections.ConfigDict:
  """Decoding method and sampling settings (EAGLE/FSPAD evaluation protocol)."""
  c = ml_collections.ConfigDict()
  c.method = "vanilla"  # vanilla | eagle | fspad | eagle3 (all but vanilla need draft.path)
  c.temperature = 0.0  # 0 = greedy; 1.0 for the sampling runs
  c.top_p = 1.0
  c.top_k = 0  # 0 = off
  c.max_new_tokens = 1024
  c.batch_size = 1  # speculative decoding is measured at batch 1; raise for throughput
  c.cache_len = 0  # 0 = derived per batch from prompt length + max_new_tokens
  c.stop_token_ids = ()  # extra stop ids, on top of <|end_of_text|> / <|eot_id|>
  c.seed = 0
  # EAGLE-2 dynamic tree (eagle/fspad): depth D, top-K per level, draft nodes verified.
  c.tree_depth = 6
  c.tree_top_k = 10
  c.total_tokens = 60
  c.tree = ""  # "auto": depth/top-k/nodes (or vanilla) sized from measured costs
  return c


def draft_config() -> ml_collections.ConfigDict:
  """The draft head: `path` for decode.method=eagle|fspad; kind, compute dtype and shape
  overrides (0 = the target's, i.e. one Llama-3-8B layer, d_ff 14336) for training."""
  c = ml_collections.ConfigDict()
  c.path = ""  # a train.py workdir, one step's checkpoint or an EAGLE-layout directory
  # eagle | fspad | fs_only | pad_only | eagle3 (EAGLE-3's head: own LM head, multi-layer
  # features, no regression loss; decode.method=eagle3) | fspad3 (FSPAD on EAGLE-3's layers)
  c.kind = "fspad"
  # Target layers the draft reads (0 = embeddings, i = output of decoder layer i, -1 = the final
  # feature); several are fused by one fc (k*d -> d), and the draft regresses and feeds back
  # that fused feature. () = the kind's default: (-1,), or EAGLE-3's (2, L//2, L-3) for
  # eagle3 / fspad3.
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
  """ShareGPT conversations, rendered with the Llama-3 chat template, prepared once."""
  c = ml_collections.ConfigDict()
  c.path = ""  # required: --config.data.path=ShareGPT_V4.3_unfiltered_cleaned_split.json
  c.max_len = 2048  # EAGLE/FSPAD train at 2048 tokens
  c.val_fraction = 0.02  # ~1.4k held-out dialogues for the per-depth agreement
  c.prepared_dir = ""  # default: <workdir>/data
  return c


def train_config() -> ml_collections.ConfigDict:
  """FSPAD's recipe: AdamW(0.9, 0.95), lr 5e-5 (FSPAD's code), 2000 warmup steps then
  linear decay, gradients clipped by value at 0.5, global batch 16; ~20 epochs of ~68k
  dialogues = 68k * 20 / 16 = 85k steps."""
  c = ml_collections.ConfigDict()
  c.steps = 85_000
  c.global_batch = 16
  c.grad_accum = 1  # raise (e.g. 2) if a device runs out of memory: same update
  c.learning_rate = 5e-5
  c.warmup_steps = 2000
  c.decay = "linear"  # linear | cosine | constant
  c.b1, c.b2 = 0.9, 0.95
  c.weight_decay = 0.0
  c.clip = "value"  # value | global_norm | none
  c.clip_value = 0.5
  c.w_reg, c.w_cls = 1.0, 0.1  # SmoothL1 on features, soft CE on tokens (EAGLE's weights)
  c.noise = 0.2  # EAGLE's uniform feature noise
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
  c.depths = 5  # agreement measured at draft depths 1..5
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batch_size = 16
  c.eval_batches = 50  # 800 held-out dialogues per evaluation
  c.checkpoint_every = 2500  # ~10-25 min of work lost at most on preemption
  c.keep_checkpoints = 3
  c.tensorboard = True
  c.peak_flops_per_device = 0.0  # 0 = from the device kind (H100, TPU v4/v5e, ...)
  return c


# Training meshes (data, fsdp, tensor) per hardware, selected with --config=...py:NAME.
# The frozen bf16 target is 16 GB and the draft ~0.49B params (~6 GB of float32 params +
# Adam state); a row of 2048 tokens needs ~4 GB for its [2048, 128256] float32 logits,
# soft targets and their gradients. FSDP shards all of it and only all-gathers one layer's
# weights at a time, which costs far less than tensor parallelism's per-layer activation
# all-reduces at 32k tokens per step; the batch of 16 rows splits over data x fsdp <= 16.
PRESETS = {
    # One 8-GPU host (H100/A100 80GB): 2 rows per GPU, 2 GB of target weights each.
    "gpu8": (1, 8, 1),
    # TPU v5e-16 (16 chips, 16 GB HBM each): memory is the limit, so shard everything
    # 16 ways: 1 GB of target weights and 1 row per chip.
    "v5e16": (1, 16, 1),
    # TPU v4-32: 16 chips (32 cores; JAX sees one device per chip), 32 GB HBM each: room
    # for 2 rows and a 1/8 target shard, so 2 data replicas x 8-way FSDP keeps each
    # all-gather within 8 chips.
    "v4-32": (2, 8, 1),
}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """`preset` (the text after ':' in --config=configs/llama3_8b.py:gpu8) picks a training
  mesh from PRESETS; without one, the mesh is the decoding default above."""
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
