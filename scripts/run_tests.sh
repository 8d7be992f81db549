#!/usr/bin/env bash
# Run the test suite on CPU (tiny models); -m "not slow" for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
export GLOG_v=${GLOG_v:-3}
python -m pytest -q tests "$@"
