"""PyTorch side of scripts/check_interop.sh: load mindscedit's weight files with diffusers, peft and
ms-swift, and compare the PyTorch UNet's outputs with the MindSpore ones (runs in a torch venv;
never imports mindspore).

stage1 WORK: base UNet, LoRA, kohya LoRA, DoRA, SC-Tuner (ms-swift tree) against WORK/ms_outputs.npz;
    then writes SC-Tuners from ms-swift itself (WORK/torch_swift) and their output (WORK/torch_reverse.npz).
stage2 WORK: the MindSpore output of those torch-written tuners (WORK/ms_reverse.npz) against torch's.
prodigy WORK: replays the gradients of WORK/prodigy.npz (interop_mindspore.py prodigy) through
    prodigyopt's Prodigy in float64 and compares weights, d, d_max, numerator and step count per call.
One `PASS|FAIL <check>: ...` line per check; exit 1 on any FAIL.
"""
import json
import os
import sys

import numpy as np
import torch

RTOL = 1e-4  # max |torch - mindspore| / max |mindspore|
MIN_EFFECT = 1e-2  # a tuner must move the output by at least this (relative), or the check proves nothing
STD = 0.05
failures = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def error_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def compare(name: str, got: np.ndarray, want: np.ndarray, base: np.ndarray = None) -> None:
    """torch output `got` vs MindSpore output `want`; with `base`, also that the tuner changes the output."""
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    ok, detail = diff <= RTOL * scale, f"max abs diff {diff:.2e} (max |out| {scale:.3f}, rel {diff / scale:.1e})"
    if base is not None:
        effect = float(np.abs(want - base).max())
        detail += f"; differs from base by {effect:.3f}"
        ok = ok and effect >= MIN_EFFECT * scale
    report(name, ok, detail)


def load_inputs(work: str):
    data = np.load(os.path.join(work, "inputs.npz"))
    return (torch.from_numpy(data["sample"]), torch.from_numpy(data["timestep"].astype(np.int64)),
            torch.from_numpy(data["encoder_hidden_states"]))


@torch.no_grad()
def predict(unet, inputs) -> np.ndarray:
    return unet(*inputs, return_dict=False)[0].numpy()


def load_unet(work: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(os.path.join(work, "tiny-sd"), subfolder="unet").eval()


def lora_output(work: str, inputs, folder: str, weight_name: str) -> np.ndarray:
    """The UNet output after diffusers' own `load_lora_weights` on a StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(work, "tiny-sd"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(os.path.join(work, folder), weight_name=weight_name, adapter_name="interop")
    loaded = sum(1 for n, _ in pipe.unet.named_parameters() if ".lora_A.interop." in n)
    if loaded == 0:
        raise RuntimeError(f"{folder}/{weight_name}: diffusers loaded no LoRA layer")
    return predict(pipe.unet.eval(), inputs)


def swift_output(model, inputs) -> np.ndarray:
    return predict(model.base_model if hasattr(model, "base_model") else model, inputs)


def skip_dims(config) -> list:
    """Channels of each decoder skip in decoder order (the encoder's skips reversed), from the UNet config."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    skips = [channels[0]]
    for b, ch in enumerate(channels):
        skips += [ch] * layers[b] + ([ch] if b < len(channels) - 1 else [])
    return skips[::-1]


def stage1(work: str) -> None:
    ms_out = dict(np.load(os.path.join(work, "ms_outputs.npz")))
    inputs = load_inputs(work)
    base = ms_out["base"]

    # 1. the same diffusers-format UNet folder, loaded by diffusers
    compare("base UNet (diffusers from_pretrained)", predict(load_unet(work), inputs), base)

    # 2. LoRA: diffusers/peft layout, kohya layout (converted by diffusers), DoRA
    for name, folder, weight_name, want in [
        ("LoRA diffusers layout (pipe.load_lora_weights)", "lora", "pytorch_lora_weights.safetensors", "lora"),
        ("LoRA kohya layout (pipe.load_lora_weights)", "kohya", "lora_kohya.safetensors", "lora"),
        ("DoRA diffusers layout (pipe.load_lora_weights)", "dora", "pytorch_lora_weights.safetensors", "dora"),
    ]:
        try:
            compare(name, lora_output(work, inputs, folder, weight_name), ms_out[want], base)
        except Exception as err:  # noqa: BLE001 - a loader's refusal is this check's result
            report(name, False, error_line(err))

    # 3. SC-Tuner: ms-swift loads our tree, and mindscedit must load what ms-swift writes
    from swift.tuners import SCETuningConfig, Swift

    for name, folder in [("SC-Tuner ms-swift tree (Swift.from_pretrained)", "sc_swift"),
                         ("SC-Tuner scepter file converted to ms-swift (Swift.from_pretrained)", "sc_from_scepter")]:
        try:
            model = Swift.from_pretrained(load_unet(work), os.path.join(work, folder))
            compare(name, swift_output(model, inputs), ms_out["sc"], base)
        except Exception as err:  # noqa: BLE001
            report(name, False, error_line(err))

    unet = load_unet(work)
    config = SCETuningConfig(dims=skip_dims(unet.config), target_modules=r"^up_blocks\.\d+\.resnets\.\d+$",
                             tuner_mode="decoder", down_ratio=0.5)
    model = Swift.prepare_model(unet, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "scetuner_default" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * STD)
    out = swift_output(model, inputs)
    model.save_pretrained(os.path.join(work, "torch_swift"), safe_serialization=True)
    np.savez(os.path.join(work, "torch_reverse.npz"), sc=out, base=predict(load_unet(work), inputs))


def stage2(work: str) -> None:
    torch_out = np.load(os.path.join(work, "torch_reverse.npz"))
    ms_out = np.load(os.path.join(work, "ms_reverse.npz"))
    with open(os.path.join(work, "torch_swift", "default", "adapter_config.json")) as f:
        ratio = json.load(f).get("down_ratio")
    compare(f"SC-Tuner written by ms-swift (down_ratio {ratio}) -> mindscedit apply_sc_tuners",
            ms_out["sc"], torch_out["sc"], torch_out["base"])


PRODIGY_RTOL = 1e-4  # fp32 against float64 over 30 steps; a wrong coefficient or order is off by far more


def prodigy(work: str) -> None:
    """Each setting's MindSpore trajectory (with a resume into a fresh optimizer in the middle)
    against one uninterrupted prodigyopt run fed the same gradients; a gated-off call is not
    passed to prodigyopt. Weights are rounded to fp32 after each step, as MindSpore stores them:
    d's numerator is built from p0 - p, differences of ~1e-6 that fp32 storage alone resolves
    to ~1 %."""
    try:
        from prodigyopt import Prodigy
    except ImportError as err:
        report("Prodigy against prodigyopt", False, f"{error_line(err)} (pip install prodigyopt)")
        return
    try:
        from importlib.metadata import version as installed
        version = installed("prodigyopt")
    except Exception:  # imported from a source tree
        version = "(source)"
    data = np.load(os.path.join(work, "prodigy.npz"))
    settings_list = list(json.loads(str(data["settings"])).items())
    for n, (name, settings) in enumerate(settings_list):
        i = 0
        params = []
        while f"{n}/start/{i}" in data:
            params.append(torch.nn.Parameter(torch.tensor(data[f"{n}/start/{i}"].astype(np.float64))))
            i += 1
        optimizer = Prodigy(params, lr=1.0, **settings)
        worst = dict(weights=0.0, d=0.0, d_max=0.0, d_numerator=0.0)
        problems = []
        for call in range(int(data["calls"])):
            key = f"{n}/{call}"
            if bool(data[f"{key}/apply"]):
                optimizer.param_groups[0]["lr"] = float(data[f"{key}/lr"])
                for j, p in enumerate(params):
                    p.grad = torch.tensor(data[f"{key}/grad/{j}"])
                optimizer.step()
                with torch.no_grad():
                    for p in params:
                        p.copy_(p.to(torch.float32).to(torch.float64))
            group = optimizer.param_groups[0]
            for j, p in enumerate(params):
                want, got = p.detach().numpy(), data[f"{key}/weight/{j}"].astype(np.float64)
                scale = max(float(np.abs(want).max()), 1e-2)
                worst["weights"] = max(worst["weights"], float(np.abs(got - want).max()) / scale)
            for field in ("d", "d_max", "d_numerator"):
                want, got = float(group[field]), float(data[f"{key}/{field}"])
                worst[field] = max(worst[field], abs(got - want) / max(abs(want), 1e-30))
            if int(data[f"{key}/k"]) != group["k"]:
                problems.append(f"call {call}: k {int(data[f'{key}/k'])} != prodigyopt's {group['k']}")
        d0 = settings.get("d0", 1e-6)
        moved = float(group["d"]) > 30 * d0  # otherwise the comparison proves little
        ok = not problems and moved and max(worst.values()) <= PRODIGY_RTOL
        detail = ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
        report(f"Prodigy ({name}) against prodigyopt {version}", ok,
               f"max rel diff {detail}; d {d0:g} -> {float(group['d']):.3g} in {group['k']} steps"
               + ("; " + problems[0] if problems else "") + ("" if moved else "; d did not move"))


if __name__ == "__main__":
    stage, work_dir = sys.argv[1], sys.argv[2]
    {"stage1": stage1, "stage2": stage2, "prodigy": prodigy}[stage](work_dir)
    sys.exit(1 if failures else 0)
