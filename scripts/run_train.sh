#!/usr/bin/env bash
# Train on one Ascend card.
#   bash scripts/run_train.sh DEVICE_ID CONFIG LOG_DIR [--flag value ...]
# e.g. bash scripts/run_train.sh 0 configs/sd15_scedit.yaml logs/scedit --max_train_steps 2000
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 DEVICE_ID CONFIG LOG_DIR [--flag value ...]" >&2
  exit 2
fi
DEVICE_ID=$1; CONFIG=$2; LOG_DIR=$3; shift 3
cd "$(dirname "$0")/.."
mkdir -p "$LOG_DIR"
export DEVICE_ID
export MS_ASCEND_CHECK_OVERFLOW_MODE=${MS_ASCEND_CHECK_OVERFLOW_MODE:-INFNAN_MODE}
mindscedit train --config "$CONFIG" --device_target Ascend "$@" 2>&1 | tee "$LOG_DIR/train.log"
