#!/usr/bin/env bash
# Run the test suite on CPU (tiny models). Extra arguments go to pytest: -m "not slow" is the quick subset.
#
# Each test file runs in a pytest process of its own: MindSpore keeps what it compiled (graphs, kernels, their
# memory) until the process exits, and the whole suite in one process grew past 23 GB and was killed. Per file,
# the peak stays that of the heaviest file (printed after each file as "peak RSS"). PYTEST_WORKERS=2 runs two
# files at a time: only where memory allows twice the largest peak.
set -uo pipefail
cd "$(dirname "$0")/.."
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
export GLOG_v=${GLOG_v:-3}
WORKERS=${PYTEST_WORKERS:-1}
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT

run_file() {  # run_file FILE [pytest args...]: its output printed in one piece once it ends, its exit code kept
  local file=$1 name
  shift
  name=$(basename "$file" .py)
  python -m pytest -q -p no:cacheprovider "$file" "$@" > "$RESULTS/$name.log" 2>&1
  echo $? > "$RESULTS/$name.rc"
  echo "=== $file"
  cat "$RESULTS/$name.log"
}
export -f run_file
export RESULTS

# The longest files first (their last full-suite times), so that with two workers neither waits
# alone at the end on a long file started late; then the rest in name order.
LONGEST=(precision sdxl_training pivotal_tuning text_encoder_lora smoke sampling sdxl)
files=()
for name in "${LONGEST[@]}"; do [ -f "tests/test_$name.py" ] && files+=("tests/test_$name.py"); done
for file in tests/test_*.py; do
  [[ " ${files[*]} " == *" $file "* ]] || files+=("$file")
done

started=$(date +%s)
printf '%s\n' "${files[@]}" | xargs -P "$WORKERS" -I{} bash -c 'run_file "$@"' _ {} "$@"

failed=()
ran=0
for rc_file in "$RESULTS"/*.rc; do
  rc=$(cat "$rc_file")
  name=$(basename "$rc_file" .rc)
  case $rc in
    0) ran=$((ran + 1)) ;;
    5) ;;  # no test of this file was selected (-m)
    *) failed+=("tests/$name.py (exit $rc)") ;;
  esac
done
totals=$(grep -hoE '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$RESULTS"/*.log |
  awk '{n[$2] += $1} END {for (k in n) printf "%d %s, ", n[k], k}')
echo "=== $(ls "$RESULTS"/*.rc | wc -l) test files in $(( $(date +%s) - started )) s: ${totals%, }"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED %s\n' "${failed[@]}"
  exit 1
fi
if [ "$ran" -eq 0 ]; then
  echo "error: no test was selected" >&2
  exit 5
fi
