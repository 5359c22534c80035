#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, no network): the realtext `small` pipeline, then,
# if it finished and time is left, the Llama-3-8B-shape benchmarks. Rerun the same command to
# resume (pipeline units and checkpoints persist while the machine stays warm).
#
#   bash benchmarks/gpu_session.sh [SECONDS]      # SECONDS: this call's budget (default 585)
#   bash benchmarks/gpu_session.sh SECONDS step   # issue 9's step figures only: the op audit
#       compiled by the GPU backend (step_ops: does it fuse int8 dequantization and the
#       per-layer cache slice?), kernels per step (profile_spec), the step against vanilla's
#       loop (spec_bench), vanilla against the bandwidth bound (decode_bench), then an A/B
#       of XLA command buffers with WHILE and CONDITIONAL (spec_bench at batch 1, default
#       flags against XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,
#       WHILE,CONDITIONAL); no pipeline, no carried data needed
#   bash benchmarks/gpu_session.sh SECONDS tree_auto   # issue 12's decode.tree=auto choice
#       at batch 8 and 32 (tree_auto_bench: the start-up timings at Llama-3-8B shapes with
#       random bf16 weights, the chosen tree and its expected speedup against the fixed
#       6/10/60 tree, from a stated agreement profile); no pipeline, no carried data needed
#   bash benchmarks/gpu_session.sh SECONDS batching   # issue 12: continuous batching against
#       static batches on Llama-3-8B shapes (random bf16 weights), batch 8 and 32, skewed
#       output lengths, vanilla tokens/s against the weight-streaming bound, with and without
#       attention-span bucketing (batching_bench); no pipeline, no carried data needed
#   bash benchmarks/gpu_session.sh SECONDS table   # issues 9 and 10: the `small,table`
#       pipeline (configs/realtext.py _table: eagle3, fspad3 with regen + TTT + multi-layer,
#       fspad with each change alone, a 25% hot vocabulary in bf16 and int8) in runs/small,
#       sharing small's data, target and eagle/fspad units; PROJECTED ~25 min of device
#       time (regen 8,000 x 256 plus 6 more drafts and their evals): rerun to resume
#   bash benchmarks/gpu_session.sh SECONDS table_t1   # issue 10's follow-up, `small,table_t1`
#       (_table_t1: regen at T=1, fusion fc started at the identity and 10x slower, a second
#       fspad seed) in runs/small_t1, reusing runs/small's data, tokenizer and target;
#       PROJECTED ~30 min of device time: rerun to resume
#
# Expects, prepared on a machine with package registries (the GPU image lacks them) by
# `bash benchmarks/prepare_gpu_carry.sh` (wheels only: enough for step, tree_auto, batching)
# or `bash benchmarks/prepare_gpu_carry.sh small` (also the small preset's data), no device
# time spent; carry both folders in the `run` call:
#   .whl/    wheels for Python 3.12: ml_collections, tensorflow-datasets (+ dm-tree,
#            immutabledict, promise, simple-parsing, docstring-parser, tensorflow-metadata,
#            googleapis-common-protos, termcolor, toml), grain, array-record, portpicker,
#            tensorboardX, orbax-checkpoint 0.12.8 (the version the suite runs on);
#   .carry/small_dt.tar.xz   runs/small/{data,tokenizer,config.json} from
#            `python -m fspad_jax.pipeline --config=configs/realtext.py:small
#             --workdir=runs/small --stages=data,tokenizer` (needs the `bench` extra there).
# Writes to $OUT: env.txt, small.log, results.{md,json}, tau.png, acceptance_by_depth.png,
# small_meta.tar.gz (every unit's marker and metrics), bench.log.
set -uo pipefail
budget=${1:-585}
mode=${2:-all}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"

if [ ! -d /tmp/site/grain ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'EOF'
import platform, jax, jaxlib, flax, optax, orbax.checkpoint as ocp, transformers, numpy
print("python", platform.python_version(), "| jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "| flax", flax.__version__, "| optax", optax.__version__, "| orbax", ocp.__version__,
      "| transformers", transformers.__version__, "| numpy", numpy.__version__)
print(jax.devices())
EOF
} 2>&1 | tee -a "$OUT/env.txt"

# --- issue 5: the `small` preset (resumable)
if [ "$mode" = all ] || [ "$mode" = table ] || [ "$mode" = table_t1 ]; then
preset=small; [ "$mode" = table ] && preset=small,table
[ -f runs/small/tokenizer/.done ] || tar -xJf .carry/small_dt.tar.xz || exit 1
workdir=runs/small
if [ "$mode" = table_t1 ]; then
  preset=small,table_t1 workdir=runs/small_t1
  [ -f runs/small/target/.done ] || { echo "table_t1 needs runs/small's target"; exit 1; }
  mkdir -p $workdir && for d in data tokenizer target; do
    [ -e $workdir/$d ] || cp -r runs/small/$d $workdir/; done
fi
minutes=$(python3 -c "print(round(($(left) - 25) / 60, 2))")
(
  # Identical computations (vanilla engines of every draft kind) compile once.
  export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
  python3 -m fspad_jax.pipeline --config=configs/realtext.py:$preset --workdir=$workdir \
    --max_minutes="$minutes" --no_progress
) 2>&1 | grep -v "Shuffling\|Generating \|^\s*$" | tee -a "$OUT/small.log"
rc=${PIPESTATUS[0]}
cp $workdir/results.md $workdir/results.json $workdir/*.png "$OUT/" 2>/dev/null
(cd $workdir && find . -path ./data -prune -o -name checkpoints -prune -o -type f \
  \( -name '.done' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' \) -print0 \
  | tar -czf "$OUT/small_meta.tar.gz" --null -T -)
echo "pipeline exit $rc, $(left) s left"
[ "$rc" = 0 ] || exit "$rc"
[ "$mode" = table ] || [ "$mode" = table_t1 ] && exit 0
fi

# --- issues 2 and 4: Llama-3-8B shapes, random bf16 weights
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
benches=("decode_bench.py --shape=llama3_8b --batch 1 8"
         "spec_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 1 8"
         "train_bench.py --shape=llama3_8b"
         "profile_spec.py --shape=llama3_8b --dtype=bfloat16 --batch 1"
         "tree_auto_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 8 32")
[ "$mode" = step ] && benches=("step_ops.py --draft_vocab 32768 --draft_weight int8"
                               "profile_spec.py --shape=llama3_8b --dtype=bfloat16 --batch 1"
                               "spec_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 1 8 --draft_vocab 32768"
                               "spec_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 1 --draft_vocab 32768 --draft_weight int8"
                               "decode_bench.py --shape=llama3_8b --batch 1 8"
                               # issue 9 item 3: CUDA command buffers (graphs) that take in
                               # the while loop, A/B at batch 1 (same command, default flags
                               # first; a leading VAR=value is set for that run only)
                               "spec_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 1 --draft_vocab 32768"
                               "XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL,WHILE,CONDITIONAL spec_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 1 --draft_vocab 32768")
[ "$mode" = tree_auto ] && benches=("tree_auto_bench.py --shape=llama3_8b --dtype=bfloat16 --batch 8 32")
[ "$mode" = batching ] && benches=("batching_bench.py --shape=llama3_8b --batch 8 32 --prompts 64 --max_new 128 --cache_len 2048 --repeats 2")
for bench in "${benches[@]}"; do
  done_file="runs/bench_done.$(printf %s "$bench" | tr -c "A-Za-z0-9" _)"
  [ -f "$done_file" ] && continue  # finished in an earlier call
  t=$(($(left) - 5))
  [ "$t" -gt 30 ] || { echo "no time left for $bench"; break; }
  envs=() rest=$bench  # leading VAR=value words: this run's environment
  while [[ $rest =~ ^([A-Z_]+=[^ ]*)\ (.*)$ ]]; do
    envs+=("${BASH_REMATCH[1]}") rest=${BASH_REMATCH[2]}
  done
  echo "### ${envs[*]+${envs[*]} }python benchmarks/$rest  (timeout ${t}s)" | tee -a "$OUT/bench.log"
  # shellcheck disable=SC2086
  timeout "$t" env ${envs[@]+"${envs[@]}"} python3 benchmarks/$rest 2>&1 | grep -v "^\s*$" \
    | tee -a "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] && touch "$done_file"
done
