"""Load the pieces of a Stable Diffusion pipeline from a local diffusers-format folder.

The folder is what `save_pretrained` writes (and what the model hubs ship): `model_index.json`
plus `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` subfolders, weights as
safetensors. Nothing is downloaded: a missing piece is a one-line error that names it.
"""
import glob
import os
from dataclasses import dataclass
from typing import Any

import mindspore as ms

from ..errors import ModelFolderError, UserError

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


@dataclass
class PipelineComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    family: Any = None  # models.family: how prompts and latents reach the UNet

    def __post_init__(self):
        if self.family is None:
            from .family import StableDiffusion

            self.family = StableDiffusion

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list:
        return [getattr(self, name) for name in self.family.text_encoders]


def check_model_folder(path: str, subfolders=SUBFOLDERS) -> None:
    """Fail with one line naming the first missing file or folder of a diffusers pipeline folder."""
    if not os.path.isdir(path):
        raise ModelFolderError(f"model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelFolderError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    for sub in subfolders:
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            raise ModelFolderError(f"model folder {path} has no '{sub}/' subfolder")
        if sub in WEIGHT_FILES:
            stem = WEIGHT_FILES[sub]
            has_single = os.path.isfile(os.path.join(folder, f"{stem}.safetensors"))
            has_sharded = os.path.isfile(os.path.join(folder, f"{stem}.safetensors.index.json"))
            if not (has_single or has_sharded):
                found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*")))
                raise ModelFolderError(
                    f"no {stem}.safetensors in {folder} (found: {', '.join(found) or 'nothing'}); "
                    "only safetensors weights can be loaded"
                )
        if not os.path.isfile(os.path.join(folder, "config.json")) and sub not in ("tokenizer", "scheduler"):
            raise ModelFolderError(f"{folder} has no config.json")
    if not glob.glob(os.path.join(path, "scheduler", "*.json")):
        raise ModelFolderError(f"{os.path.join(path, 'scheduler')} has no scheduler_config.json")


def load_tokenizer(path: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)


def load_noise_scheduler(path: str):
    from mindone.diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)


FLASH_ATTENTION_ENV = "MINDSCEDIT_FLASH_ATTENTION"


def apply_flash_attention_setting(unet):
    """mindone runs Ascend's FlashAttentionScore whenever the device is Ascend, but only Atlas A2
    (910B) chips have that kernel: MINDSCEDIT_FLASH_ATTENTION=0 (for 910A) makes every attention
    layer take mindone's plain attention instead. Returns the UNet."""
    from mindone.diffusers.models.attention_processor import Attention

    setting = os.environ.get(FLASH_ATTENTION_ENV, "1")
    if setting not in ("0", "1"):
        raise UserError(f"{FLASH_ATTENTION_ENV}={setting!r}: expected 1 (flash attention where mindone has it) "
                        "or 0 (plain attention, for 910A)")
    if setting == "0":
        for _, cell in unet.cells_and_names():
            if isinstance(cell, Attention):
                cell.enable_flash_sdp(False)
    return unet


def load_unet(path: str, dtype=ms.float32):
    from mindone.diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", mindspore_dtype=dtype, local_files_only=True)
    return apply_flash_attention_setting(unet)


def load_unet_folder(path: str, dtype=ms.float32):
    """A UNet saved on its own, as vanilla training writes it: `path/unet/` or `path` itself
    (config.json and diffusion_pytorch_model.safetensors)."""
    from mindone.diffusers import UNet2DConditionModel

    folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"--unet: {folder} has no {name} (expected a UNet folder as vanilla training "
                                   "writes it: OUTPUT_DIR/unet)")
    unet = UNet2DConditionModel.from_pretrained(folder, mindspore_dtype=dtype, local_files_only=True)
    return apply_flash_attention_setting(unet)


def load_components(path: str, dtype=ms.float32) -> PipelineComponents:
    """Load UNet, VAE, text encoder, tokenizer and DDPM noise scheduler from a local folder."""
    from mindone.diffusers import AutoencoderKL
    from mindone.transformers import CLIPTextModel

    from .family import detect_family

    check_model_folder(path)
    family = detect_family(path)
    try:
        return PipelineComponents(
            unet=load_unet(path, dtype),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", mindspore_dtype=dtype, local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(
                os.path.join(path, "text_encoder"), mindspore_dtype=dtype, local_files_only=True
            ),
            tokenizer=load_tokenizer(path),
            noise_scheduler=load_noise_scheduler(path),
            family=family,
        )
    except (OSError, ValueError) as err:  # ValueError: a config the model class refuses (JSONDecodeError too)
        # The loaders raise long multi-line messages; keep the first line, which names the file.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFolderError(f"cannot load the model in {path}: {first_line}") from err


def build_unet(config: dict, dtype=ms.float32):
    """A UNet of the given config with random weights (benchmarks, parameter counts)."""
    from mindone.diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config)
    if dtype != ms.float32:
        unet.to(dtype)
    return apply_flash_attention_setting(unet)
