#!/usr/bin/env bash
# MindSpore (mindscedit bench) against PyTorch (diffusers + peft, ../shared/bench/torch_reference.py)
# on the same CPU, same UNet training step: mid config (block_out_channels 32,64,128,128,
# cross_attention_dim 64), 256x256 images (32x32 latents), batch 8, LoRA rank 16 on q/k/v/out +
# feed-forward. Prints the MindSpore/PyTorch ratios of s/step and peak RSS.
#
# MindSpore runs twice through a fresh compile cache: "cold" compiles the step (a first launch),
# "warm" loads it (every later launch of the same setup).
#
# PyTorch runs twice per method: "fp32" (its CPU bf16 autocast switched off: the same fp32 math as
# MindSpore here) and "ref" (torch_reference.py exactly as written: bf16 autocast, which on a CPU
# without native bf16 is emulated and slow). Peak RSS comes from /usr/bin/time -v.
#
#   bash scripts/run_perf_compare.sh [OUT_DIR]
# env: MS_PYTHON (python), TORCH_PYTHON (/work/venv-torch/bin/python), TORCH_REFERENCE (path),
#      BS (8), STEPS (5), PIN (e.g. "taskset -c 0,1"), SKIP_TORCH_REF=1 (fp32 PyTorch only)
set -euo pipefail
OUT=${1:-outputs/perf}
MS_PYTHON=${MS_PYTHON:-python}
TORCH_PYTHON=${TORCH_PYTHON:-/work/venv-torch/bin/python}
BS=${BS:-8}
STEPS=${STEPS:-5}
PIN=${PIN:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
REF=${TORCH_REFERENCE:-$HERE/../shared/bench/torch_reference.py}
ARGS=(--small --res 256 --bs "$BS" --rank 16 --steps "$STEPS" --warmup 2)
export GLOG_v=${GLOG_v:-3}
mkdir -p "$OUT"

torch_run() {  # mode method
  local mode=$1 m=$2 prelude="import sys, runpy"
  if [ "$mode" = fp32 ]; then
    prelude="$prelude, contextlib, torch; torch.autocast = lambda *a, **k: contextlib.nullcontext()"
  fi
  # One process per method so each peak RSS is its own. PyTorch's oneDNN must not get
  # MindSpore's AVX2 cap (ONEDNN_MAX_CPU_ISA).
  /usr/bin/time -v env -u ONEDNN_MAX_CPU_ISA $PIN "$TORCH_PYTHON" -c \
      "$prelude; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
      "$REF" "${ARGS[@]}" --methods "$m" > "$OUT/torch_${mode}_$m.jsonl" 2> "$OUT/torch_${mode}_$m.time"
}

for m in full lora scedit; do torch_run fp32 "$m"; done
# mindscedit bench runs each case in its own process and reports that process's peak RSS.
rm -rf "$OUT/compile-cache"
for phase in cold warm; do
  ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2} $PIN "$MS_PYTHON" -m mindscedit.cli bench --model_config mid \
      --methods vanilla,lora,scedit --batch_sizes "$BS" --resolution 256 --lora_rank 16 --lora_targets attn+ff \
      --steps "$STEPS" --warmup 2 --device_target CPU --compile_cache_dir "$OUT/compile-cache" \
      --json "$OUT/mindspore_$phase.jsonl" | tee "$OUT/mindspore_$phase.txt"
done
# Compile time of the SD1.5-size SCEdit step (random weights, 256x256, batch 1), cold and warm.
for phase in cold warm; do
  ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2} $PIN "$MS_PYTHON" -m mindscedit.cli bench --model_config sd15 \
      --methods scedit --batch_sizes 1 --resolution 256 --steps 2 --warmup 0 --device_target CPU \
      --compile_cache_dir "$OUT/compile-cache" --json "$OUT/sd15_$phase.jsonl" > "$OUT/sd15_$phase.txt"
done
if [ "${SKIP_TORCH_REF:-0}" != 1 ]; then
  for m in full lora scedit; do torch_run ref "$m"; done
fi

"$MS_PYTHON" - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
cold, warm = ({r["method"]: r for r in map(json.loads, open(f"{out}/mindspore_{p}.jsonl"))} for p in ("cold", "warm"))

def torch_row(mode, name):
    path = f"{out}/torch_{mode}_{name}.jsonl"
    if not os.path.exists(path):
        return None
    rows = [json.loads(l) for l in open(path) if '"method"' in l]
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/torch_{mode}_{name}.time").read())
    return (rows[0]["s_per_step"], int(rss[1]) / 1024) if rows and rss else None

print("\n| method | MindSpore s/step | peak RSS MiB, cold / warm | compile s, cold / warm "
      "| PyTorch fp32 s/step, RSS MiB | ratio s/step, RSS cold / warm "
      "| PyTorch ref (bf16 autocast) s/step, RSS MiB | ratio s/step, RSS cold / warm |")
print("|---|---|---|---|---|---|---|---|")
for ms_name, pt_name in (("vanilla", "full"), ("lora", "lora"), ("scedit", "scedit")):
    c, w = cold[ms_name], warm[ms_name]
    assert w.get("compile_cache") == "hit", f"{ms_name}: the warm run did not load the cached step"
    cells = [ms_name, f"{w['s_per_step']:.3f}", f"{c['peak_memory_mib']:.0f} / {w['peak_memory_mib']:.0f}",
             f"{c['compile_s']:.1f} / {w['compile_s']:.1f}"]
    for mode in ("fp32", "ref"):
        t = torch_row(mode, pt_name)
        cells += [f"{t[0]:.3f}, {t[1]:.0f}", f"{w['s_per_step'] / t[0]:.2f}, "
                  f"{c['peak_memory_mib'] / t[1]:.2f} / {w['peak_memory_mib'] / t[1]:.2f}"] if t else ["-", "-"]
    print("| " + " | ".join(cells) + " |")
print("\nMindSpore first step = graph (compiled, or loaded from the cache) + its first run, s; "
      "peak RSS split, MiB: framework + models before compiling / what compiling adds / what the steps add")
for name in ("vanilla", "lora", "scedit"):
    parts = []
    for phase, r in (("cold", cold[name]), ("warm", warm[name])):
        before, after = r["rss_before_compile_mib"], r["rss_after_compile_mib"]
        parts.append(f"{phase} {r['graph_s']:.1f} + {r['compile_s'] - r['graph_s']:.1f} s, "
                     f"{before:.0f} / +{after - before:.0f} / +{r['peak_memory_mib'] - after:.0f} MiB")
    print(f"  {name}: " + "; ".join(parts))
s, l, v = warm["scedit"], warm["lora"], warm["vanilla"]
print(f"\nMindSpore SCEdit / LoRA: s/step {s['s_per_step'] / l['s_per_step']:.2f}, "
      f"peak RSS {s['peak_memory_mib'] / l['peak_memory_mib']:.2f}; "
      f"LoRA / vanilla s/step {l['s_per_step'] / v['s_per_step']:.2f}")
sd15 = [json.loads(open(f"{out}/sd15_{p}.jsonl").readline()) for p in ("cold", "warm")]
print(f"SD1.5-size SCEdit step (256x256, batch 1): first step {sd15[0]['compile_s']:.1f} s cold "
      f"(graph {sd15[0]['graph_s']:.1f} s), {sd15[1]['compile_s']:.1f} s warm (graph {sd15[1]['graph_s']:.1f} s, "
      f"{sd15[1]['compile_cache']}); "
      f"peak RSS {sd15[0]['peak_memory_mib']:.0f} / {sd15[1]['peak_memory_mib']:.0f} MiB; {sd15[1]['s_per_step']:.2f} s/step")
PY
