"""Meta-Llama-3-70B-Instruct target, bf16: training its FSPAD draft head, and decoding.

  python train.py --config=configs/llama3_70b.py:gpu8 \
    --config.target.path=/ckpt/Meta-Llama-3-70B-Instruct \
    --config.data.path=/data/ShareGPT_V4.3_unfiltered_cleaned_split.json \
    --workdir=/ckpt/fspad-llama3-70b
  python train.py --config=configs/llama3_70b.py:gpu16 ...  # two 8-GPU hosts: add
    #   --coordinator=HOST0:1234 --num_processes=2 --process_id=I on each host
  python train.py --config=configs/llama3_70b.py:v5e32 ...  # TPU v5e-32, every host

Expected runtime (estimated, not measured: train_lib.flops_per_step gives ~5.3e15 FLOP per
step of 16 x 2048 tokens, 90% of it the frozen target's forward; at 40% MFU): ~1.7 s/step,
~40 h for 85k steps on 8x H100 80GB; ~0.85 s/step, ~20 h on 16x H100; ~2.1 s/step, ~50 h
on v5e-32. The same recipe as configs/llama3_8b.py otherwise.

Why tensor parallelism here. The bf16 target is 141 GB; the draft (one 70B-shaped layer
plus FSPAD's FS block, ~1.9B params) carries 23 GB of float32 params + Adam state. Per
device, FSDP alone would hold 1/N of both plus, transiently, a whole all-gathered layer
(1.7 GB bf16) and 4 GB of float32 logits per 2048-token row; the 16-row batch caps
data x fsdp at 16 ways. On a v5e-16 (16 GB HBM/chip) that is ~8.8 + 1.5 + 1.7 + 4 GB: no
room. Splitting heads / d_ff / vocab over a `tensor` axis divides the weights, the
transient layer and the logits too, and lets the slice grow past 16 chips. 64 query heads,
8 KV heads, d_ff 28672 and vocab 128256 all divide by 8, so tensor <= 8 never replicates.
"""

import ml_collections


def target_config() -> ml_collections.ConfigDict:
  """The frozen target (a Hugging Face model directory, or a cached repo id for decoding)."""
  c = ml_collections.ConfigDict()
  c.path = "meta-llama/Meta-Llama-3-70B-Instruct"  # local dir or cached HF repo id
  c.dtype = "bfloat16"  # float32 | bfloat16
  # '' = the tokenizer's own; or a name in hf_checkpoint.CHAT_TEMPLATES / .jinja / Jinja
  c.chat_template = ""
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor); -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.shape = (1, 1, -1)  # decoding: tensor-parallel over all local devices (8 GPUs)
  return c


def decode_config() -> ml_collections.ConfigDict:
  """Decoding method and sampling settings (EAGLE/FSPAD evaluation protocol)."""
  c = ml_collections.ConfigDict()
  c.method = "vanilla"  # vanilla | eagle | fspad | eagle3 (all but vanilla need draft.path)
  c.temperature = 0.0  # 0 = greedy; 1.0 for the sampling runs
  c.top_p = 1.0
  c.top_k = 0  # 0 = off
  c.max_new_tokens = 1024
  c.batch_size = 1
  c.cache_len = 0  # 0 = derived per batch from prompt length + max_new_tokens
  c.stop_token_ids = ()  # extra stop ids, on top of <|end_of_text|> / <|eot_id|>
  c.seed = 0
  c.tree_depth = 6  # EAGLE-2 dynamic tree (eagle/fspad)
  c.tree_top_k = 10
  c.total_tokens = 60
  c.tree = ""  # "auto": depth/top-k/nodes (or vanilla) sized from measured costs
  return c


def draft_config() -> ml_collections.ConfigDict:
  """The draft head: `path` for decoding; kind, compute dtype and shape overrides (0 = the
  target's: one 70B layer, 64 heads / 8 KV heads, d_ff 28672) for training."""
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
  """FSPAD's recipe (see configs/llama3_8b.py): global batch 16, 85k steps."""
  c = ml_collections.ConfigDict()
  c.steps = 85_000
  c.global_batch = 16
  c.grad_accum = 1  # 2 halves the activation/logit memory for the same update
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
  c.log_every = 50
  c.eval_every = 2500
  c.eval_batch_size = 16
  c.eval_batches = 25
  c.checkpoint_every = 1000  # ~30 min of work at most lost on preemption
  c.keep_checkpoints = 3
  c.tensorboard = True
  c.peak_flops_per_device = 0.0  # 0 = from the device kind
  return c


# Training meshes (data, fsdp, tensor); see the module docstring for the memory argument.
PRESETS = {
    # One 8-GPU host (80 GB each): tensor 8 over NVLink, one KV head per GPU; 17.6 GB of
    # target weights per GPU, all 16 rows on every GPU with logits split 8 ways.
    "gpu8": (1, 1, 8),
    # Two 8-GPU hosts: tensor 8 inside a host (NVLink), FSDP 2 across hosts (only weight
    # all-gathers cross the slower network, never per-layer activation all-reduces).
    "gpu16": (1, 2, 8),
    # TPU v5e-32 (32 chips, 16 GB each): tensor 4 x FSDP 8 leaves ~4.4 GB of target weights,
    # ~0.7 GB of draft state and 2 rows' logits (split 4 ways) per chip.
    "v5e32": (1, 8, 4),
}


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """`preset` (after ':' in --config=configs/llama3_70b.py:gpu8) picks a training mesh."""
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
