"""The three fine-tuning methods: what each makes trainable and what each saves.

vanilla: the whole UNet; saves the UNet in diffusers format (unet/).
lora:    LoRA adapters on attention (and optionally feed-forward) layers; saves
         pytorch_lora_weights.safetensors (diffusers/peft layout).
scedit:  one SC-Tuner per decoder skip; saves adapter_model.safetensors + adapter_config.json
         (ms-swift layout). The encoder is cut out of backward.
scedit_control: a CSC-Tuner for one condition (canny, depth, ...); saves csc_tuner.safetensors
         (scepter key layout). The UNet runs through ControlledUNet, encoder cut out of backward.
"""
import os
from typing import List

import mindspore as ms

from ..config import TrainConfig
from ..data.conditions import ConditionSpec
from ..tuners.csc_tuner import ControlledUNet, CSCTunerConfig, build_csc_tuner, save_csc_tuner
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

    # What the training network runs instead of the plain UNet (None: the UNet itself).
    controlled_unet = None
    # The condition each training sample carries (None: text-to-image).
    condition_spec = None


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
        return LoRAConfig(rank=c.rank, alpha=c.lora_alpha, target_modules=list(c.lora_target_modules),
                          use_dora=c.use_dora)

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


class SCEditControl(Method):
    name = "scedit_control"

    @property
    def tuner_config(self) -> CSCTunerConfig:
        return CSCTunerConfig(dense_hint_kernel=self.config.dense_hint_kernel, down_ratio=self.config.down_ratio)

    @property
    def condition_spec(self) -> ConditionSpec:
        c = self.config
        if c.conditioning_image_column:
            return ConditionSpec("column")
        options = {}
        if c.control_type == "canny":
            options = {"low_threshold": c.canny_low_threshold, "high_threshold": c.canny_high_threshold}
        return ConditionSpec(c.control_type, options)

    def prepare(self, unet):
        self.tuner = build_csc_tuner(unet, self.tuner_config)
        self.controlled_unet = ControlledUNet(unet, {self.config.control_type: self.tuner}, detach=True)
        return list(self.tuner.get_parameters())

    def save_weights(self, unet, folder):
        save_csc_tuner(self.tuner, folder, self.tuner_config, self.config.control_type)


METHODS = {m.name: m for m in (Vanilla, LoRA, SCEdit, SCEditControl)}


def get_method(config: TrainConfig) -> Method:
    return METHODS[config.method](config)


def apply_unet_precision(unet, trainable: List[ms.Parameter], method: str, dtype) -> None:
    """fp16/bf16 training: frozen UNet weights in low precision, trainable ones kept fp32 (master
    copy); full fine-tuning uses AMP O2 instead (fp32 weights, low-precision compute)."""
    if dtype == ms.float32:
        return
    if method == "vanilla":
        ms.amp.auto_mixed_precision(unet, amp_level="O2", dtype=dtype)
    else:
        unet.to(dtype)
        for p in trainable:
            p.set_dtype(ms.float32)


def freeze_all_but(cells, trainable: List[ms.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for cell in cells:
        for p in cell.get_parameters():
            p.requires_grad = id(p) in keep
