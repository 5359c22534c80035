"""The embedded-default demo: train EAGLE and FSPAD drafts on a tiny target, then decode.

  python -m fspad_jax.demo                      # ~3 minutes on 2 CPU cores
  python -m fspad_jax.demo --workdir=runs/demo --steps=300 --prompts=32

Stages (each reused when its output exists, so a rerun picks up where it stopped):
  1. a tiny random-weight Llama-3-style checkpoint with a chat-template tokenizer, and
     synthetic ShareGPT-format conversations (fspad_jax.tiny_checkpoint);
  2. an EAGLE and an FSPAD draft trained on it with the training pipeline (train.py's
     library: online target features, Orbax checkpoints, resume);
  3. greedy decoding of held-out prompts with vanilla, EAGLE and FSPAD decoding: checks that
     the speculative outputs equal vanilla's token for token, and prints tau (tokens per
     target forward) and the wall-clock speedup.
The target has random weights, so the text is gibberish and the speedups are not the
paper's; the point is the whole path, real files and all, on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from fspad_jax.config import load_repo_config


def prepare_inputs(workdir: str, num_conversations: int) -> tuple[str, str]:
  from fspad_jax.tiny_checkpoint import make_tiny_checkpoint, make_tiny_conversations
  model_dir = os.path.join(workdir, "target")
  data = os.path.join(workdir, "conversations.jsonl")
  if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
    print(f"[1/3] building a tiny target checkpoint in {model_dir}")
    make_tiny_checkpoint(model_dir)
  if not os.path.isfile(data):
    make_tiny_conversations(data + ".tmp", num_conversations)
    os.replace(data + ".tmp", data)
  return model_dir, data


def train_drafts(workdir: str, model_dir: str, data: str, steps: int) -> dict[str, str]:
  from fspad_jax import trainer
  out = {}
  for kind in ("eagle", "fspad"):
    config = load_repo_config("tiny")
    config.target.path = model_dir
    config.data.path = data
    config.data.max_len = 64
    config.data.prepared_dir = os.path.join(workdir, "data")
    config.draft.kind = kind
    config.train.steps = steps
    config.train.log_every = max(steps // 5, 1)
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    out[kind] = os.path.join(workdir, f"draft_{kind}")
    print(f"[2/3] training the {kind} draft ({steps} steps) in {out[kind]}")
    trainer.train(config, out[kind])
  return out


def evaluate(model_dir: str, data: str, drafts: dict[str, str], num_prompts: int,
             max_new_tokens: int) -> list[dict]:
  from fspad_jax.draft_source import load_draft_for_decode
  from fspad_jax.generate import GenerateOptions
  from fspad_jax.hf_checkpoint import load_tokenizer
  from fspad_jax.speculative import SpecOptions, SpeculativeGenerator, cache_len_for
  from fspad_jax.target import Target

  target = Target.from_pretrained(model_dir, mesh_shape=(1, 1, -1))
  tokenizer = load_tokenizer(model_dir)
  conversations = [json.loads(line) for line in open(data)][-num_prompts:]
  prompts = []
  for c in conversations:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": c["conversations"][0]["value"]}],
        add_generation_prompt=True, tokenize=False)
    prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
  width = max(map(len, prompts))
  batch = np.zeros((len(prompts), width), np.int32)  # [prompts, width], right-padded
  for i, p in enumerate(prompts):
    batch[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  stops = tuple(sorted(set(target.cfg.eos_token_ids) | {tokenizer.eos_token_id}))
  spec_options = SpecOptions(max_new_tokens=max_new_tokens, stop_token_ids=stops, depth=5,
                             top_k=4, total_tokens=16)
  spec_options = dataclasses.replace(spec_options,
                                    cache_len=cache_len_for(width, spec_options))

  def timed(fn):
    fn()  # compile
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0

  vanilla_gen = target.vanilla_generator()
  vanilla, t_vanilla = timed(lambda: vanilla_gen(batch, lengths, GenerateOptions(
      max_new_tokens=max_new_tokens, stop_token_ids=stops,
      cache_len=spec_options.cache_len)))
  rows = [{"method": "vanilla", "tau": 1.0, "speedup": 1.0, "greedy_equal": True,
           "tokens": int(vanilla.num_tokens.sum()), "seconds": t_vanilla}]
  for kind, path in drafts.items():
    _, dg, dp = load_draft_for_decode(path, target.cfg, kind, target.mesh)
    gen = SpeculativeGenerator(target.graphdef, target.params, dg, dp, target.mesh)
    out, seconds = timed(lambda: gen(batch, lengths, spec_options))
    equal = all(out.tokens[r, :out.num_tokens[r]].tolist()
                == vanilla.tokens[r, :vanilla.num_tokens[r]].tolist() for r in range(len(batch)))
    history = out.accept_history[out.accept_history >= 0]
    rows.append({"method": kind, "tau": float(np.mean(history + 1)),
                 "speedup": t_vanilla / seconds, "greedy_equal": bool(equal),
                 "tokens": int(out.num_tokens.sum()), "seconds": seconds,
                 "acceptance_by_depth": [float(np.mean(history >= d))
                                         for d in range(1, spec_options.depth + 1)]})
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/demo")
  ap.add_argument("--steps", type=int, default=300, help="draft training steps")
  ap.add_argument("--conversations", type=int, default=600)
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--max_new_tokens", type=int, default=48)
  args = ap.parse_args()
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # tfds/orbax chatter
  os.makedirs(args.workdir, exist_ok=True)
  model_dir, data = prepare_inputs(args.workdir, args.conversations)
  drafts = train_drafts(args.workdir, model_dir, data, args.steps)
  print(f"[3/3] greedy decoding of {args.prompts} held-out prompts")
  rows = evaluate(model_dir, data, drafts, args.prompts, args.max_new_tokens)
  print(f"\n{'method':8} {'tau':>6} {'speedup':>8} {'greedy==vanilla':>16} {'tokens':>7}")
  for r in rows:
    print(f"{r['method']:8} {r['tau']:6.2f} {r['speedup']:7.2f}x {str(r['greedy_equal']):>16} "
          f"{r['tokens']:7d}")
  with open(os.path.join(args.workdir, "demo_results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  if not all(r["greedy_equal"] for r in rows):
    raise SystemExit("speculative output differs from vanilla: this is a bug, please report")


if __name__ == "__main__":
  main()
