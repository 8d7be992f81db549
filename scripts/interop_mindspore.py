"""MindSpore side of scripts/check_interop.sh (runs in mindscedit's venv).

export WORK: fixed random inputs, random non-zero LoRA / DoRA / SC-Tuner weights written with
    mindscedit's own writers, and the MindSpore UNet's output for each, all under WORK:
      inputs.npz                      sample, timestep, encoder_hidden_states
      lora/pytorch_lora_weights.safetensors, dora/...   (save_lora, diffusers layout)
      sc_adapter/                     (save_sc_tuners: what training writes)
      ms_outputs.npz                  base, lora, dora, sc
import WORK: loads the SC-Tuners the PyTorch side wrote in ms-swift's layout (WORK/torch_swift)
    and writes the MindSpore UNet's output to WORK/ms_reverse.npz.
"""
import os
import sys

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from mindscedit.models.loading import load_unet  # noqa: E402
from mindscedit.sampling.adapters import apply_sc_tuners  # noqa: E402
from mindscedit.tuners.lora import (  # noqa: E402
    ATTENTION_TARGETS, FEED_FORWARD_TARGETS, LoRAConfig, inject_lora, lora_layers, save_lora, set_adapters,
)
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


def reverse(work: str, model: str) -> None:
    inputs = dict(np.load(os.path.join(work, "inputs.npz")))
    unet = load_unet(model)
    apply_sc_tuners(unet, os.path.join(work, "torch_swift"))  # dims and down_ratio from the file
    np.savez(os.path.join(work, "ms_reverse.npz"), sc=run(unet, inputs))


if __name__ == "__main__":
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    command, work = sys.argv[1], sys.argv[2]
    model = os.path.join(work, "tiny-sd")
    {"export": export, "import": reverse}[command](work, model)
