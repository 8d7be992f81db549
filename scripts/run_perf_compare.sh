#!/usr/bin/env bash
# MindSpore (mindscedit bench) against PyTorch (diffusers + peft) on the same CPU, same UNet
# training step: mid config (block_out_channels 32,64,128,128, cross_attention_dim 64),
# 256x256 images (32x32 latents), batch 8, LoRA rank 16 on q/k/v/out + feed-forward.
# Prints both tables and the MindSpore/PyTorch ratios of s/step and peak RSS.
#
#   bash scripts/run_perf_compare.sh [OUT_DIR]
# env: MS_PYTHON (default: python), TORCH_PYTHON (default: /work/venv-torch/bin/python),
#      BS (8), STEPS (5), PIN ("taskset -c 0,1" or empty)
set -euo pipefail
OUT=${1:-outputs/perf}
MS_PYTHON=${MS_PYTHON:-python}
TORCH_PYTHON=${TORCH_PYTHON:-/work/venv-torch/bin/python}
BS=${BS:-8}
STEPS=${STEPS:-5}
PIN=${PIN:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
REF=${TORCH_REFERENCE:-$HERE/../shared/bench/torch_reference.py}
export GLOG_v=${GLOG_v:-3}
mkdir -p "$OUT"

# PyTorch: one process per method so each peak RSS is its own (/usr/bin/time -v). Its oneDNN
# must not get MindSpore's AVX2 cap: it would send PyTorch's bf16 autocast to reference kernels.
for m in full lora scedit; do
  /usr/bin/time -v env -u ONEDNN_MAX_CPU_ISA $PIN "$TORCH_PYTHON" "$REF" --small --res 256 --bs "$BS" --rank 16 --methods "$m" \
      --steps "$STEPS" --warmup 2 > "$OUT/torch_$m.jsonl" 2> "$OUT/torch_$m.time"
done
# MindSpore: mindscedit bench already runs each case in its own process and reports its peak RSS.
ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2} $PIN "$MS_PYTHON" -m mindscedit.cli bench --model_config mid --methods vanilla,lora,scedit --batch_sizes "$BS" \
    --resolution 256 --lora_rank 16 --lora_targets attn+ff --steps "$STEPS" --warmup 2 --device_target CPU \
    --json "$OUT/mindspore.jsonl" | tee "$OUT/mindspore.txt"

"$MS_PYTHON" - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
ms = {r["method"]: r for r in map(json.loads, open(f"{out}/mindspore.jsonl"))}
rows = []
for ms_name, pt_name in (("vanilla", "full"), ("lora", "lora"), ("scedit", "scedit")):
    pt = [json.loads(l) for l in open(f"{out}/torch_{pt_name}.jsonl") if '"method"' in l][0]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/torch_{pt_name}.time").read())[1]) / 1024
    m = ms[ms_name]
    rows.append((ms_name, m["s_per_step"], pt["s_per_step"], m["peak_memory_mib"], rss, m["compile_s"]))
print("\n| method | MindSpore s/step | PyTorch s/step | ratio | MindSpore peak RSS MiB | PyTorch peak RSS MiB | ratio | MindSpore compile s |")
print("|---|---|---|---|---|---|---|---|")
for name, s, ps, mem, pmem, comp in rows:
    print(f"| {name} | {s:.3f} | {ps:.3f} | {s / ps:.2f} | {mem:.0f} | {pmem:.0f} | {mem / pmem:.2f} | {comp:.1f} |")
r = {n: (s, mem) for n, s, _, mem, _, _ in rows}
print(f"\nSCEdit / LoRA (MindSpore): s/step {r['scedit'][0] / r['lora'][0]:.2f}, peak RSS {r['scedit'][1] / r['lora'][1]:.2f}; "
      f"LoRA / vanilla s/step {r['lora'][0] / r['vanilla'][0]:.2f}")
PY
