#!/usr/bin/env bash
# Cloud TPU VM pod launcher: create (or reuse) a TPU VM slice, put this repository on every
# worker, install the pinned venv there, and run the same `python -m transformer.main ...` on
# all workers at once (one JAX process per host; jax.distributed connects them).
#
#   launch/tpu_pod.sh [options] -- [transformer.main flags...]
#
#   launch/tpu_pod.sh --name=tf-base --zone=us-central2-b --accelerator-type=v4-32 -- \
#       --flagfile=experiments/paper/base_en_de.flags --workdir=/mnt/shared/base_en_de \
#       --tfds_data_dir=/mnt/shared/tfds --mode=train
#
# Options (each also an environment variable):
#   --name=NAME                 TPU_NAME          TPU VM name (required)
#   --zone=ZONE                 ZONE              e.g. us-central2-b (required)
#   --accelerator-type=TYPE     ACCELERATOR_TYPE  e.g. v4-32, v5p-16, v5litepod-16 (default v4-32)
#   --version=RUNTIME           RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   --project=PROJECT           PROJECT           gcloud project (default: gcloud's configured one)
#   --spot                      SPOT=1            create a Spot TPU VM
#   --repo-url=URL              REPO_URL          git clone URL on the workers; default: copy this
#                                                 working tree (tracked + untracked, not ignored)
#   --ref=REF                   REPO_REF          branch/commit to check out with --repo-url
#   --remote-dir=DIR            REMOTE_DIR        repository location on the workers (~/transformer)
#   --port=PORT                 COORDINATOR_PORT  jax.distributed coordinator port (8476)
#   --skip-setup                SKIP_SETUP=1      no create/copy/venv: just run the command
#   --log=FILE                  LOG               run detached (nohup) on every worker, output to
#                                                 FILE there (relative to the repo); else attached
#   --setup-only                                  create/copy/venv, then stop
#   --delete                                      delete the TPU VM (nothing else)
#   --dry-run                   DRY_RUN=1         print every command instead of running it
#
# What runs on each worker:  cd REMOTE_DIR && JAX_COORDINATOR_ADDRESS=<worker 0 ip>:PORT
#   .venv/bin/python -m transformer.main <your flags>
# Setting JAX_COORDINATOR_ADDRESS makes transformer.sharding.maybe_initialize_distributed call
# jax.distributed.initialize(); JAX then takes the process count and this host's process id from
# the TPU VM metadata (agent-worker-number, worker-network-endpoints). Without it, the current
# check in maybe_initialize_distributed (SLURM_JOB_ID / TPU_WORKER_HOSTNAMES /
# JAX_COORDINATOR_ADDRESS) does not fire on a GCE TPU VM, whose shell has none of these.
#
# --workdir must be the same shared directory on every worker (Filestore/NFS or a gcsfuse mount):
# Orbax writes each host's shards of a checkpoint into it, and restore reads them all back.
# Prepare the TFDS data once (e.g. --tfds_data_dir on the shared mount) before a pod run.
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
REMOTE_DIR="${REMOTE_DIR:-~/transformer}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8476}"
SKIP_SETUP="${SKIP_SETUP:-}"
LOG="${LOG:-}"
DRY_RUN="${DRY_RUN:-}"
SETUP_ONLY=""
DELETE=""
ARGS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --repo-url=*) REPO_URL="${1#*=}" ;;
    --ref=*) REPO_REF="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --port=*) COORDINATOR_PORT="${1#*=}" ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --log=*) LOG="${1#*=}" ;;
    --setup-only) SETUP_ONLY=1 ;;
    --delete) DELETE=1 ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage ;;
    --) shift; ARGS=("$@"); break ;;
    *) die "unknown option $1 (transformer.main flags go after --; see --help)" ;;
  esac
  shift
done

[[ -n "$TPU_NAME" ]] || die "--name (or TPU_NAME) is required"
[[ -n "$ZONE" ]] || die "--zone (or ZONE) is required"
if [[ -z "$DELETE" && -z "$SETUP_ONLY" && ${#ARGS[@]} -eq 0 ]]; then
  die "no command: put the transformer.main flags after --, e.g. -- --flagfile=... --workdir=... --mode=train"
fi
for a in "${ARGS[@]}"; do
  case "$a" in
    --coordinator_address=*|--num_processes=*|--process_id=*)
      die "$a: the pod's processes are found by jax.distributed; do not pass it" ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=("--project=$PROJECT")

run() {  # run CMD...: print (shell-quoted) and, unless --dry-run, execute
  echo "+ $(printf '%q ' "$@")"
  [[ -n "$DRY_RUN" ]] || "$@"
}
on_all_workers() {  # on_all_workers 'remote shell command'
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="$1"
}

if [[ -n "$DELETE" ]]; then
  run "${GCLOUD[@]}" delete "$TPU_NAME" "${COMMON[@]}" --quiet
  exit 0
fi

# REMOTE_DIR may start with ~ (expanded by the worker's shell): quote everything else.
remote_dir_q() { case "$REMOTE_DIR" in "~/"*) printf '~/%q' "${REMOTE_DIR#\~/}" ;; *) printf '%q' "$REMOTE_DIR" ;; esac; }
RDIR="$(remote_dir_q)"

if [[ -z "$SKIP_SETUP" ]]; then
  # 1. The TPU VM: reuse it if it exists, otherwise create it.
  if [[ -n "$DRY_RUN" ]]; then
    echo "# (dry run) the TPU VM is created only if this describe fails:"
    run "${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" '--format=value(state)'
    CREATE=1
  elif "${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" --format='value(state)' >/dev/null 2>&1; then
    echo "[tpu_pod] reusing TPU VM $TPU_NAME in $ZONE"
    CREATE=""
  else
    CREATE=1
  fi
  if [[ -n "$CREATE" ]]; then
    create=("${GCLOUD[@]}" create "$TPU_NAME" "${COMMON[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
            "--version=$RUNTIME_VERSION")
    [[ -n "$SPOT" ]] && create+=(--spot)
    run "${create[@]}"
  fi

  # 2. The repository on every worker.
  if [[ -n "$REPO_URL" ]]; then
    fetch="if [ -d $RDIR/.git ]; then git -C $RDIR fetch --quiet origin; else git clone --quiet $(printf '%q' "$REPO_URL") $RDIR; fi"
    [[ -n "$REPO_REF" ]] && fetch+=" && git -C $RDIR checkout --quiet $(printf '%q' "$REPO_REF")"
    [[ -z "$REPO_REF" ]] && fetch+=" && { git -C $RDIR pull --quiet --ff-only || true; }"
    on_all_workers "$fetch"
  else
    TARBALL="${TMPDIR:-/tmp}/transformer-src-$$.tar.gz"
    echo "+ (cd $(printf '%q' "$REPO") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $TARBALL -T -)"
    if [[ -z "$DRY_RUN" ]]; then
      (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$TARBALL" -T -)
      trap 'rm -f "$TARBALL"' EXIT
    fi
    run "${GCLOUD[@]}" scp "$TARBALL" "$TPU_NAME:/tmp/transformer-src.tar.gz" "${COMMON[@]}" --worker=all
    on_all_workers "mkdir -p $RDIR && tar -xzf /tmp/transformer-src.tar.gz -C $RDIR && rm -f /tmp/transformer-src.tar.gz"
  fi

  # 3. The pinned venv (+ libtpu through jax's [tpu] extra, at the pinned jax version).
  on_all_workers "set -e; cd $RDIR; (python3 -m venv .venv 2>/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv)); .venv/bin/pip install -q --upgrade pip; .venv/bin/pip install -q -c constraints.txt -e . 'jax[tpu]'; .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU devices\")'"
fi

[[ -n "$SETUP_ONLY" ]] && exit 0

# 4. The coordinator is worker 0 (the process with id 0 runs the jax.distributed service).
if [[ -n "$DRY_RUN" ]]; then
  run "${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" "--format=value(networkEndpoints[0].ipAddress)"
  WORKER0_IP="WORKER0_IP"
else
  WORKER0_IP="$("${GCLOUD[@]}" describe "$TPU_NAME" "${COMMON[@]}" \
                 --format='value(networkEndpoints[0].ipAddress)')"
  [[ -n "$WORKER0_IP" ]] || die "could not read worker 0's internal IP of $TPU_NAME"
fi

# 5. The same command on every worker, at the same time.
remote="cd $RDIR && JAX_COORDINATOR_ADDRESS=$WORKER0_IP:$COORDINATOR_PORT TF_CPP_MIN_LOG_LEVEL=3"
remote+=" .venv/bin/python -m transformer.main$(printf ' %q' "${ARGS[@]}")"
if [[ -n "$LOG" ]]; then
  # Detached: the run survives the end of this ssh session; follow it with
  #   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 --command='tail -f REMOTE_DIR/LOG'
  log_q="$(printf '%q' "$LOG")"
  remote="cd $RDIR && mkdir -p \"\$(dirname $log_q)\" && nohup bash -c $(printf '%q' "$remote") > $log_q 2>&1 < /dev/null &"
fi
on_all_workers "$remote"
