"""The one place a training step is assembled: the trainer, the benchmark and the tests call it.

From a UNet, a method, a loss and the run's config it injects the method's weights (seeded, so
every rank starts from the same ones), freezes the rest, sets the precision, applies the CPU
rewrites and gradient checkpointing, wraps the networks with the loss, lets repeated blocks share
their compiled graph once the networks are final, and builds the optimizer and the jitted step.
With the model's text and image encoders (`encoders`) the step starts from pixels and token ids
(training); without them from latents and text embeddings (the benchmark times the UNet step
alone, as the PyTorch reference measurements do).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import mindspore as ms

from ..models.cpu_rewrites import apply_cpu_rewrites
from ..models.family import StableDiffusion
from ..models.graph_sharing import share_repeated_blocks
from ..runtime import DTYPES
from .methods import Method, freeze_all_but
from .network import LatentDiffusionTrainNet, LatentTrainNet
from .optimizers import build_optimizer
from .param_groups import ParamGroup
from .step import build_train_step


@dataclass
class Encoders:
    """The frozen networks in front of the UNet, and how the model family uses them."""
    vae: object
    prompt_encoder: object  # a Cell: token ids -> encoder_hidden_states (models/family.py)
    latent_scaling: object  # a Cell: VAE latents <-> the UNet's
    frozen: list  # the networks holding their weights (VAE, text encoders)
    trainable: list = field(default_factory=list)  # weights in them that train (new token rows, text-encoder LoRA)


@dataclass
class BuiltStep:
    train_step: object
    trainable: List[ms.Parameter]


def build_step(config, method: Method, unet, loss, learning_rate: float,
               encoders: Optional[Encoders] = None, cpu_rewrites: bool = True, share_blocks: bool = True,
               on_prepared=None, family=StableDiffusion) -> BuiltStep:
    """loss: a loss of losses.py (DDPM's or EDM-style). family: the model family (models/family.py), whose added conditions the step takes as inputs.
    cpu_rewrites / share_blocks: off only to compare a step with and without them (tests).
    on_prepared(trainable): called once the method's weights exist, before anything else changes."""
    # Every rank must start from the same weights (the reducer never broadcasts them): the
    # initialisers of the injected weights draw from the run's seed, the same on all ranks.
    ms.set_seed(config.seed)
    trainable = method.prepare(unet)
    if on_prepared is not None:
        on_prepared(trainable)
    networks = method.networks(unet)
    encoder_trainable = list(encoders.trainable) if encoders else []
    freeze_all_but(networks + (encoders.frozen if encoders else []), trainable + encoder_trainable)
    dtype = DTYPES[config.mixed_precision]
    if dtype != ms.float32:
        for frozen in encoders.frozen if encoders else []:
            frozen.to(family.vae_dtype(frozen.config, dtype) if frozen is encoders.vae else dtype)
        for p in encoder_trainable:  # trained weights stay fp32 (master copy) in a low-precision encoder
            p.set_dtype(ms.float32)
        method.apply_precision(unet, trainable, dtype)
    if cpu_rewrites:
        for network in networks:
            apply_cpu_rewrites(network)  # a no-op off the CPU (see layers.cpu_kernel_workarounds)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if encoders is None:
        network = LatentTrainNet(unet, loss, method.controlled_unet, family)
    else:
        network = LatentDiffusionTrainNet(unet, encoders.vae, encoders.prompt_encoder, encoders.latent_scaling, loss,
                                          method.controlled_unet, family, trains_text=bool(encoder_trainable))
    if share_blocks:
        share_repeated_blocks(network)  # the networks are final: blocks are keyed by their structure
    groups = [ParamGroup(trainable, name=method.name)]
    if encoder_trainable:
        groups.append(text_group(config, encoder_trainable))
    optimizer = build_optimizer(config.optimizer, groups, learning_rate, config)
    train_step = build_train_step(network, optimizer, config.mixed_precision, config.max_grad_norm,
                                  config.gradient_accumulation_steps, config.jit_level,
                                  use_ema=getattr(config, "use_ema", False))
    return BuiltStep(train_step, trainable + encoder_trainable)


TEXT_GROUP = 1  # the optimizer group of what trains in the text encoders, after the method's weights


def text_lr_ratio(config) -> float:
    """text_encoder_lr as a multiple of learning_rate: the text side follows the same schedule."""
    return (config.text_encoder_lr or config.learning_rate) / config.learning_rate


def text_group(config, params) -> ParamGroup:
    """The text side (new token rows, text-encoder LoRA) at text_encoder_lr with its weight decay."""
    return ParamGroup(params, lr_ratio=text_lr_ratio(config), weight_decay=config.adam_weight_decay_text_encoder,
                      name="text encoder")
