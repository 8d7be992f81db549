"""MindSpore side of scripts/check_interop.sh (runs in mindscedit's venv).

export WORK: fixed random inputs, random non-zero LoRA / DoRA / SC-Tuner weights written with
    mindscedit's own writers, and the MindSpore UNet's output for each, all under WORK:
      inputs.npz                      sample, timestep, encoder_hidden_states
      lora/pytorch_lora_weights.safetensors, dora/...   (save_lora, diffusers layout)
      lora_b/                         a second plain LoRA of lora's rank and modules but another
                                      alpha, for check_interop.sh's merge-lora --combination ties
      sc_adapter/                     (save_sc_tuners: what training writes)
      ms_outputs.npz                  base, lora, dora, sc
export_sdxl WORK: the same on the tiny SDXL UNet (WORK/tiny-sdxl), with SDXL's added conditions,
    under WORK/sdxl: inputs.npz (+ text_embeds, time_ids), lora/ (attention, feed-forward and the
    resnets' time_emb_proj), kohya_saved/ (save_lora's kohya layout: SDXL naming from the UNet
    config), sc_adapter/, ms_outputs.npz (base, lora, sc); te_lora/: a random LoRA of both text
    encoders (no MindSpore text-encoder LoRA exists; this file checks the names only).
import WORK: loads the SC-Tuners the PyTorch side wrote in ms-swift's layout (WORK/torch_swift)
    and writes the MindSpore UNet's output to WORK/ms_reverse.npz.
text WORK: for the tiny SD and SDXL pipelines (WORK/tiny-sd, WORK/tiny-sdxl), under WORK/text/<family>:
    emb.safetensors, pivotal tuning's new tokens for TOK as training adds them (add_new_tokens: random
    rows scaled to the table) and saves them (save_embeddings); te_lora/, random LoRA on every text
    encoder's attention projections as train_text_encoder injects it, written as training writes it
    (diffusers layout) and te_kohya.safetensors (kohya); outputs.npz: the prompt encoder's hidden
    states (and SDXL's pooled prompt) for TI_PROMPT with the new tokens, and for TE_PROMPT with and
    without the text-encoder LoRA.
prodigy WORK: runs GatedProdigy on random tensors under several settings (an lr schedule starting
    at 0, a zero-gradient step, a gated-off NaN step, a resume into a fresh optimizer) and writes
    every call's gradients and the resulting weights, d, d_max, numerator and k to WORK/prodigy.npz.
"""
import json
import math
import os
import sys

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from mindscedit.models.loading import load_components, load_unet  # noqa: E402
from mindscedit.sampling.adapters import apply_sc_tuners  # noqa: E402
from mindscedit.training.prodigy import GatedProdigy  # noqa: E402
from mindscedit.tuners.lora import (  # noqa: E402
    ATTENTION_TARGETS, FEED_FORWARD_TARGETS, TEXT_ENCODER_TARGETS, LoRAConfig, inject_lora, lora_layers, lora_modules,
    save_lora, set_adapters,
)
from mindscedit.tuners.textual_inversion import NewTokens, new_rows_of, save_embeddings  # noqa: E402
from mindscedit.tuners.lora.formats import LoraModule  # noqa: E402
from mindscedit.tuners.lora.io import write_lora_file  # noqa: E402
from mindscedit.tuners.sc_tuner import SCTunerConfig, get_sc_tuners, inject_sc_tuners, save_sc_tuners  # noqa: E402

STD = 0.05  # small random tuner weights: outputs clearly differ from the base model's


class Denoise(nn.Cell):
    """The UNet's noise prediction; a new instance compiles a new graph."""

    def __init__(self, unet):
        super().__init__(auto_prefix=False)
        self.unet = unet

    def construct(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def run(unet, inputs) -> np.ndarray:
    net = Denoise(unet)
    net.set_train(False)
    return net(*(ms.Tensor(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states"))).asnumpy()


class DenoiseXL(nn.Cell):
    """The SDXL UNet's noise prediction with its added conditions (pooled text embeds, time ids)."""

    def __init__(self, unet):
        super().__init__(auto_prefix=False)
        self.unet = unet

    def construct(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


SDXL_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")


def run_sdxl(unet, inputs) -> np.ndarray:
    net = DenoiseXL(unet)
    net.set_train(False)
    return net(*(ms.Tensor(inputs[k]) for k in SDXL_INPUTS)).asnumpy()


def randomise(param, rng, base=None) -> None:
    noise = rng.normal(0.0, STD, param.shape).astype(np.float32)
    param.set_data(ms.Tensor(noise if base is None else base * (1.0 + noise)))


def export(work: str, model: str) -> None:
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([37, 801], np.int32),
        "encoder_hidden_states": rng.standard_normal((2, 7, 32)).astype(np.float32),
    }
    np.savez(os.path.join(work, "inputs.npz"), **inputs)
    outputs = {"base": run(load_unet(model), inputs)}

    # LoRA (alpha != rank, attention + feed-forward) and DoRA as two adapters of one UNet.
    unet = load_unet(model)
    targets = ATTENTION_TARGETS + FEED_FORWARD_TARGETS
    configs = {"lora": LoRAConfig(rank=4, alpha=8, target_modules=targets, adapter_name="lora"),
               "dora": LoRAConfig(rank=4, alpha=4, target_modules=targets, adapter_name="dora", use_dora=True)}
    for name, config in configs.items():
        inject_lora(unet, config)
        for layer in lora_layers(unet).values():
            randomise(layer.lora_A[name].weight, rng)
            randomise(layer.lora_B[name].weight, rng)
            if config.use_dora:
                mag = layer.lora_magnitude_vector[name].weight
                randomise(mag, rng, base=mag.asnumpy())
        save_lora(unet, os.path.join(work, name), config)
    net = Denoise(unet)
    net.set_train(False)
    args = [ms.Tensor(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states")]
    for name in configs:
        set_adapters(unet, [name])  # the other adapter off: a Parameter switch, same graph
        outputs[name] = net(*args).asnumpy()

    unet = load_unet(model)
    inject_sc_tuners(unet, SCTunerConfig())
    for tuner in get_sc_tuners(unet).values():
        for _, p in tuner.tuner_op.parameters_and_names():
            randomise(p, rng)
    save_sc_tuners(unet, os.path.join(work, "sc_adapter"))
    outputs["sc"] = run(unet, inputs)
    np.savez(os.path.join(work, "ms_outputs.npz"), **outputs)
    second_lora(work, model, targets)


def second_lora(work: str, model: str, targets) -> None:
    """A partner for `lora` in a ties merge: ties needs equal ranks and the same modules. Another
    alpha (scale 0.5 against 2) so that each adapter's sqrt(weight * scale) coefficient matters; its
    own generator, so the files written before stay as they were."""
    rng = np.random.default_rng(1)
    unet = load_unet(model)
    config = LoRAConfig(rank=4, alpha=2, target_modules=targets, adapter_name="lora_b")
    inject_lora(unet, config)
    for layer in lora_layers(unet).values():
        randomise(layer.lora_A["lora_b"].weight, rng)
        randomise(layer.lora_B["lora_b"].weight, rng)
    save_lora(unet, os.path.join(work, "lora_b"), config)


def export_sdxl(work: str, model: str) -> None:
    model = os.path.join(work, "tiny-sdxl")
    out_dir = os.path.join(work, "sdxl")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(model, "unet", "config.json")) as f:
        config = json.load(f)
    rng = np.random.default_rng(2)
    inputs = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([37, 801], np.int32),
        "encoder_hidden_states": rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32),
        "text_embeds": rng.standard_normal((2, config["projection_class_embeddings_input_dim"]
                                            - 6 * config["addition_time_embed_dim"])).astype(np.float32),
        "time_ids": np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]], np.float32),
    }
    np.savez(os.path.join(out_dir, "inputs.npz"), **inputs)
    outputs = {"base": run_sdxl(load_unet(model), inputs)}

    unet = load_unet(model)
    lora = LoRAConfig(rank=4, alpha=8, target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS + ["time_emb_proj"])
    inject_lora(unet, lora)
    for layer in lora_layers(unet).values():
        randomise(layer.lora_A["default"].weight, rng)
        randomise(layer.lora_B["default"].weight, rng)
    save_lora(unet, os.path.join(out_dir, "lora"), lora)
    save_lora(unet, os.path.join(out_dir, "kohya_saved"), lora, layout="kohya")
    outputs["lora"] = run_sdxl(unet, inputs)

    unet = load_unet(model)
    inject_sc_tuners(unet, SCTunerConfig())
    for tuner in get_sc_tuners(unet).values():
        for _, p in tuner.tuner_op.parameters_and_names():
            randomise(p, rng)
    save_sc_tuners(unet, os.path.join(out_dir, "sc_adapter"))
    outputs["sc"] = run_sdxl(unet, inputs)
    np.savez(os.path.join(out_dir, "ms_outputs.npz"), **outputs)
    write_lora_file(text_encoder_lora(model, rng), os.path.join(out_dir, "te_lora"))


def text_encoder_lora(model: str, rng, rank: int = 4, alpha: float = 8.0) -> dict:
    """Random LoRA modules on every attention projection and MLP layer of both text encoders."""
    modules = {}
    for component in ("text_encoder", "text_encoder_2"):
        with open(os.path.join(model, component, "config.json")) as f:
            config = json.load(f)
        width, inner = config["hidden_size"], config["intermediate_size"]
        shapes = {f"self_attn.{p}": (width, width) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        shapes.update({"mlp.fc1": (width, inner), "mlp.fc2": (inner, width)})
        for layer in range(config["num_hidden_layers"]):
            for name, (fan_in, fan_out) in shapes.items():
                down = rng.normal(0.0, STD, (rank, fan_in)).astype(np.float32)
                up = rng.normal(0.0, STD, (fan_out, rank)).astype(np.float32)
                modules[f"{component}.text_model.encoder.layers.{layer}.{name}"] = LoraModule(down, up, alpha)
    return modules


TI_PROMPT = "a photo of <s0><s1> dog"  # check_interop.py's too
TE_PROMPT = "a photo of a dog"


def prompt_outputs(components, prompt: str, name: str) -> dict:
    family = components.family
    ids = ms.Tensor(family.prompt_tokenizer(components)(prompt)[None])
    out = family.prompt_encoder(components)(ids)
    out = out if isinstance(out, tuple) else (out,)
    return {f"{name}_{kind}": o.asnumpy() for kind, o in zip(("hidden", "pooled"), out)}


def text(work: str, model: str) -> None:
    rng = np.random.default_rng(5)
    for family in ("sd", "sdxl"):
        model = os.path.join(work, "tiny-sd" if family == "sd" else "tiny-sdxl")
        out_dir = os.path.join(work, "text", family)
        os.makedirs(out_dir, exist_ok=True)
        outputs = prompt_outputs(load_components(model), TE_PROMPT, "base")

        components = load_components(model)
        new_tokens = NewTokens.for_abstractions("TOK", 2)
        components.add_new_tokens(new_tokens, seed=3)
        save_embeddings(os.path.join(out_dir, "emb.safetensors"), new_rows_of(components.text_encoders), new_tokens)
        outputs.update(prompt_outputs(components, TI_PROMPT, "ti"))

        components = load_components(model)
        config = LoRAConfig(rank=4, alpha=8, target_modules=TEXT_ENCODER_TARGETS)
        modules = {}
        for component, encoder in zip(components.family.text_encoders, components.text_encoders):
            inject_lora(encoder, config)
            for layer in lora_layers(encoder).values():
                randomise(layer.lora_A["default"].weight, rng)
                randomise(layer.lora_B["default"].weight, rng)
            modules.update(lora_modules(encoder, "default", component))
        write_lora_file(modules, os.path.join(out_dir, "te_lora"))
        write_lora_file(modules, os.path.join(out_dir, "te_kohya.safetensors"), "kohya", family)
        outputs.update(prompt_outputs(components, TE_PROMPT, "te"))
        np.savez(os.path.join(out_dir, "outputs.npz"), **outputs)


def reverse(work: str, model: str) -> None:
    inputs = dict(np.load(os.path.join(work, "inputs.npz")))
    unet = load_unet(model)
    apply_sc_tuners(unet, os.path.join(work, "torch_swift"))  # dims and down_ratio from the file
    np.savez(os.path.join(work, "ms_reverse.npz"), sc=run(unet, inputs))


# prodigyopt's keyword arguments; GatedProdigy takes the same ones. Each lets d move far from d0.
PRODIGY_SETTINGS = {
    "decoupled weight decay 0.01": dict(weight_decay=0.01),
    "coupled weight decay, bias correction, growth_rate 1.3": dict(weight_decay=0.05, decouple=False,
                                                                   use_bias_correction=True, growth_rate=1.3),
    "safeguard warmup, d_coef 2, beta3 0.95": dict(weight_decay=0.1, safeguard_warmup=True, d_coef=2.0, beta3=0.95),
    "betas (0, 0.99), bias correction": dict(betas=(0.0, 0.99), weight_decay=0.1, use_bias_correction=True),
}
PRODIGY_CALLS, ZERO_CALL, SKIPPED_CALL, RESUME_CALL = 30, 1, 7, 15


def prodigy(work: str, model: str) -> None:
    """Records GatedProdigy's trajectory for the PyTorch side to replay through prodigyopt."""
    lrs = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * i / PRODIGY_CALLS)) for i in range(PRODIGY_CALLS)]
    out = {"settings": np.array(json.dumps(PRODIGY_SETTINGS))}
    for n, settings in enumerate(PRODIGY_SETTINGS.values()):
        rng = np.random.default_rng(n)
        weights = [rng.standard_normal((3, 4)), np.zeros(6), rng.standard_normal((2, 3, 2))]  # LoRA's B starts at 0
        weights = [w.astype(np.float32) for w in weights]
        targets = [rng.standard_normal(w.shape).astype(np.float32) for w in weights]
        params = [ms.Parameter(ms.Tensor(w), name=f"w{i}") for i, w in enumerate(weights)]
        optimizer = GatedProdigy(params, lrs[0], **settings)
        for i, w in enumerate(weights):
            out[f"{n}/start/{i}"] = w
        applied = 0
        for call in range(PRODIGY_CALLS):
            if call == RESUME_CALL:  # a fresh optimizer on the state a checkpoint holds goes on in its place
                slots = {k: [p.asnumpy().copy() for p in ps] for k, ps in optimizer.state_slots().items()}
                scalars = {k: p.asnumpy().copy() for k, p in optimizer.scalar_state().items()}
                params = [ms.Parameter(ms.Tensor(p.asnumpy().copy()), name=f"w{i}") for i, p in enumerate(params)]
                optimizer = GatedProdigy(params, lrs[0], **settings)
                for k, ps in optimizer.state_slots().items():
                    for p, value in zip(ps, slots[k]):
                        p.set_data(ms.Tensor(value))
                for k, p in optimizer.scalar_state().items():
                    p.set_data(ms.Tensor(scalars[k]))
            current = [p.asnumpy().copy() for p in params]
            grads = [(w - t + 0.1 * rng.standard_normal(w.shape)).astype(np.float32) for w, t in zip(current, targets)]
            if call == ZERO_CALL:
                grads = [np.zeros_like(g) for g in grads]
            apply = call != SKIPPED_CALL
            if not apply:
                grads[0][1, 2] = np.nan
            grads[-1] = grads[-1].astype(np.float16)  # as with mixed precision
            factor = 0.5 if call % 3 == 0 else 1.0  # loss-scale unscaling and clipping
            optimizer.learning_rate.set_data(ms.Tensor(lrs[applied], ms.float32))
            optimizer(tuple(ms.Tensor(g) for g in grads), ms.Tensor(apply), ms.Tensor(factor, ms.float32))
            key = f"{n}/{call}"
            out[f"{key}/apply"], out[f"{key}/lr"] = np.array(apply), np.array(lrs[applied])
            for i, (g, p) in enumerate(zip(grads, params)):
                out[f"{key}/grad/{i}"] = g.astype(np.float64) * factor
                out[f"{key}/weight/{i}"] = p.asnumpy().copy()  # asnumpy() may share the tensor's memory
            for name, value in (("d", optimizer.d), ("d_max", optimizer.d_max), ("d_numerator", optimizer.d_numerator),
                                ("k", optimizer.k)):
                out[f"{key}/{name}"] = value.asnumpy().copy()
            applied += apply
    out["calls"] = np.array(PRODIGY_CALLS)
    np.savez(os.path.join(work, "prodigy.npz"), **out)


if __name__ == "__main__":
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    command, work = sys.argv[1], sys.argv[2]
    model = os.path.join(work, "tiny-sd")
    {"export": export, "export_sdxl": export_sdxl, "import": reverse, "prodigy": prodigy, "text": text}[command](
        work, model)
