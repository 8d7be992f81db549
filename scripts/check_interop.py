"""PyTorch side of scripts/check_interop.sh: load mindscedit's weight files with diffusers, peft and
ms-swift, and compare the PyTorch UNet's outputs with the MindSpore ones (runs in a torch venv;
never imports mindspore).

stage1 WORK: base UNet, LoRA, kohya LoRA, DoRA, SC-Tuner (ms-swift tree) against WORK/ms_outputs.npz;
    then writes SC-Tuners from ms-swift itself (WORK/torch_swift) and their output (WORK/torch_reverse.npz).
sdxl WORK: the tiny SDXL UNet (WORK/tiny-sdxl, added conditions text_embeds / time_ids): base,
    LoRA (diffusers layout, kohya's SDXL layout from convert and from save_lora, and the kohya file
    converted back), SC-Tuners (ms-swift tree, scepter converted to ms-swift) against WORK/sdxl/ms_outputs.npz;
    text-encoder LoRA names: diffusers' and kohya's (lora_te1_ / lora_te2_) files of WORK/sdxl/te_lora
    put every tensor on the same layer of text_encoder / text_encoder_2, with the same scale.
stage2 WORK: the MindSpore output of those torch-written tuners (WORK/ms_reverse.npz) against torch's.
ties WORK: peft's add_weighted_adapter(combination_type="ties") on WORK/lora and WORK/lora_b against
    the file `mindscedit merge-lora --combination ties` wrote from them (WORK/lora_ties).
text WORK: per tiny pipeline (SD, SDXL), against WORK/text/<family>/outputs.npz: pivotal tuning's
    embeddings file through diffusers' load_textual_inversion (clip_l, and clip_g for SDXL), and
    the text-encoder LoRA (diffusers and kohya layouts) through load_lora_weights, compared on
    encode_prompt's hidden states (and SDXL's pooled prompt). diffusers puts LoRA on
    `text_model...` layers, which transformers 5's CLIPTextModel no longer has: those checks SKIP
    there, and check_interop.sh runs this stage again on transformers 4 (a --target overlay).
prodigy WORK: replays the gradients of WORK/prodigy.npz (interop_mindspore.py prodigy) through
    prodigyopt's Prodigy in float64 and compares weights, d, d_max, numerator and step count per call.
One `PASS|FAIL <check>: ...` line per check; exit 1 on any FAIL.
"""
import json
import os
import re
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


def sdxl(work: str) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from swift.tuners import Swift

    folder, model_dir = os.path.join(work, "sdxl"), os.path.join(work, "tiny-sdxl")
    ms_out = dict(np.load(os.path.join(folder, "ms_outputs.npz")))
    data = np.load(os.path.join(folder, "inputs.npz"))
    args = (torch.from_numpy(data["sample"]), torch.from_numpy(data["timestep"].astype(np.int64)),
            torch.from_numpy(data["encoder_hidden_states"]))
    added = {"text_embeds": torch.from_numpy(data["text_embeds"]), "time_ids": torch.from_numpy(data["time_ids"])}

    @torch.no_grad()
    def predict_xl(unet) -> np.ndarray:
        return unet(*args, added_cond_kwargs=added, return_dict=False)[0].numpy()

    def load_xl():
        return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()

    base = ms_out["base"]
    compare("SDXL base UNet (diffusers from_pretrained, text_embeds + time_ids)", predict_xl(load_xl()), base)

    def pipeline_lora(sub: str, weight_name: str) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
        pipe.load_lora_weights(os.path.join(folder, sub), weight_name=weight_name, adapter_name="interop")
        return lora_count_and_output(pipe.unet, f"{sub}/{weight_name}")

    def adapter_lora(sub: str, weight_name: str) -> np.ndarray:
        unet = load_xl()
        unet.load_lora_adapter(os.path.join(folder, sub), weight_name=weight_name, prefix="unet",
                               adapter_name="interop")
        return lora_count_and_output(unet, f"{sub}/{weight_name}")

    def lora_count_and_output(unet, what: str) -> np.ndarray:
        loaded = sum(1 for n, _ in unet.named_parameters() if ".lora_A.interop." in n)
        wanted = sum(1 for n in read_keys(os.path.join(folder, what)) if n.endswith(("lora_A.weight", "lora_down.weight")))
        if loaded != wanted:
            raise RuntimeError(f"{what}: diffusers loaded {loaded} LoRA layers, the file has {wanted}")
        return predict_xl(unet.eval())

    for name, fn, sub, weight_name in [
        ("SDXL LoRA diffusers layout (StableDiffusionXLPipeline.load_lora_weights)", pipeline_lora, "lora",
         "pytorch_lora_weights.safetensors"),
        ("SDXL LoRA diffusers layout (UNet2DConditionModel.load_lora_adapter)", adapter_lora, "lora",
         "pytorch_lora_weights.safetensors"),
        ("SDXL LoRA kohya SDXL layout from convert (load_lora_weights)", pipeline_lora, "kohya",
         "lora_kohya.safetensors"),
        ("SDXL LoRA kohya SDXL layout from save_lora (load_lora_weights)", pipeline_lora, "kohya_saved",
         "lora_kohya.safetensors"),
        ("SDXL LoRA kohya -> diffusers by convert (load_lora_weights)", pipeline_lora, "lora_back",
         "pytorch_lora_weights.safetensors"),
    ]:
        try:
            compare(name, fn(sub, weight_name), ms_out["lora"], base)
        except Exception as err:  # noqa: BLE001 - a loader's refusal is this check's result
            report(name, False, error_line(err))

    for name, sub in [("SDXL SC-Tuner ms-swift tree (Swift.from_pretrained)", "sc_swift"),
                      ("SDXL SC-Tuner scepter file converted to ms-swift (Swift.from_pretrained)", "sc_from_scepter")]:
        try:
            model = Swift.from_pretrained(load_xl(), os.path.join(folder, sub))
            compare(name, predict_xl(model.base_model if hasattr(model, "base_model") else model), ms_out["sc"], base)
        except Exception as err:  # noqa: BLE001
            report(name, False, error_line(err))


def sdxl_text_encoders(work: str) -> None:
    """Text-encoder LoRA names. mindscedit and kohya name text-encoder layers as transformers 4's
    CLIPTextModel (and mindone's) does, `text_model.encoder...`; transformers 5 dropped the
    `text_model` level, so with it diffusers cannot put either file on the encoders (a SKIP line).
    diffusers' own kohya converter is checked on the names in any case."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors import safe_open

    folder = os.path.join(work, "sdxl")
    with safe_open(os.path.join(folder, "te_lora", "pytorch_lora_weights.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(os.path.join(folder, "te_kohya", "lora_kohya.safetensors"), framework="pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}

    name = "SDXL text-encoder LoRA kohya lora_te1_/lora_te2_ names (diffusers' kohya converter)"
    try:
        converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
        renamed = {}
        for key, value in converted.items():  # diffusers' legacy names -> peft's
            key = re.sub(r"\.to_(q|k|v)_lora\.(down|up)\.weight$", r".\1_proj.lora_\2.weight", key)
            key = re.sub(r"\.to_out_lora\.(down|up)\.weight$", r".out_proj.lora_\1.weight", key)
            key = re.sub(r"\.lora_linear_layer\.(down|up)\.weight$", r".lora_\1.weight", key)
            renamed[key.replace("lora_down", "lora_A").replace("lora_up", "lora_B")] = value
        problems = sorted(set(renamed) ^ set(tensors))
        problems += [k for k in renamed if k in tensors and not torch.equal(renamed[k], tensors[k])]
        problems += [k for k, a in alphas.items() if a != meta[k.split(".", 1)[0] + ".lora_alpha"]]
        report(name, not problems, f"{len(renamed) // 2} layers, same names, tensors and alphas as the diffusers-layout file"
               if not problems else f"{len(problems)} differ, e.g. {problems[0]}")
    except Exception as err:  # noqa: BLE001
        report(name, False, error_line(err))

    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(work, "tiny-sdxl"))
    if not hasattr(pipe.text_encoder, "text_model"):
        import transformers

        print(f"SKIP SDXL text-encoder LoRA on the encoders: transformers {transformers.__version__}'s CLIPTextModel "
              "has no `text_model` level (the layer names of transformers 4, mindone and kohya)", flush=True)
        return
    for name, sub, weight_name in [
        ("SDXL text-encoder LoRA diffusers layout (load_lora_weights)", "te_lora", "pytorch_lora_weights.safetensors"),
        ("SDXL text-encoder LoRA kohya lora_te1_/lora_te2_ (load_lora_weights)", "te_kohya", "lora_kohya.safetensors"),
    ]:
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(work, "tiny-sdxl"))
            pipe.load_lora_weights(os.path.join(folder, sub), weight_name=weight_name, adapter_name="interop")
            worst, count = 0.0, 0
            for key, value in tensors.items():
                if not key.endswith("lora_A.weight"):
                    continue
                component, path = key[: -len(".lora_A.weight")].split(".", 1)
                layer = getattr(pipe, component).get_submodule(path)
                for got, want in ((layer.lora_A["interop"].weight, value),
                                  (layer.lora_B["interop"].weight, tensors[key.replace("lora_A", "lora_B")])):
                    worst = max(worst, float((got.detach() - want).abs().max()))
                scale = meta[f"{component}.lora_alpha"] / meta[f"{component}.r"]
                if abs(layer.scaling["interop"] - scale) > 1e-6:
                    raise RuntimeError(f"{component}.{path}: scaling {layer.scaling['interop']}, the file's {scale}")
                count += 1
            report(name, worst == 0.0, f"{count} layers of text_encoder and text_encoder_2 hold the file's A and B "
                   f"(max abs diff {worst:.1e}) with scale alpha/r")
        except Exception as err:  # noqa: BLE001
            report(name, False, error_line(err))


def read_keys(file: str) -> list:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return list(f.keys())


# check_interop.sh's merge-lora options
TIES_WEIGHTS, TIES_DENSITY, TIES_SIGN = [0.7, 0.3], 0.5, "total"
TIES_RTOL = 1e-5  # both compute in fp32 or better; a wrong coefficient, prune or sign rule is off by far more


def read_lora(folder: str):
    """({module path: (A, B)}, peft LoraConfig) of a diffusers-layout file mindscedit wrote; the config
    (rank, alpha, exact module paths, patterns) comes from the `lora_adapter_metadata` diffusers reads."""
    from peft import LoraConfig
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "pytorch_lora_weights.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = {}
    for key, value in tensors.items():  # unet.<path>.lora_A.weight
        path, kind, _ = key[len("unet."):].rsplit(".", 2)
        modules.setdefault(path, {})[kind] = value
    config = LoraConfig(**{k: meta[f"unet.{k}"] for k in ("r", "lora_alpha", "target_modules", "rank_pattern",
                                                          "alpha_pattern")})
    return {p: (m["lora_A"], m["lora_B"]) for p, m in modules.items()}, config


def load_adapter(model, name: str, modules: dict) -> None:
    """Copy a file's A and B into peft's adapter `name`; every module of the file must find its layer."""
    layers = model.base_model.model
    with torch.no_grad():
        for path, (a, b) in modules.items():
            layer = layers.get_submodule(path)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    injected = sum(1 for n, _ in model.named_parameters() if f".lora_A.{name}." in n)
    if injected != len(modules):
        raise RuntimeError(f"peft injected {injected} layers for adapter '{name}', the file has {len(modules)}")


def merged_deltas(model, name: str, paths) -> dict:
    """{path: (A, B, scaling * B A)} of peft adapter `name`, in float64."""
    out = {}
    for path in paths:
        layer = model.base_model.model.get_submodule(path)
        a, b = layer.lora_A[name].weight.detach().double(), layer.lora_B[name].weight.detach().double()
        out[path] = (a, b, layer.scaling[name] * b @ a)
    return out


def ties(work: str) -> None:
    """peft merges A and B separately (magnitude prune by density per tensor, sign election, disjoint
    mean with coefficients sqrt(w * scaling)); mindscedit claims the same, so A, B and the update B A
    must all agree, not just the update. The linear merge of the same adapters shows that pruning
    and sign election did something, else the check proves little."""
    import peft
    from peft import get_peft_model

    name = f"merge-lora ties against peft {peft.__version__} add_weighted_adapter"
    try:
        mods_a, config_a = read_lora(os.path.join(work, "lora"))
        mods_b, config_b = read_lora(os.path.join(work, "lora_b"))
        mine, mine_config = read_lora(os.path.join(work, "lora_ties"))
        # adapter names that are not substrings of peft's "lora_" prefix (peft warns about those)
        model = get_peft_model(load_unet(work), config_a, adapter_name="first")
        model.add_adapter("second", config_b)
        load_adapter(model, "first", mods_a)
        load_adapter(model, "second", mods_b)
        for kind in ("ties", "linear"):
            model.add_weighted_adapter(["first", "second"], TIES_WEIGHTS, kind, combination_type=kind,
                                       density=TIES_DENSITY, majority_sign_method=TIES_SIGN)
        theirs, linear = merged_deltas(model, "ties", mods_a), merged_deltas(model, "linear", mods_a)
    except Exception as err:  # noqa: BLE001 - a loader's or peft's refusal is this check's result
        report(name, False, error_line(err))
        return
    if set(mine) != set(theirs):
        report(name, False, f"merged file has {len(mine)} modules, peft {len(theirs)}")
        return
    worst = dict(update=0.0, A=0.0, B=0.0)
    effect = 1.0
    for path, (a, b, delta) in theirs.items():
        my_a, my_b = mine[path][0].double(), mine[path][1].double()
        scaling = mine_config.alpha_pattern.get(path, mine_config.lora_alpha) / my_a.shape[0]
        for key, got, want in (("update", scaling * my_b @ my_a, delta), ("A", my_a, a), ("B", my_b, b)):
            diff = float((got - want).abs().max()) / float(want.abs().max())
            worst[key] = max(worst[key], diff)
        effect = min(effect, float((delta - linear[path][2]).abs().max()) / float(delta.abs().max()))
    kept = sum(int((a != 0).sum()) for a, _, _ in theirs.values()) / sum(a.numel() for a, _, _ in theirs.values())
    ok = max(worst.values()) <= TIES_RTOL and effect >= MIN_EFFECT
    report(name, ok, f"{len(theirs)} modules, weights {TIES_WEIGHTS}, density {TIES_DENSITY}, {TIES_SIGN}: "
           "max rel diff " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
           + f"; A entries kept {kept:.2f}; differs from linear by >= {effect:.2f} (rel)")


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


TI_PROMPT, TE_PROMPT = "a photo of <s0><s1> dog", "a photo of a dog"  # interop_mindspore.py's


def encoded(pipe, prompt: str, family: str) -> list:
    with torch.no_grad():
        out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    kept = (out[0],) if family == "sd" else (out[0], out[2])  # SDXL: hidden states, pooled
    return [o.float().numpy() for o in kept]


def compare_encoded(name: str, got: list, want: dict, prefix: str, base: dict = None) -> None:
    for kind, value in zip(("hidden", "pooled"), got):
        compare(f"{name}, {kind}", value, want[f"{prefix}_{kind}"],
                base[f"base_{kind}"] if base is not None else None)


def text(work: str) -> None:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    versions = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    for family, folder, pipeline in (("sd", "tiny-sd", StableDiffusionPipeline),
                                     ("sdxl", "tiny-sdxl", StableDiffusionXLPipeline)):
        out_dir = os.path.join(work, "text", family)
        want = dict(np.load(os.path.join(out_dir, "outputs.npz")))
        label = family.upper()

        name = f"{label} pivotal-tuning embeddings (load_textual_inversion; {versions})"
        try:
            pipe = pipeline.from_pretrained(os.path.join(work, folder))
            state = load_file(os.path.join(out_dir, "emb.safetensors"))
            pairs = [("clip_l", pipe.text_encoder, pipe.tokenizer)]
            if family == "sdxl":
                pairs.append(("clip_g", pipe.text_encoder_2, pipe.tokenizer_2))
            for key, encoder, tokenizer in pairs:
                pipe.load_textual_inversion(state[key], token=["<s0>", "<s1>"], text_encoder=encoder,
                                            tokenizer=tokenizer)
            compare_encoded(name, encoded(pipe, TI_PROMPT, family), want, "ti")
        except Exception as err:  # noqa: BLE001
            report(name, False, error_line(err))

        probe = pipeline.from_pretrained(os.path.join(work, folder))
        if not hasattr(probe.text_encoder, "text_model"):
            print(f"SKIP {label} text-encoder LoRA (load_lora_weights; {versions}): this CLIPTextModel has no "
                  "`text_model` level (the layer names of transformers 4, mindone and kohya)", flush=True)
            continue
        for layout, weights in (("diffusers layout", ("te_lora", "pytorch_lora_weights.safetensors")),
                                ("kohya layout", (".", "te_kohya.safetensors"))):
            name = f"{label} text-encoder LoRA, {layout} (load_lora_weights; {versions})"
            try:
                pipe = pipeline.from_pretrained(os.path.join(work, folder))
                pipe.load_lora_weights(os.path.join(out_dir, weights[0]), weight_name=weights[1])
                compare_encoded(name, encoded(pipe, TE_PROMPT, family), want, "te", base=want)
            except Exception as err:  # noqa: BLE001
                report(name, False, error_line(err))


if __name__ == "__main__":
    stage, work_dir = sys.argv[1], sys.argv[2]
    {"stage1": stage1, "stage2": stage2, "sdxl": lambda w: (sdxl(w), sdxl_text_encoders(w)), "ties": ties, "prodigy": prodigy,
     "text": text}[stage](work_dir)
    sys.exit(1 if failures else 0)
