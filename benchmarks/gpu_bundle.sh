#!/usr/bin/env bash
# Assembles the folder that travels with benchmarks/gpu_check.py to a GPU machine without
# network whose image has Python 3.12, jax + the CUDA plugin, flax, optax, orbax-checkpoint,
# sacrebleu, sentencepiece, absl-py and matplotlib (docs/accelerators.md):
#   wheels/     the packages that image lacks (grain, tensorflow-datasets, array_record,
#               tensorboardX, sacremoses and their missing dependencies), at constraints.txt's
#               versions, for CPython 3.12 on manylinux x86_64
#   data/multi30k/  the Multi30k files of ../shared/data
#   spm.model   the main job's shared BPE vocabulary, trained here (the CPU trace's)
#
#   bash benchmarks/gpu_bundle.sh [DIR]     # default .bundle (git-ignored); prints its size
#
# Interpreter for the vocabulary: $PYTHON (default .venv/bin/python); data: $DATA (default
# ../shared/data/multi30k). DIR is built beside itself and moved into place at the end; an
# existing DIR is replaced only if an earlier run of this script made it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DIR="${1:-.bundle}"
PYTHON="${PYTHON:-.venv/bin/python}"
DATA="${DATA:-../shared/data/multi30k}"
LIMIT_MIB=60
MARKER=.gpu_bundle
# Missing from the image (pure Python except array_record, dm-tree); promise has no wheel.
WHEELS=(array_record dm-tree docstring_parser googleapis-common-protos grain immutabledict
        importlib_resources portpicker sacremoses simple-parsing tensorboardX
        tensorflow-datasets tensorflow-metadata termcolor toml tzdata)
SDISTS=(promise)

die() { echo "error: $*" >&2; exit 2; }
[[ $# -le 1 ]] || die "usage: $0 [DIR]"
[[ -x "$PYTHON" ]] || die "no interpreter at $PYTHON: create the venv or set PYTHON"
[[ -f "$DATA/train.en" ]] || die "no Multi30k at $DATA: set DATA"
if [[ -e "$DIR" && ! -e "$DIR/$MARKER" ]]; then
  die "$DIR exists and was not made by this script: name another folder"
fi
pin() {  # the exact version constraints.txt pins for $1 (names compared case-insensitively)
  local v
  v="$(grep -i "^$1==" constraints.txt | head -1 | cut -d= -f3)"
  [[ -n "$v" ]] || die "$1 is not pinned in constraints.txt"
  echo "$v"
}

TMP="$(mktemp -d "${DIR%/}.tmp.XXXXXX")"
WORK="$(mktemp -d)"
trap 'rm -rf "$TMP" "$WORK"' EXIT

specs=()
for name in "${WHEELS[@]}"; do specs+=("$name==$(pin "$name")"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$TMP/wheels" "${specs[@]}"
for name in "${SDISTS[@]}"; do  # pure Python: a py3-none-any wheel built here
  "$PYTHON" -m pip wheel -q --no-deps -w "$TMP/wheels" "$name==$(pin "$name")"
done

mkdir -p "$TMP/data/multi30k"
cp "$DATA"/* "$TMP/data/multi30k/"
"$PYTHON" -m transformer.main --flagfile=experiments/cpu/multi30k_en_de.flags --mode=prepare \
  --raw_data_dir="$DATA" --workdir="$WORK" --vocab_path="$TMP/spm.model" \
  --tfds_data_dir="$WORK/tfds" >"$WORK/prepare.log" 2>&1 \
  || { tail -5 "$WORK/prepare.log" >&2; die "preparing the vocabulary failed"; }

touch "$TMP/$MARKER"
bytes="$(du -sb "$TMP" | cut -f1)"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
if (( bytes > LIMIT_MIB * 1048576 )); then
  die "the bundle would be $mib MiB, over $LIMIT_MIB MiB"
fi
rm -rf "$DIR"
mv "$TMP" "$DIR"
echo "$DIR: $mib MiB ($(ls "$DIR/wheels" | wc -l) wheels, Multi30k, spm.model sha256"\
     "$(sha256sum "$DIR/spm.model" | cut -c1-12))"
