"""Fine-tuning methods: everything that differs between them, one class each.

A method declares its options (config fields), checks them, says what data it needs (a
condition image per sample or not), injects what it trains into the UNet and returns those
parameters, sets the precision of the UNet around them, names the networks whose layers the CPU
rewrites may touch, says how validation samples with it and writes its weights. The trainer,
the step builder and the benchmark ask the method and never test its name.

vanilla: the whole UNet; saves the UNet in diffusers format (unet/).
lora:    LoRA/DoRA adapters on attention (and optionally feed-forward) layers, and on the text
         encoders' attention with train_text_encoder; saves pytorch_lora_weights.safetensors
         (diffusers/peft layout, text encoders under text_encoder. / text_encoder_2.).
scedit:  one SC-Tuner per decoder skip; saves adapter_model.safetensors + adapter_config.json
         (ms-swift layout). The encoder is cut out of backward.
scedit_control: a CSC-Tuner for one condition (canny, depth, ...); saves csc_tuner.safetensors
         (scepter key layout). The UNet runs through ControlledUNet, encoder cut out of backward.
controlnet: the ControlNet baseline the CSC-Tuner is compared with; benchmark only.

A new method is a subclass here plus its entry in METHODS (and its options in config.py).
"""
import dataclasses
import os
from typing import Dict, List, Tuple, Type

import mindspore as ms

from ..errors import UserError
from ..tuners.csc_tuner import ControlledUNet, CSCTunerConfig, build_csc_tuner, save_csc_tuner
from ..tuners.lora import TEXT_ENCODER_TARGETS, LoRAConfig, inject_lora, save_lora
from ..tuners.sc_tuner import SCTunerConfig, inject_sc_tuners, save_sc_tuners, sc_tuner_parameters


class Method:
    name = ""
    options: Tuple[str, ...] = ()  # the config fields this method reads
    takes_condition = False  # each sample carries a condition image, and the step takes it
    trainable_by_cli = True  # False: measured by the benchmark, not offered by `train`
    trains_text_encoders = False  # offers train_text_encoder (prepare_text_encoders)

    def __init__(self, config):
        self.config = config
        # What the training network runs instead of the plain UNet (None: the UNet itself); set by prepare.
        self.controlled_unet = None

    @classmethod
    def check(cls, config) -> None:
        """Method-specific checks of a config, before anything is loaded (one line naming the key)."""
        if config.validation_image and not cls.takes_condition:
            raise UserError(f"validation_image is for method scedit_control, not {config.method}")
        if config.train_text_encoder and not cls.trains_text_encoders:
            raise UserError(f"train_text_encoder trains LoRA on the text encoders beside the UNet's: method lora, "
                            f"not {config.method}")

    @property
    def condition_spec(self):
        """The condition each training sample carries (None: text-to-image)."""
        return None

    def prepare(self, unet) -> List[ms.Parameter]:
        """Inject what the method adds; return the parameters to train (everything else is frozen)."""
        raise NotImplementedError

    def prepare_text_encoders(self, text_encoders: Dict[str, object]) -> List[ms.Parameter]:
        """train_text_encoder (methods with trains_text_encoders): inject into the text encoders
        ({component: encoder}); return what trains there."""
        raise NotImplementedError

    def apply_precision(self, unet, trainable: List[ms.Parameter], dtype) -> None:
        """fp16/bf16: the frozen UNet in low precision, the trained weights kept fp32 (master copy);
        the adapters compute in their weights' dtype and hand back the UNet's."""
        unet.to(dtype)
        for p in trainable:
            p.set_dtype(ms.float32)

    def networks(self, unet) -> list:
        """The networks of the training step besides the text and image encoders."""
        return [unet] if self.controlled_unet is None else [unet, self.controlled_unet]

    def validation_inputs(self, resolution: int) -> dict:
        """Extra arguments of the Validator: what validation samples with besides the UNet."""
        return {}

    def save_weights(self, unet, folder: str) -> None:
        raise NotImplementedError

    # How the saved weights are used: the PyTorch side (Python) and `mindscedit sample`'s flags, with
    # OUT standing for the run's output folder (the model card fills them in).
    pytorch_usage = ""
    sample_flags = ""


class Vanilla(Method):
    name = "vanilla"

    def prepare(self, unet):
        return list(unet.get_parameters())

    def apply_precision(self, unet, trainable, dtype):
        # Every weight trains: fp32 weights, low-precision compute (AMP O2) instead of fp32 copies.
        ms.amp.auto_mixed_precision(unet, amp_level="O2", dtype=dtype)

    def save_weights(self, unet, folder):
        unet.save_pretrained(os.path.join(folder, "unet"))

    pytorch_usage = ('from diffusers import UNet2DConditionModel\n'
                     'pipe.unet = UNet2DConditionModel.from_pretrained("OUT/unet")')
    sample_flags = "--unet OUT"


class LoRA(Method):
    name = "lora"
    trains_text_encoders = True
    options = ("rank", "lora_alpha", "lora_target_modules", "use_dora")

    @property
    def lora_config(self) -> LoRAConfig:
        c = self.config
        return LoRAConfig(rank=c.rank, alpha=c.lora_alpha, target_modules=list(c.lora_target_modules),
                          use_dora=c.use_dora)

    def __init__(self, config):
        super().__init__(config)
        self.text_encoders = {}  # {component: encoder} with LoRA of their own (train_text_encoder)

    def prepare(self, unet):
        return inject_lora(unet, self.lora_config)

    def prepare_text_encoders(self, text_encoders):
        """LoRA of the UNet's rank, alpha and DoRA setting on each text encoder's attention projections. Their
        Parameters are named after their component: both SDXL encoders have the same layer names."""
        config = dataclasses.replace(self.lora_config, target_modules=list(TEXT_ENCODER_TARGETS))
        params = []
        for component, encoder in text_encoders.items():
            injected = inject_lora(encoder, config)
            for p in injected:
                p.name = f"{component}.{p.name}"
            params += injected
        self.text_encoders = dict(text_encoders)
        return params

    def save_weights(self, unet, folder):
        save_lora(unet, folder, self.lora_config, text_encoders=self.text_encoders)

    pytorch_usage = 'pipe.load_lora_weights("OUT")  # diffusers'
    sample_flags = "--lora OUT/pytorch_lora_weights.safetensors"


class SCEdit(Method):
    name = "scedit"
    options = ("down_ratio",)

    @property
    def tuner_config(self) -> SCTunerConfig:
        return SCTunerConfig(down_ratio=self.config.down_ratio)

    def prepare(self, unet):
        inject_sc_tuners(unet, self.tuner_config)
        return sc_tuner_parameters(unet)

    def save_weights(self, unet, folder):
        save_sc_tuners(unet, folder, self.tuner_config)

    pytorch_usage = 'from swift.tuners import Swift\npipe.unet = Swift.from_pretrained(pipe.unet, "OUT")'
    sample_flags = "--scedit OUT"


class _Controlled(Method):
    """Methods whose UNet runs under a condition image (a ControlledUNet-like network)."""

    takes_condition = True

    @property
    def condition_spec(self):
        from ..data.conditions import ConditionSpec

        c = self.config
        if c.conditioning_image_column:
            return ConditionSpec("column")
        options = {}
        if c.control_type == "canny":
            options = {"low_threshold": c.canny_low_threshold, "high_threshold": c.canny_high_threshold}
        return ConditionSpec(c.control_type, options)

    @classmethod
    def check(cls, config):
        from ..data.conditions import ANNOTATORS

        if config.with_prior_preservation:
            raise UserError(f"with_prior_preservation is for text-to-image methods, not {config.method} (class "
                            "images have no condition)")
        if not config.conditioning_image_column and config.control_type not in ANNOTATORS:
            raise UserError(f"control_type '{config.control_type}' is not built in ({', '.join(ANNOTATORS)}); "
                            "give its images with conditioning_image_column")
        if config.canny_low_threshold > config.canny_high_threshold:
            raise UserError(f"canny_low_threshold ({config.canny_low_threshold}) is above canny_high_threshold "
                            f"({config.canny_high_threshold})")
        cls._check_validation_images(config)

    @staticmethod
    def _check_validation_images(config) -> None:
        """Validation samples under a condition: one image for all prompts or one each."""
        images, prompts = config.validation_image, config.validation_prompt
        if not prompts:
            return
        if not images:
            raise UserError(f"validation_prompt with method {config.method} needs validation_image (the condition "
                            "image to sample under; `mindscedit annotate` makes one from a photo)")
        if len(images) not in (1, len(prompts)):
            raise UserError(f"validation_image: give one image, or one per validation_prompt ({len(prompts)}), "
                            f"got {len(images)}")
        for path in images:
            if not os.path.isfile(path):
                raise UserError(f"validation_image not found: {path}")

    def validation_inputs(self, resolution):
        """Validation samples with the network being trained, under each prompt's condition image."""
        from ..data.conditions import load_control_image

        c = self.config
        paths = c.validation_image * len(c.validation_prompt) if len(c.validation_image) == 1 else c.validation_image
        return {"controlled": self.controlled_unet,
                "condition_images": [load_control_image(p, "none", resolution, resolution) for p in paths]}


class SCEditControl(_Controlled):
    name = "scedit_control"
    options = ("down_ratio", "control_type", "conditioning_image_column", "dense_hint_kernel",
               "canny_low_threshold", "canny_high_threshold")

    @property
    def tuner_config(self) -> CSCTunerConfig:
        return CSCTunerConfig(dense_hint_kernel=self.config.dense_hint_kernel, down_ratio=self.config.down_ratio)

    def prepare(self, unet):
        self.tuner = build_csc_tuner(unet, self.tuner_config)
        self.controlled_unet = ControlledUNet(unet, {self.config.control_type: self.tuner}, detach=True)
        return list(self.tuner.get_parameters())

    def save_weights(self, unet, folder):
        save_csc_tuner(self.tuner, folder, self.tuner_config, self.config.control_type)

    pytorch_usage = "# scepter: OUT/csc_tuner.safetensors holds scepter's CSC-Tuner keys"
    sample_flags = "--csc_tuner OUT --control_image CONDITION.png"


class ControlNet(_Controlled):
    """A trainable copy of the UNet's encoder feeding its skips (mindone's ControlNetModel)."""

    name = "controlnet"
    options = ("control_type", "conditioning_image_column", "canny_low_threshold", "canny_high_threshold")
    trainable_by_cli = False

    def prepare(self, unet):
        from ..models.controlnet import ControlNetUNet

        self.controlled_unet = ControlNetUNet(unet)
        return list(self.controlled_unet.controlnet.get_parameters())

    def networks(self, unet):
        return [unet, self.controlled_unet.controlnet]  # its own attention layers are rewritten too

    def save_weights(self, unet, folder):
        raise UserError("the ControlNet baseline is for the benchmark; it has no weight format here")


METHODS: Dict[str, Type[Method]] = {m.name: m for m in (Vanilla, LoRA, SCEdit, SCEditControl, ControlNet)}
TRAINABLE_METHODS = {name: m for name, m in METHODS.items() if m.trainable_by_cli}


def method_class(name: str) -> Type[Method]:
    return METHODS[name]


def get_method(config) -> Method:
    return METHODS[config.method](config)


def freeze_all_but(cells, trainable: List[ms.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for cell in cells:
        for p in cell.get_parameters():
            p.requires_grad = id(p) in keep
