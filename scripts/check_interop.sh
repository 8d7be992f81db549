#!/usr/bin/env bash
# Check that mindscedit's weight files load in the PyTorch tools (diffusers, peft, ms-swift) and give
# the same UNet outputs there as in MindSpore, and that ms-swift's SC-Tuner files load in mindscedit;
# and that GatedProdigy's steps match prodigyopt's on the same gradients.
#
#   MS_VENV     venv with mindscedit (default /work/venv)
#   TORCH_VENV  venv with torch, diffusers, peft, ms-swift (default /work/venv-torch), e.g.
#               pip install torch diffusers transformers peft accelerate safetensors prodigyopt   (CPU torch is enough)
#               pip install --no-deps ms-swift modelscope modelscope-hub   (ms-swift pins an older peft)
#               pip install datasets json-repair einops cryptography       (what swift.tuners imports)
#   WORK        folder for the model, weights and outputs (default: a new temporary folder, kept)
#
# Prints one `PASS|FAIL <check>: ...` line per check; exits 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
MS_VENV=${MS_VENV:-/work/venv}
TORCH_VENV=${TORCH_VENV:-/work/venv-torch}
WORK=${WORK:-$(mktemp -d -t mindscedit-interop-XXXXXX)}
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2} GLOG_v=${GLOG_v:-3}
mkdir -p "$WORK"
LOG="$WORK/log.txt"
: > "$LOG"
echo "work folder: $WORK (full log: $LOG)"

step() {  # step NAME COMMAND...: run it quietly; on failure print a FAIL line and the log's tail, and stop
    local name=$1; shift
    if ! "$@" >> "$LOG" 2>&1; then
        echo "FAIL $name: '$*' failed"
        tail -n 20 "$LOG"
        exit 1
    fi
}

# MindSpore side: the tiny pipeline, random LoRA / DoRA / SC-Tuner weights, converted layouts, outputs.
ms() { "$MS_VENV/bin/mindscedit" "$@"; }
step "make tiny model" ms make-tiny-model "$WORK/tiny-sd"
step "MindSpore outputs" "$MS_VENV/bin/python" scripts/interop_mindspore.py export "$WORK"
step "convert LoRA to kohya" ms convert --from diffusers --to kohya "$WORK/lora" "$WORK/kohya"
step "convert SC-Tuner to an ms-swift tree" ms convert --from swift --to swift "$WORK/sc_adapter" "$WORK/sc_swift"
step "convert SC-Tuner to scepter" ms convert --from swift --to scepter "$WORK/sc_adapter" "$WORK/sc_scepter.safetensors"
step "convert scepter SC-Tuner back to an ms-swift tree" \
    ms convert --from scepter --to swift "$WORK/sc_scepter.safetensors" "$WORK/sc_from_scepter"
step "MindSpore Prodigy run" "$MS_VENV/bin/python" scripts/interop_mindspore.py prodigy "$WORK"

# PyTorch side: load everything, compare, then write SC-Tuners with ms-swift itself.
status=0
run_torch() {  # print the PASS/FAIL lines; a crash is a FAIL too
    "$TORCH_VENV/bin/python" scripts/check_interop.py "$@" > "$WORK/torch_$1.txt" 2>> "$LOG"
    local rc=$?
    cat "$WORK/torch_$1.txt"
    if [ $rc -ne 0 ]; then
        status=1
        grep -q '^FAIL' "$WORK/torch_$1.txt" || { echo "FAIL PyTorch $1 crashed (exit $rc)"; tail -n 20 "$LOG"; }
    fi
    return $rc
}
run_torch stage1 "$WORK"
if [ -f "$WORK/torch_swift/default/adapter_model.safetensors" ]; then
    step "MindSpore loads ms-swift's SC-Tuners" "$MS_VENV/bin/python" scripts/interop_mindspore.py import "$WORK"
    run_torch stage2 "$WORK"
fi
run_torch prodigy "$WORK"
[ $status -eq 0 ] && echo "all interop checks passed" || echo "some interop checks FAILED"
exit $status
