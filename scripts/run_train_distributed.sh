#!/usr/bin/env bash
# Data-parallel training with msrun: one process per card, gradients averaged across cards.
#   bash scripts/run_train_distributed.sh [--cpu] [--workers N] [--port P] [--log_dir DIR] [--bind_core on|off]
#                                         -- [train flags ...]
#
# Ascend (default): N = number of cards in ASCEND_RT_VISIBLE_DEVICES, else 8.
#   bash scripts/run_train_distributed.sh -- --config configs/sd15_scedit.yaml --max_train_steps 2000
# CPU: 2 local workers (a check of the multi-card path on one machine).
#   bash scripts/run_train_distributed.sh --cpu -- --config configs/tiny_scedit.yaml
#
# --bind_core on|off (or MINDSCEDIT_BIND_CORE=on|off; default on, for Ascend and --cpu alike):
# msrun --bind_core=True pins each worker, and the data-loader processes it starts, with taskset to
# its own share of the host's cores, next to its card's NUMA node when msrun can read the topology,
# so the host work that feeds a card (graph launch, data loading) is not moved across nodes or
# crowded out by the other cards' processes. msrun takes the cores from
# /sys/fs/cgroup/cpuset/cpuset.cpus (cgroup v1); without that file or taskset it logs a warning
# and runs the workers unpinned.
#
# --train_batch_size is per card: global batch = per-card batch x cards x gradient_accumulation_steps.
# Rank 0 alone writes logs, checkpoints and weights. Each worker's output goes to DIR/worker_K.log.
# Exit status: 0 when every worker finished; otherwise non-zero, naming the failed worker's log.
set -uo pipefail

CPU=0
WORKERS=""
PORT=""
LOG_DIR="logs/msrun"
BIND_CORE=${MINDSCEDIT_BIND_CORE:-on}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1; shift ;;
    --workers) WORKERS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --log_dir) LOG_DIR=$2; shift 2 ;;
    --bind_core) BIND_CORE=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) break ;;
  esac
done

if [ -z "$WORKERS" ]; then
  if [ "$CPU" = 1 ]; then
    WORKERS=2
  elif [ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]; then
    WORKERS=$(echo "$ASCEND_RT_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  else
    WORKERS=8
  fi
fi
# On for CPU too: with no card topology msrun splits the cpuset evenly (2 workers on 2 cores:
# taskset -c 0 and -c 1), the losses came out identical, and the tiny config trained faster pinned
# (0.11-0.13 s/step against 0.15-0.20 unpinned, a shared 2-core machine), likely because the two
# workers' thread pools no longer compete for both cores. With fewer cores than workers msrun
# warns and leaves them unpinned.
case "$BIND_CORE" in
  on) BIND_FLAG=--bind_core=True ;;
  off) BIND_FLAG=--bind_core=False ;;
  *) echo "error: --bind_core (or MINDSCEDIT_BIND_CORE) must be on or off, got '$BIND_CORE'" >&2; exit 2 ;;
esac
if [ -z "$PORT" ]; then
  PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# msrun starts each worker as `python ...` from PATH: the python that has mindscedit must come first.
PYTHON=$(command -v python)
export PATH="$(dirname "$PYTHON"):$PATH"
export GLOG_v=${GLOG_v:-3}
if [ "$CPU" = 1 ]; then
  export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
  set -- --device_target CPU "$@"
else
  export MS_ASCEND_CHECK_OVERFLOW_MODE=${MS_ASCEND_CHECK_OVERFLOW_MODE:-INFNAN_MODE}
  set -- --device_target Ascend "$@"
fi

mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/worker_*.log "$LOG_DIR"/scheduler.log
echo "msrun: $WORKERS workers, port $PORT, bind_core $BIND_CORE, logs in $LOG_DIR/worker_*.log"
msrun --worker_num="$WORKERS" --local_worker_num="$WORKERS" --master_port="$PORT" \
  --log_dir="$LOG_DIR" --join=True "$BIND_FLAG" python -m mindscedit.cli train "$@"
status=$?

# msrun's own exit status is not trusted alone: a worker counts as finished only if its log ends
# the run with the trainer's "done:" line.
failed=()
for ((k = 0; k < WORKERS; k++)); do
  log="$LOG_DIR/worker_$k.log"
  if [ ! -f "$log" ] || ! grep -q '^done: ' "$log"; then
    failed+=("$log")
  fi
done
if [ "$status" -ne 0 ] || [ ${#failed[@]} -gt 0 ]; then
  # Name the workers that raised first; the others were usually stopped because of them.
  culprits=()
  for log in "${failed[@]}"; do
    if [ -f "$log" ] && grep -qE '^error: |^Traceback' "$log"; then culprits+=("$log"); fi
  done
  [ ${#culprits[@]} -gt 0 ] || culprits=("${failed[@]}")
  [ ${#culprits[@]} -gt 0 ] || echo "msrun exited with status $status; see $LOG_DIR/worker_*.log" >&2
  for log in "${culprits[@]}"; do
    echo "worker failed, see $log:" >&2
    [ -f "$log" ] && grep -E '^error: |Error' "$log" | tail -n 3 >&2
  done
  [ "$status" -ne 0 ] && exit "$status"
  exit 1
fi
echo "all $WORKERS workers finished"
