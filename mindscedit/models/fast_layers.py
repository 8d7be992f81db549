"""Faster drop-in pieces for mindone's UNet on CPU, with identical outputs and state-dict keys.

On CPU mindone's attention has no fused kernel: it runs `softmax(Q K^T) V` with the
[batch * heads, tokens, tokens] score matrix written out, and autodiff keeps those scores for
backward. At the first UNet level (32x32 latents = 1024 tokens, 8 heads, batch 8) one such
matrix is 256 MiB, against 1 MiB for the layer's input: the attention maps are most of a
training step's memory and much of its time.

`apply_fast_layers(unet)` gives every such attention layer an `AttentionCore` Cell marked for
recompute: backward keeps only Q, K and V and recomputes the scores of one layer at a time,
as PyTorch's fused CPU attention does. The core also scales Q once and multiplies by K without
a transposed copy. The processor adds no Parameters, so weights, saved keys and LoRA layers on
to_q/to_k/to_v/to_out are unchanged. Where mindone has a fused flash attention (Ascend) the
layers are left alone.
"""
import os

import mindspore as ms
from mindspore import nn, ops
from mindone.diffusers.models.attention_processor import Attention, AttnProcessor2_0


class HeadsAttention(nn.Cell):
    """softmax(scale * Q K^T) V on [batch, heads, tokens, head_dim] tensors, without a mask."""

    def __init__(self, scale: float, recompute: bool = True):
        super().__init__()
        self.scale = scale
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.mix = ops.BatchMatMul()
        if recompute:
            self.recompute()

    def construct(self, query, key, value):
        scores = self.scores(query * self.scale, key)
        return self.mix(ops.softmax(scores, -1), value)


class AttentionCore(nn.Cell):
    """HeadsAttention over `chunks` groups of heads, one group at a time (smaller peak memory)."""

    def __init__(self, scale: float, recompute: bool = True, chunks: int = 1):
        super().__init__()
        self.chunks = chunks
        self.attend = HeadsAttention(scale, recompute)

    def construct(self, query, key, value):
        if self.chunks == 1:
            return self.attend(query, key, value)
        n = query.shape[1] // self.chunks
        outs = ()
        for i in range(self.chunks):
            outs = outs + (self.attend(query[:, i * n:(i + 1) * n], key[:, i * n:(i + 1) * n],
                                       value[:, i * n:(i + 1) * n]),)
        return ops.cat(outs, 1)


class CoreAttnProcessor(AttnProcessor2_0):
    """mindone's AttnProcessor2_0 with the attention itself done by `attn.attention_core`.

    Masked calls (not used by the UNet's training or sampling) keep mindone's own path.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.norm_q is not None or attn.norm_k is not None or hidden_states.ndim != 3:
            return AttnProcessor2_0.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).swapaxes(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).swapaxes(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).swapaxes(1, 2)
        hidden_states = attn.attention_core(query, key, value)
        hidden_states = hidden_states.swapaxes(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def uses_fused_attention(attn: Attention) -> bool:
    """True where mindone would run its flash-attention kernel (Ascend, fp16/bf16 or forced cast)."""
    return ms.get_context("device_target") != "CPU" and attn.fa_op_available and attn._enable_flash_sdp


def apply_fast_layers(unet, recompute_attention: bool = True, chunks: int = 1) -> int:
    """Swap in the fast attention where mindone has no fused kernel; returns how many layers changed.

    MINDSCEDIT_FAST_LAYERS=0 in the environment leaves mindone's layers as they are (for A/B runs).
    """
    if os.environ.get("MINDSCEDIT_FAST_LAYERS", "1") == "0":
        return 0
    changed = 0
    for _, cell in unet.cells_and_names():
        if isinstance(cell, Attention) and type(cell.processor) is AttnProcessor2_0 and not uses_fused_attention(cell):
            heads_chunks = chunks if cell.heads % chunks == 0 else 1
            cell.attention_core = AttentionCore(cell.scale, recompute_attention, heads_chunks)
            cell.set_processor(CoreAttnProcessor())
            changed += 1
    return changed
