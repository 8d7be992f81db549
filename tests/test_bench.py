"""`mindscedit bench` on the tiny UNet config: JSON rows, the markdown table, parameter counts."""
import json

import numpy as np
import pytest
from mindspore import nn

from mindscedit.bench import compile_phases
from mindscedit.cli import main
from mindscedit.models import build_unet, unet_preset
from mindscedit.models.presets import TINY_VAE
from mindscedit.tuners.lora.config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS

FIELDS = {
    "method", "batch_size", "model", "resolution", "latent_size", "device", "jit_level", "mixed_precision",
    "lora_rank", "lora_targets", "dense_hint_kernel", "trainable_params", "unet_params", "trainable_pct", "peak_memory_mib",
    "memory_kind", "rss_before_compile_mib", "rss_after_compile_mib", "compile_s", "graph_s", "compile_cache", "s_per_step",
    "img_per_s", "timed_steps", "loss",
}
LORA_RANK = 4
LATENT_FACTOR = 2 ** (len(TINY_VAE["block_out_channels"]) - 1)  # the tiny pipeline's VAE downscale


def expected_counts():
    """Trainable parameter counts worked out from the tiny config, independently of the injection code."""
    config = unet_preset("tiny")
    unet = build_unet(config)
    total = sum(p.size for p in unet.get_parameters())
    # SC-Tuners: one per decoder skip; skips = conv_in, every down resnet, every downsampler.
    channels = config["block_out_channels"]
    skips = [channels[0]]
    for i, c in enumerate(channels):
        skips += [c] * config["layers_per_block"] + ([c] if i < len(channels) - 1 else [])
    scedit = sum(2 * (d * d + d) for d in skips)
    # LoRA: rank x (in + out) for every targeted Dense layer.
    targets = tuple(ATTENTION_TARGETS + FEED_FORWARD_TARGETS)
    lora = sum(
        LORA_RANK * (cell.in_channels + cell.out_channels)
        for name, cell in unet.cells_and_names()
        if isinstance(cell, nn.Dense) and name.endswith(targets)
    )
    return total, {"scedit": scedit, "lora": lora}


@pytest.mark.slow
def test_bench_writes_rows_and_prints_the_table(tmp_path, capfd):
    """In fp16, as on Ascend (with the CPU rewrites on, as a CPU user gets them); the CSC-Tuner and
    ControlNet run in fp16 in the test below."""
    out = tmp_path / "rows.jsonl"
    argv = ["bench", "--model_config", "tiny", "--methods", "vanilla,lora,scedit", "--batch_sizes", "2",
            "--resolution", "32", "--steps", "2", "--warmup", "0", "--lora_rank", str(LORA_RANK),
            "--lora_targets", "attn+ff", "--device_target", "CPU", "--mixed_precision", "fp16", "--json", str(out),
            "--compile_cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 0  # each case compiles in its own process: one compile per method
    captured = capfd.readouterr()
    printed = captured.out
    assert "mixed_precision fp16 on CPU: for checking the Ascend dtype path" in captured.err
    rows = [json.loads(line) for line in open(out)]
    assert [(r["method"], r["batch_size"]) for r in rows] == [("vanilla", 2), ("lora", 2), ("scedit", 2)]

    total, counts = expected_counts()
    assert counts["scedit"] == 25_088  # 2(d^2+d) over skips (64, 64, 32, 32, 32, 32)
    counts["vanilla"] = total
    for r in rows:
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert r["trainable_params"] == counts[r["method"]]
        assert r["unet_params"] == total
        assert r["trainable_pct"] == pytest.approx(100 * counts[r["method"]] / total)
        assert r["s_per_step"] > 0 and 0 < r["graph_s"] < r["compile_s"] and r["peak_memory_mib"] > 0
        assert r["img_per_s"] == pytest.approx(2 / r["s_per_step"])
        assert r["latent_size"] == 32 // LATENT_FACTOR and r["memory_kind"] == "host RSS"
        assert 0 < r["rss_before_compile_mib"] < r["rss_after_compile_mib"] <= r["peak_memory_mib"]
        assert np.isfinite(r["loss"]) and r["mixed_precision"] == "fp16"
    assert rows[1]["lora_rank"] == LORA_RANK and rows[1]["lora_targets"] == "attn+ff"

    assert "| method | batch | trainable params | peak memory (MiB) | compile (s) | s/step | img/s |" in printed
    for r in rows:
        line = next(l for l in printed.splitlines() if l.startswith(f"| {r['method']} | 2 |"))
        assert f"{r['trainable_params'] / 1e6:.2f}M ({r['trainable_pct']:.2f}%)" in line
        assert f"{r['s_per_step']:.3f}" in line
    assert [r["compile_cache"] for r in rows] == ["miss", "miss", "miss"]

    # The same case again: a repeated launch loads the compiled step from the cache.
    assert main([a if a != "vanilla,lora,scedit" else "scedit" for a in argv]) == 0
    again = json.loads(open(out).readline())
    assert again["compile_cache"] == "hit" and "(cached)" in capfd.readouterr().out
    assert again["loss"] == pytest.approx(rows[2]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_config", "huge"], "--model_config: 'huge' is not one of"),
        (["--model_config", "tiny", "--methods", "lora,dora"], "--methods: 'dora'"),
        (["--model_config", "tiny", "--batch_sizes", "1,x"], "--batch_sizes must be a comma list"),
        ([], "give one of --pretrained_model_name_or_path or --model_config"),
        (["--model_config", "tiny", "--device_target", "CPU", "--mixed_precision", "bf16"], "--compile_only"),
        (["--model_config", "tiny", "--device_target", "CPU", "--jit_level", "O2"], "jit_level O2 needs an Ascend"),
    ],
)
def test_bad_bench_flags_fail_in_one_line(flags, message, capsys):
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_compares_the_csc_tuner_with_controlnet(tmp_path, capsys):
    from mindone.diffusers import ControlNetModel

    from mindscedit.tuners.csc_tuner import CSCTunerConfig, build_csc_tuner

    out = tmp_path / "rows.jsonl"
    argv = ["bench", "--model_config", "tiny", "--methods", "scedit_control,controlnet", "--batch_sizes", "2",
            "--resolution", "32", "--steps", "1", "--warmup", "0", "--dense_hint_kernel", "1",
            "--device_target", "CPU", "--mixed_precision", "fp16", "--json", str(out), "--compile_profile"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = {r["method"]: r for r in map(json.loads, open(out))}
    unet = build_unet(unet_preset("tiny"))
    csc = sum(p.size for p in build_csc_tuner(unet, CSCTunerConfig(dense_hint_kernel=1)).get_parameters())
    controlnet = sum(p.size for p in ControlNetModel.from_unet(unet).get_parameters())
    assert rows["scedit_control"]["trainable_params"] == csc and rows["scedit_control"]["dense_hint_kernel"] == 1
    assert rows["controlnet"]["trainable_params"] == controlnet
    for r in rows.values():
        assert r["peak_memory_mib"] > 0 and r["s_per_step"] > 0 and np.isfinite(r["loss"])
        assert r["mixed_precision"] == "fp16"
        phases = r["compile_phases_s"]  # the compile itself: inside the graph time, made of its phases
        assert {"total", "type_inference", "optimize", "optimize.opt_a", "task_emit"} <= set(phases)
        assert 0 < phases["total"] <= r["graph_s"]
        top_level = sum(v for k, v in phases.items() if "." not in k and k != "total")
        assert 0.5 * phases["total"] < top_level <= phases["total"] + 0.01
        assert f"compile phases (s), {r['method']} batch 2: total {phases['total']:.2f}" in printed
    assert "| controlnet | 2 |" in printed


def test_compile_phases_come_from_the_first_profile_only():
    profile = "\n".join([
        "noise before", "TotalTime = 3.5, [3]", "[type_inference]: 1.25", "[optimize]: 2.0, [2]",
        "    [opt_a]: 1.5, [4]", "        [Cycle 1]: 1.0, [45]", "    [opt_b]: 0.01", "[task_emit]: 0.25",
        "Sums", "    type_inference   :     1.25s : 35%", "TotalTime = 9.0, [1]", "[type_inference]: 9.0",
    ])
    first = {"total": 3.5, "type_inference": 1.25, "optimize": 2.0, "optimize.opt_a": 1.5, "task_emit": 0.25}
    assert compile_phases(profile) == first
    without_sums = "\n".join(l for l in profile.splitlines() if not l.startswith(("Sums", "    type_inference")))
    assert compile_phases(without_sums) == first
    assert compile_phases("no profile here") == {}
