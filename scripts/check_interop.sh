#!/usr/bin/env bash
# Check that mindscedit's weight files load in the PyTorch tools (diffusers, peft, ms-swift) and give
# the same UNet outputs there as in MindSpore, and that ms-swift's SC-Tuner files load in mindscedit;
# the same for the tiny SDXL UNet (LoRA in diffusers' and kohya's SDXL layouts, SC-Tuners);
# that `merge-lora --combination ties` gives what peft's add_weighted_adapter gives on the same two
# LoRAs; that GatedProdigy's steps match prodigyopt's on the same gradients; and that pivotal
# tuning's embeddings and text-encoder LoRA load in diffusers (load_textual_inversion,
# load_lora_weights) and encode prompts as mindscedit does.
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
TF4_TRANSFORMERS=${TF4_TRANSFORMERS:-4.57.1}  # the text stage's second run (see below)
TF4_DIFFUSERS=${TF4_DIFFUSERS:-0.35.2}
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
# ties merge of two LoRAs of equal rank, different alpha; check_interop.py's TIES_* are these options
step "merge-lora ties" ms merge-lora "$WORK/lora" "$WORK/lora_b" --weights 0.7 0.3 --combination ties \
    --density 0.5 --majority_sign_method total --out "$WORK/lora_ties"
# SDXL: the tiny SDXL UNet with its added conditions; kohya's SDXL naming (LDM blocks) from
# convert's detection and from save_lora (UNet config); nine-slot numbering logic of SC-Tuners.
step "make tiny SDXL model" ms make-tiny-model "$WORK/tiny-sdxl" --family sdxl
step "MindSpore SDXL outputs" "$MS_VENV/bin/python" scripts/interop_mindspore.py export_sdxl "$WORK"
step "convert SDXL LoRA to kohya" ms convert --from diffusers --to kohya "$WORK/sdxl/lora" "$WORK/sdxl/kohya"
step "convert SDXL kohya LoRA back to diffusers" \
    ms convert --from kohya --to diffusers "$WORK/sdxl/kohya" "$WORK/sdxl/lora_back"
step "convert SDXL text-encoder LoRA to kohya" \
    ms convert --from diffusers --to kohya "$WORK/sdxl/te_lora" "$WORK/sdxl/te_kohya"
step "convert SDXL SC-Tuner to an ms-swift tree" ms convert --from swift --to swift "$WORK/sdxl/sc_adapter" "$WORK/sdxl/sc_swift"
step "convert SDXL SC-Tuner to scepter" \
    ms convert --from swift --to scepter "$WORK/sdxl/sc_adapter" "$WORK/sdxl/sc_scepter.safetensors"
step "convert SDXL scepter SC-Tuner back to an ms-swift tree" \
    ms convert --from scepter --to swift "$WORK/sdxl/sc_scepter.safetensors" "$WORK/sdxl/sc_from_scepter"
step "MindSpore Prodigy run" "$MS_VENV/bin/python" scripts/interop_mindspore.py prodigy "$WORK"
step "MindSpore text-side outputs" "$MS_VENV/bin/python" scripts/interop_mindspore.py text "$WORK"

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
run_torch sdxl "$WORK"
run_torch ties "$WORK"
run_torch prodigy "$WORK"
run_torch text "$WORK"
# diffusers puts text-encoder LoRA on transformers 4's layer names (`text_model...`); transformers 5
# dropped that level. The text stage again on transformers 4 and a diffusers of its time, installed
# over the torch venv with --target (no other package changes).
TF4="$WORK/transformers4"
if "$TORCH_VENV/bin/python" -m pip install --quiet --target "$TF4" --no-deps "transformers==$TF4_TRANSFORMERS" \
        "tokenizers>=0.22,<0.23" "huggingface-hub>=0.34,<1.0" "diffusers==$TF4_DIFFUSERS" >> "$LOG" 2>&1; then
    PYTHONPATH="$TF4" run_torch text "$WORK" || true
else
    echo "SKIP text stage on transformers $TF4_TRANSFORMERS: could not install it (see $LOG)"
fi
[ $status -eq 0 ] && echo "all interop checks passed" || echo "some interop checks FAILED"
exit $status
