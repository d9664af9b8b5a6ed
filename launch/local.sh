#!/usr/bin/env bash
# One run on this machine: train, average the last --num_average checkpoints, then evaluate the
# averaged checkpoint on --test_split, printing the wall time of each phase.
#
#   launch/local.sh WORKDIR FLAGFILE [extra flags...]
#   launch/local.sh workdirs/m30k experiments/cpu/multi30k_en_de.flags --num_train_steps=1500
#
# Runs from the repository root (nested --flagfile paths in the flag files are relative to it);
# WORKDIR and FLAGFILE may be given relative to the current directory or to the repository root.
# Interpreter: $PYTHON (default .venv/bin/python of the repository). DRY_RUN=1 prints the three
# commands without running them. Training resumes from WORKDIR's latest checkpoint, so running
# the same command again continues an interrupted run; a train stopped by SIGTERM (exit 143)
# ends the script there, before average and evaluate.
set -euo pipefail

usage() { echo "usage: $0 WORKDIR FLAGFILE [extra flags...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
[[ "$1" != -* && "$2" != -* ]] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
abspath() {  # absolute path of $1, relative to the current directory, else to the repo root
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) if [[ -e "$1" || ! -e "$REPO/$1" ]]; then printf '%s\n' "$PWD/$1"; else printf '%s\n' "$REPO/$1"; fi ;;
  esac
}
WORKDIR="$(abspath "$1")"
FLAGFILE="$(abspath "$2")"
shift 2
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ "$PYTHON" == */* ]]; then
  if [[ "$PYTHON" != /* && -x "$PWD/$PYTHON" ]]; then PYTHON="$PWD/$PYTHON"; fi
fi
[[ -f "$FLAGFILE" ]] || { echo "error: flag file $FLAGFILE does not exist" >&2; exit 2; }
cd "$REPO"
if [[ -z "${DRY_RUN:-}" && "$PYTHON" == */* && ! -x "$PYTHON" ]]; then
  echo "error: no interpreter at $PYTHON: create the venv (python3.12 -m venv .venv &&" \
       ".venv/bin/pip install -c constraints.txt -e .) or set PYTHON" >&2
  exit 2
fi
# A single-process run: inside a SLURM allocation, hide the job id so that
# transformer.sharding.maybe_initialize_distributed does not start jax.distributed.
unset SLURM_JOB_ID

fmt() { printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60)); }
TIMES=()
phase() {  # phase MODE [flags...]
  local mode="$1"; shift
  local cmd=("$PYTHON" -m transformer.main "--flagfile=$FLAGFILE" "$@" "--workdir=$WORKDIR" "--mode=$mode")
  echo "[local.sh] $(date '+%F %T') $mode: $(printf '%q ' "${cmd[@]}")"
  [[ -n "${DRY_RUN:-}" ]] && return 0
  local t0=$SECONDS status=0
  "${cmd[@]}" || status=$?
  if [[ $status == 143 ]]; then  # 128 + SIGTERM: a train that saved a checkpoint and stopped
    echo "[local.sh] $mode stopped by SIGTERM, not finished (checkpoint saved): the same" \
         "command resumes it" >&2
  fi
  [[ $status == 0 ]] || exit "$status"
  local took=$((SECONDS - t0))
  TIMES+=("$mode $(fmt $took)")
  echo "[local.sh] $mode took $(fmt $took)"
}

START=$SECONDS
phase train "$@"
phase average "$@"
phase evaluate "$@" --checkpoint=averaged
if [[ -z "${DRY_RUN:-}" ]]; then
  printf -v summary '%s, ' "${TIMES[@]}"
  echo "[local.sh] done in $(fmt $((SECONDS - START))) (${summary%, }) -> $WORKDIR"
  echo "[local.sh] metrics: $WORKDIR/metrics.jsonl"
fi
