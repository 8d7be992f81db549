"""Inject SC-Tuners into a diffusers UNet2DConditionModel (mindone) and read them back.

Each up block is wrapped so that the skip features it is about to pop are edited first; the
block itself and the UNet forward are mindone's, unchanged. A tuner acts on its skip alone,
so editing the whole tuple before the block runs is the same as editing each resnet's input.

Tuners are addressed by ms-swift's key layout, `up_blocks.{i}.resnets.{j}.scetuner_<adapter>`,
computed from the UNet's structure (Parameter.name changes whenever a Cell is wrapped, so it
is never used as a key).
"""
from typing import Dict, List, Tuple

import mindspore as ms
from mindspore import nn, ops

from .config import SCTunerConfig
from .layer import SCTuner


def encoder_skip_layout(unet_config) -> List[Tuple[int, bool]]:
    """(channels, made by a downsampler?) of every skip the encoder pushes, in push order."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    skips = [(channels[0], False)]  # conv_in's output
    for b, ch in enumerate(channels):
        skips += [(ch, False)] * layers[b]
        if b < len(channels) - 1:  # the downsampler's output is a skip too
            skips.append((ch, True))
    return skips


def encoder_skip_channels(unet_config) -> List[int]:
    """Channels of every skip the encoder pushes, in push order (conv_in first)."""
    return [ch for ch, _ in encoder_skip_layout(unet_config)]


def decoder_skip_slots(unet) -> List[Tuple[int, int]]:
    """(up block i, resnet j) of each decoder skip, in decoder order m = 0, 1, ..."""
    return [(i, j) for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))]


def sc_tuner_dims(unet) -> List[int]:
    """Channels of each decoder skip (decoder order): the encoder's skips, reversed."""
    dims = encoder_skip_channels(unet.config)[::-1]
    if len(dims) != len(decoder_skip_slots(unet)):
        raise ValueError("UNet up blocks do not pop as many skips as its down blocks push")
    return dims


def tuner_key_prefix(i: int, j: int, adapter_name: str) -> str:
    return f"up_blocks.{i}.resnets.{j}.scetuner_{adapter_name}"


class SkipEditedUpBlock(nn.Cell):
    """Runs `block` after applying one SC-Tuner to each skip it will pop.

    tuners[j] edits the skip that resnet j pops (the block pops from the end of the tuple).
    With detach, gradients stop at the skips, at temb, and (for the first up block) at the mid
    block's output: nothing upstream of the decoder is differentiated.
    """

    def __init__(self, block: nn.Cell, tuners: List[SCTuner], adapter_name: str, detach: bool, is_first: bool):
        super().__init__()
        self.block = block
        self.tuners = nn.CellList(tuners)
        self.adapter_name = adapter_name
        self.has_cross_attention = getattr(block, "has_cross_attention", False)
        self.detach = detach
        self.detach_hidden = detach and is_first
        self.resnets = block.resnets  # read by UNet helpers (e.g. gradient checkpointing)

    def edit_skips(self, res_hidden_states_tuple):
        n = len(res_hidden_states_tuple)
        edited = ()
        for k in range(n):
            skip = res_hidden_states_tuple[k]
            if self.detach:
                skip = ops.stop_gradient(skip)
            edited = edited + (self.tuners[n - 1 - k](skip),)
        return edited

    def construct(
        self,
        hidden_states,
        res_hidden_states_tuple,
        temb=None,
        encoder_hidden_states=None,
        cross_attention_kwargs=None,
        upsample_size=None,
        attention_mask=None,
        encoder_attention_mask=None,
    ):
        if self.detach_hidden:
            hidden_states = ops.stop_gradient(hidden_states)
        if self.detach and temb is not None:
            temb = ops.stop_gradient(temb)
        skips = self.edit_skips(res_hidden_states_tuple)
        if self.has_cross_attention:
            return self.block(
                hidden_states,
                skips,
                temb,
                encoder_hidden_states,
                cross_attention_kwargs,
                upsample_size,
                attention_mask,
                encoder_attention_mask,
            )
        return self.block(hidden_states, skips, temb, upsample_size)


def inject_sc_tuners(unet, config: SCTunerConfig = SCTunerConfig()) -> Dict[str, SCTuner]:
    """Add one SC-Tuner per decoder skip to `unet` in place; returns {key prefix: tuner}."""
    if any(isinstance(b, SkipEditedUpBlock) for b in unet.up_blocks):
        raise ValueError("this UNet already has SC-Tuners")
    dims = iter(sc_tuner_dims(unet))
    wrapped = []
    for i, block in enumerate(unet.up_blocks):
        tuners = [SCTuner(next(dims), config.down_ratio) for _ in block.resnets]
        wrapped.append(SkipEditedUpBlock(block, tuners, config.adapter_name, config.detach_encoder, i == 0))
    # A new list rather than `up_blocks[i] = ...`: CellList.__setitem__ re-derives the parameter
    # name prefix from its current cells, which fails (IndexError in MindSpore) once a wrapped
    # CrossAttnUpBlock2D comes first, as in SDXL's decoder.
    unet.up_blocks = nn.CellList(wrapped)
    return get_sc_tuners(unet)


def get_sc_tuners(unet) -> Dict[str, SCTuner]:
    """{key prefix: tuner} of a UNet with injected SC-Tuners, in decoder order."""
    tuners = {}
    for i, block in enumerate(unet.up_blocks):
        if isinstance(block, SkipEditedUpBlock):
            for j, tuner in enumerate(block.tuners):
                tuners[tuner_key_prefix(i, j, block.adapter_name)] = tuner
    if not tuners:
        raise ValueError("this UNet has no SC-Tuners")
    return tuners


def sc_tuner_named_parameters(unet) -> Dict[str, ms.Parameter]:
    """{saved key: parameter} of the trainable tuner weights (ln1/ln2 weight and bias)."""
    return {
        f"{prefix}.tuner_op.{name}": p
        for prefix, tuner in get_sc_tuners(unet).items()
        for name, p in tuner.tuner_op.parameters_and_names()
    }


def sc_tuner_parameters(unet) -> List[ms.Parameter]:
    """The trainable tuner weights, in decoder order."""
    return list(sc_tuner_named_parameters(unet).values())


def set_tuner_scale(unet, scale: float) -> None:
    for tuner in get_sc_tuners(unet).values():
        tuner.scale.set_data(ms.Tensor(scale, ms.float32))
