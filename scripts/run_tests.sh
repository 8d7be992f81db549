#!/usr/bin/env bash
# Run the test suite on CPU (tiny models); -m "not slow" for the quick subset.
# PYTEST_WORKERS=2 runs test files in two processes (pytest-xdist; each file stays in one worker, so
# its module fixtures are built once); the suite took 32 min that way on 2 cores, but on a 24 GB
# machine with other jobs running a worker was once killed for memory (12 GB resident). Default: one process.
set -euo pipefail
cd "$(dirname "$0")/.."
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
export GLOG_v=${GLOG_v:-3}
WORKERS=${PYTEST_WORKERS:-1}
if [ "$WORKERS" -gt 1 ]; then
  python -m pytest -q -n "$WORKERS" --dist loadfile tests "$@"
else
  python -m pytest -q tests "$@"
fi
