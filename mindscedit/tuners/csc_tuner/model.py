"""A UNet forward whose decoder skips are edited by one or more CSC-Tuners.

The skips of mindone's UNet only meet the decoder inside its own forward, and a CSC-Tuner needs
both the skip and a condition hint at that point; mindone's forward has no hook that could take
the hints in graph mode (the only extra inputs its blocks see, cross_attention_kwargs, are handed
on to every attention processor). ControlledUNet therefore runs the UNet's own sub-Cells and
embedding helpers in the same order as UNet2DConditionModel.construct, for any of its
configurations but class embeddings and image hints: added embeddings (SDXL's text_time: pooled
text embeds and time ids, as `added_cond_kwargs`) go through the UNet's own get_aug_embed and
process_encoder_hidden_states. One step is added between encoder and decoder:

    skip_i' = skip_i + control_scale * sum_k scale_k * ctrl_k,i

With no tuners, or all scales at zero, its output equals the plain UNet's exactly.
"""
from typing import Dict

from mindspore import nn, ops

from ..sc_tuner.model import encoder_skip_layout
from .config import CSCTunerConfig
from .layer import CSCTuner


def build_csc_tuner(unet, config: CSCTunerConfig = CSCTunerConfig()) -> CSCTuner:
    return CSCTuner(
        encoder_skip_layout(unet.config),
        dense_hint_kernel=config.dense_hint_kernel,
        down_ratio=config.down_ratio,
        condition_channels=config.condition_channels,
        hint_channels=config.hint_channels,
    )


class ControlledUNet(nn.Cell):
    """unet + named CSC-Tuners; construct(sample, timestep, text, conditions, scales, control_scale).

    conditions: a tuple with one image batch [B, C, H, W] in [0, 1] per tuner, in the order of
    `tuners`; scales: float32 [K], one per tuner; control_scale: float32 scalar.
    detach: cut the encoder (and everything before the decoder) out of backward, for training
    the tuners alone.
    """

    def __init__(self, unet, tuners: Dict[str, CSCTuner], detach: bool = False):
        super().__init__()
        cfg = unet.config
        if cfg.class_embed_type is not None or cfg.num_class_embeds is not None or \
                cfg.addition_embed_type == "image_hint" or cfg.center_input_sample:
            raise ValueError("ControlledUNet supports UNets without class embeddings, image hints or input centring")
        self.unet = unet
        self.names = list(tuners)
        self.tuners = nn.CellList(list(tuners.values()))
        self.detach = detach
        self.up_factor = 2 ** unet.num_upsamplers
        self.skips_per_up_block = [len(block.resnets) for block in unet.up_blocks]

    def _detach(self, x):
        return ops.stop_gradient(x) if self.detach else x

    def construct(self, sample, timestep, encoder_hidden_states, conditions, scales, control_scale,
                  added_cond_kwargs=None):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)

        h = unet.conv_in(sample)
        skips = (h,)
        for block in unet.down_blocks:
            if block.has_cross_attention:
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips = skips + res
        if unet.mid_block is not None:
            if unet.mid_block.has_cross_attention:
                h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = unet.mid_block(h, emb)

        skips = self.edit_skips(tuple(self._detach(s) for s in skips), conditions, scales, control_scale)
        h, emb = self._detach(h), self._detach(emb)

        forward_upsample_size = sample.shape[-2] % self.up_factor != 0 or sample.shape[-1] % self.up_factor != 0
        for i, block in enumerate(unet.up_blocks):
            n = self.skips_per_up_block[i]
            res, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[2:] if (i < len(self.skips_per_up_block) - 1 and forward_upsample_size) else None
            if block.has_cross_attention:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                          encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)

    def edit_skips(self, skips, conditions, scales, control_scale):
        if len(self.tuners) == 0:
            return skips
        total = None
        for k, tuner in enumerate(self.tuners):
            controls = tuner(skips, conditions[k])
            weighted = tuple(scales[k].astype(c.dtype) * c for c in controls)
            total = weighted if total is None else tuple(t + w for t, w in zip(total, weighted))
        return tuple(s + control_scale.astype(s.dtype) * c for s, c in zip(skips, total))
