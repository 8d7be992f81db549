"""The three fine-tuning methods: what each makes trainable and what each saves.

vanilla: the whole UNet; saves the UNet in diffusers format (unet/).
lora:    LoRA adapters on attention (and optionally feed-forward) layers; saves
         pytorch_lora_weights.safetensors (diffusers/peft layout).
scedit:  one SC-Tuner per decoder skip; saves adapter_model.safetensors + adapter_config.json
         (ms-swift layout). The encoder is cut out of backward.
"""
import os
from typing import List

import mindspore as ms

from ..config import TrainConfig
from ..tuners.lora import LoRAConfig, inject_lora, save_lora
from ..tuners.sc_tuner import SCTunerConfig, inject_sc_tuners, save_sc_tuners, sc_tuner_parameters


class Method:
    name = ""

    def __init__(self, config: TrainConfig):
        self.config = config

    def prepare(self, unet) -> List[ms.Parameter]:
        """Inject what the method adds; return the parameters to train (everything else is frozen)."""
        raise NotImplementedError

    def save_weights(self, unet, folder: str) -> None:
        raise NotImplementedError


class Vanilla(Method):
    name = "vanilla"

    def prepare(self, unet):
        return list(unet.get_parameters())

    def save_weights(self, unet, folder):
        unet.save_pretrained(os.path.join(folder, "unet"))


class LoRA(Method):
    name = "lora"

    @property
    def lora_config(self) -> LoRAConfig:
        c = self.config
        return LoRAConfig(rank=c.rank, alpha=c.lora_alpha, target_modules=list(c.lora_target_modules))

    def prepare(self, unet):
        return inject_lora(unet, self.lora_config)

    def save_weights(self, unet, folder):
        save_lora(unet, folder, self.lora_config)


class SCEdit(Method):
    name = "scedit"

    @property
    def tuner_config(self) -> SCTunerConfig:
        return SCTunerConfig(down_ratio=self.config.down_ratio)

    def prepare(self, unet):
        inject_sc_tuners(unet, self.tuner_config)
        return sc_tuner_parameters(unet)

    def save_weights(self, unet, folder):
        save_sc_tuners(unet, folder, self.tuner_config)


METHODS = {m.name: m for m in (Vanilla, LoRA, SCEdit)}


def get_method(config: TrainConfig) -> Method:
    return METHODS[config.method](config)


def freeze_all_but(cells, trainable: List[ms.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for cell in cells:
        for p in cell.get_parameters():
            p.requires_grad = id(p) in keep
