#!/usr/bin/env bash
# Benchmark the UNet training step of vanilla, LoRA and SCEdit (random weights, real configs).
#   Ascend also times SDXL at 1024² (LoRA, SCEdit, CSC-Tuner, ControlNet).
#   bash scripts/run_benchmark.sh            # Ascend: SD1.5 at 512, fp16, mindone's batches (below)
#   bash scripts/run_benchmark.sh --cpu      # CPU: the mid config at 256 (32x32 latents), batch 8,
#                                            then CSC-Tuner vs ControlNet on the same config, then
#                                            SCEdit on the real SDXL UNet at 256, batch 1 (~12 GiB)
# Extra flags go to `mindscedit bench` (e.g. --steps 20, --pretrained_model_name_or_path DIR).
# Prints a markdown table per run; JSON lines land in $OUT_DIR (default outputs/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-outputs/bench}
mkdir -p "$OUT_DIR"
export GLOG_v=${GLOG_v:-3}

if [ "${1:-}" = "--cpu" ]; then
  shift
  export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
  mindscedit bench --model_config mid --methods vanilla,lora,scedit --batch_sizes 8 --resolution 256 \
    --steps 5 --warmup 1 --lora_rank 16 --lora_targets attn+ff --device_target CPU \
    --json "$OUT_DIR/cpu_mid_256_bs8.jsonl" "$@"
  # Controllable generation: the CSC-Tuner (1x1 hint convs) against a ControlNet of the same UNet.
  mindscedit bench --model_config mid --methods scedit_control,controlnet --batch_sizes 8 --resolution 256 \
    --steps 5 --warmup 1 --dense_hint_kernel 1 --device_target CPU \
    --json "$OUT_DIR/cpu_mid_256_bs8_control.jsonl" "$@"
  # SCEdit on the real SDXL UNet at 256² (32² latents), batch 1: what fits a 24 GiB CPU machine.
  mindscedit bench --model_config sdxl --methods scedit --batch_sizes 1 --resolution 256 --steps 2 --warmup 0 \
    --device_target CPU --json "$OUT_DIR/cpu_sdxl_256_bs1.jsonl" "$@"
  exit 0
fi

export MS_ASCEND_CHECK_OVERFLOW_MODE=${MS_ASCEND_CHECK_OVERFLOW_MODE:-INFNAN_MODE}
# Rows comparable to mindone's SD1.5 910* table (fp16, 512x512): vanilla at batch 3 and LoRA (rank 4 on
# q/k/v/out, mindone's recipe) at batch 4, each also at batch 1 (the bs-1 table); SCEdit at the same
# batches. JIT_LEVELS picks the jit levels (O2 only on MindSpore < 2.9, which deprecates it).
for JIT in ${JIT_LEVELS:-O0 O1}; do
  common=(--model_config sd15 --resolution 512 --steps 20 --warmup 3 --jit_level "$JIT" --mixed_precision fp16
          --device_target Ascend)
  mindscedit bench "${common[@]}" --methods vanilla --batch_sizes 1,3 \
    --json "$OUT_DIR/ascend_sd15_512_${JIT}_vanilla.jsonl" "$@"
  mindscedit bench "${common[@]}" --methods lora,scedit --batch_sizes 1,4 --lora_rank 4 --lora_targets attn \
    --json "$OUT_DIR/ascend_sd15_512_${JIT}_lora_scedit.jsonl" "$@"
done
# SDXL at 1024², batch 1 (the sdxl_*.yaml recipes): LoRA rank 4 on q/k/v/out, SCEdit, and the
# CSC-Tuner (scepter's 3x3 dense hints) against a ControlNet of the same UNet; jit O1.
sdxl=(--model_config sdxl --resolution 1024 --batch_sizes 1 --steps 20 --warmup 3 --jit_level O1
      --mixed_precision fp16 --device_target Ascend)
mindscedit bench "${sdxl[@]}" --methods lora,scedit --lora_rank 4 --lora_targets attn \
  --json "$OUT_DIR/ascend_sdxl_1024_O1.jsonl" "$@"
mindscedit bench "${sdxl[@]}" --methods scedit_control,controlnet --dense_hint_kernel 3 \
  --json "$OUT_DIR/ascend_sdxl_1024_O1_control.jsonl" "$@"
