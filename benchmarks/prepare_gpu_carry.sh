#!/usr/bin/env bash
# Prepares, on a machine with the package registries, what benchmarks/gpu_session.sh expects
# on the lent GPU machine (which has none), so that no device time goes into preparation:
#
#   bash benchmarks/prepare_gpu_carry.sh          # .whl/ only (enough for the step,
#                                                 #   tree_auto and batching modes)
#   bash benchmarks/prepare_gpu_carry.sh small    # also .carry/small_dt.tar.xz (the small
#                                                 #   preset's data and tokenizer; ~2 min of
#                                                 #   CPU) for the all, table and table_t1 modes
#
# .whl/: wheels for the GPU image's Python 3.12 (x86-64) of the packages it lacks
# (/work/.library/device/KINDS.md lists what it has), at the versions .ci/constraints.txt pins
# where it pins them, else the versions installed here. Every other dependency of these
# (absl-py, etils, protobuf, psutil, pyarrow, tensorstore, ...) is in the image.
# Then, on the device: `run` with carry [".whl"] (and ".carry" for the pipeline modes), e.g.
#   bash benchmarks/gpu_session.sh 585 step
# Both folders are git-ignored; both together must stay under the 64 MiB a call carries.
# Measured 2026-12-03 on the 2-core CPU dev machine: `small` took 2 min 12 s, 31 MiB in all
# (16 wheels, 12 MiB; small_dt.tar.xz, 19 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The GPU image lacks these (and has the rest of their dependencies).
packages=(ml_collections tensorflow-datasets dm-tree immutabledict promise simple-parsing
          docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml
          grain array-record portpicker tensorboardX orbax-checkpoint)

version_of() {  # the pinned version, else the installed one
  local name=$1 norm pinned
  norm=$(echo "$name" | tr '[:upper:]_.' '[:lower:]--')
  pinned=$(sed -n "s/^\([A-Za-z0-9_.-]*\)==\(.*\)$/\1 \2/p" .ci/constraints.txt \
           | while read -r n v; do
               [ "$(echo "$n" | tr '[:upper:]_.' '[:lower:]--')" = "$norm" ] && echo "$v"
             done | head -n 1)
  if [ -n "$pinned" ]; then echo "$pinned"; return; fi
  python3 -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p'
}

mkdir -p .whl
specs=()
for name in "${packages[@]}"; do
  v=$(version_of "$name")
  [ -n "$v" ] || { echo "prepare_gpu_carry: no version for $name (not pinned in" \
                        ".ci/constraints.txt, not installed here)" >&2; exit 1; }
  specs+=("$name==$v")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
for spec in "${specs[@]}"; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .whl "$spec" 2>/dev/null; then
    # No wheel on the index (promise ships an sdist only): build it here; it must come out
    # pure Python (py3-none-any), or it would not run there.
    python3 -m pip wheel -q --no-deps -w .whl "$spec"
    name=$(echo "${spec%%==*}" | tr '-' '_')
    ls .whl/ | grep -i "^${name}-.*-py3-none-any.whl$" > /dev/null || {
      echo "prepare_gpu_carry: $spec has no wheel for Python 3.12 x86-64 and does not" \
           "build as pure Python" >&2; exit 1; }
  fi
done
# One version of each package: two would stop the install on the device.
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr '[:upper:]' '[:lower:]' \
        | sort | uniq -d)
[ -z "$dupes" ] || { echo "prepare_gpu_carry: .whl/ holds two versions of: $dupes" \
                          "(remove the stale wheel)" >&2; exit 1; }
echo "prepare_gpu_carry: .whl/ $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1)"

if [ "${1:-}" = small ]; then
  python3 -m fspad_jax.pipeline --config=configs/realtext.py:small --workdir=runs/small \
    --stages=data,tokenizer
  mkdir -p .carry
  tar -cJf .carry/small_dt.tar.xz runs/small/data runs/small/tokenizer runs/small/config.json
  echo "prepare_gpu_carry: .carry/small_dt.tar.xz $(du -sh .carry/small_dt.tar.xz | cut -f1)"
fi
total=$(du -sm .whl $( [ -d .carry ] && echo .carry) | awk '{s += $1} END {print s}')
echo "prepare_gpu_carry: ${total} MiB to carry (limit 64 MiB a call, with the working tree)"
