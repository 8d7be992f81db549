"""Faster drop-in pieces for mindone's UNet on CPU, with identical outputs and state-dict keys.

On CPU mindone's attention has no fused kernel: it runs `softmax(Q K^T) V` with the
[batch * heads, tokens, tokens] score matrix written out, and autodiff keeps those scores for
backward. At the first UNet level (32x32 latents = 1024 tokens, 8 heads, batch 8) one such
matrix is 256 MiB, against 1 MiB for the layer's input. Worse, MindSpore's softmax backward
subtracts a [.., tokens, 1] row term by implicit broadcasting, and the CPU kernel for an
implicitly broadcast binary op keeps 16 bytes of index per output element for as long as the
graph lives: 1 GiB per attention layer at that size, outside the memory pool.

`apply_cpu_rewrites(unet)` gives every such attention layer an `AttentionCore`: attention over
blocks of (batch * heads) slices with a hand-written backward that keeps only Q, K, V and the
output, recomputes one block's probabilities at a time and folds the row term into a matrix product.
The processor adds no Parameters, so weights, saved keys and LoRA layers on to_q/to_k/to_v/to_out
are unchanged. Off the CPU (Ascend, with mindone's flash attention) no layer is changed.

The same index cost hits the feed-forward's exact (erf) GELU, 40 MiB per GEGLU at the first
level: on CPU the GEGLUs get an `ExactGELU` (mindscedit.layers) instead. Every ResnetBlock2D
adds its time embedding as a [batch, channels, 1, 1] broadcast: on CPU the blocks become
`BiasAddResnetBlock2D`, which adds the same numbers as a bias over [1, batch * channels, h, w].
Dividing by a 0-d tensor costs the same 16 bytes per element, so mindone's division of every
block output by its output factor (1.0) is left out. And the CPU Transpose kernel keeps 8 bytes
of index per element: the attention processor moves heads by unstack/stack, and on CPU each
Transformer2DModel becomes a `TokenProjTransformer2DModel`, whose proj_in/proj_out multiply
straight from the image layout to tokens and back.
"""

from mindspore import nn, ops
from mindone.diffusers.models.activations import GEGLU
from mindone.diffusers.models.attention_processor import Attention, AttnProcessor2_0
from mindone.diffusers.models.resnet import ResnetBlock2D
from mindone.diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..layers import ExactGELU, cpu_kernel_workarounds, dense_to_image, dense_to_tokens


class HeadsAttention(nn.Cell):
    """softmax(scale * Q K^T) V on [n, tokens, head_dim] tensors, with a hand-written backward.

    Backward keeps only Q, K, V and the output, recomputes the probabilities P, and forms
    dS = P * (dP - rowsum(dO * O)) with the row term inside the product that gives dP (no
    implicit broadcast: module docstring).
    `after` (the previous block's output) chains the blocks of one layer, see AttentionCore.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.scores = ops.BatchMatMul(transpose_b=True)  # A B^T
        self.mix = ops.BatchMatMul()                     # A B
        self.mix_t = ops.BatchMatMul(transpose_a=True)   # A^T B
        self.softmax = ops.Softmax(-1)

    def probs(self, query, key):
        return self.softmax(self.scores(query * self.scale, key))

    def construct(self, query, key, value, after):
        return self.mix(self.probs(ops.depend(query, after), key), value)

    def bprop(self, query, key, value, after, out, dout):
        # depend() orders the recomputation after dout exists and keeps the graph optimiser
        # from merging it with the forward's P (which would keep P alive until backward).
        probs = self.probs(ops.depend(query, dout), key)
        d_value = self.mix_t(probs, dout)
        row = (dout * out).sum(-1, keepdims=True)  # sum_j P_ij dP_ij = dO_i . O_i
        # dP_ij - row_i = [dO_i, -row_i] . [V_j, 1]: one product with an extra column instead of
        # a score-sized broadcast (single-threaded on CPU) and subtraction.
        ones = ops.ones(value.shape[:-1] + (1,), value.dtype)
        d_scores = probs * self.scores(ops.cat((dout, -row), -1), ops.cat((value, ones), -1))
        d_query = self.mix(d_scores, key) * self.scale
        d_key = self.mix_t(d_scores, query) * self.scale
        # `after` gets a zero gradient that exists only once this block's gradients do; it is
        # part of the previous block's dout, so that block's backward waits for this one.
        d_after = ops.depend(ops.depend(ops.zeros_like(after), d_query), d_key)
        return d_query, d_key, d_value, d_after


class AttentionCore(nn.Cell):
    """Attention over [batch, heads, tokens, head_dim] in blocks of (batch * heads) slices.

    Each block's score matrix has at most `block_elements` entries, and the blocks run one
    after another, forward and backward (the graph runtime would otherwise start independent
    blocks together), so at most one block's scores exist at a time (PyTorch's CPU attention
    also works in blocks). All full blocks share one graph.
    """

    def __init__(self, scale: float, block_elements: int = 1 << 23):
        super().__init__()
        self.block_elements = block_elements
        self.attend = HeadsAttention(scale)

    def construct(self, query, key, value):
        batch, heads, tokens, head_dim = query.shape
        context = key.shape[2]
        slices = batch * heads
        query = query.reshape(slices, tokens, head_dim)
        key = key.reshape(slices, context, head_dim)
        value = value.reshape(slices, context, head_dim)
        step = max(1, self.block_elements // (tokens * context))
        if step >= slices:
            out = self.attend(query, key, value, query)
        else:
            blocks = ()
            for i in range(0, slices, step):
                after = blocks[-1] if blocks else query[:step]
                blocks = blocks + (self.attend(query[i:i + step], key[i:i + step], value[i:i + step], after),)
            out = ops.cat(blocks, 0)
        return out.reshape(batch, heads, tokens, head_dim)


class CoreAttnProcessor(AttnProcessor2_0):
    """mindone's AttnProcessor2_0 with the attention itself done by `attn.attention_core`.

    Masked calls (not used by the UNet's training or sampling) keep mindone's own path.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.norm_q is not None or attn.norm_k is not None or hidden_states.ndim != 3:
            return AttnProcessor2_0.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        hidden_states = attn.attention_core(split_heads(query, attn.heads), split_heads(key, attn.heads),
                                            split_heads(value, attn.heads))
        hidden_states = attn.to_out[1](attn.to_out[0](merge_heads(hidden_states)))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return divide_unless_one(hidden_states, attn.rescale_output_factor)


def split_heads(x, heads: int):
    """[batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim].

    Done by unstack and stack, not by a transpose (why: mindscedit.layers); the pair is no slower.
    """
    batch, tokens, channels = x.shape
    return ops.stack(ops.unstack(x.reshape(batch, tokens, heads, channels // heads), axis=2), axis=1)


def merge_heads(x):
    """[batch, heads, tokens, head_dim] -> [batch, tokens, heads * head_dim] (see split_heads)."""
    return ops.cat(ops.unstack(x, axis=1), -1)


def divide_unless_one(x, factor: float):
    """x / factor, skipped for mindone's default factor 1.0: the CPU Div kernel keeps 16 bytes of
    broadcast index per element for a 0-d divisor, and dividing by 1 changes nothing."""
    if factor == 1.0:
        return x
    return x / factor


class BiasAddResnetBlock2D(ResnetBlock2D):
    """mindone's ResnetBlock2D ("default" time-embedding norm) with the time embedding added by
    BiasAdd over the batch folded into channels: the same sums, without the CPU broadcast
    kernel's per-element index (16 bytes per element of the block's activations)."""

    def construct(self, input_tensor, temb):
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)
            batch, channels, height, width = hidden_states.shape
            hidden_states = ops.bias_add(hidden_states.reshape(1, batch * channels, height, width),
                                         temb.reshape(batch * channels)).reshape(batch, channels, height, width)
        hidden_states = self.nonlinearity(self.norm2(hidden_states))
        hidden_states = self.conv2(self.dropout(hidden_states))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return divide_unless_one(input_tensor + hidden_states, self.output_scale_factor)


class TokenProjTransformer2DModel(Transformer2DModel):
    """mindone's Transformer2DModel (image input) with proj_in and proj_out, 1x1 convolutions or
    Dense layers, applied straight between the image layout and the tokens: the same products
    without the permute next to each projection (mindscedit.layers says why). A projection
    that has since been wrapped (a LoRA on a Dense proj_in) takes mindone's path."""

    def _operate_on_continuous_inputs(self, hidden_states):
        if not isinstance(self.proj_in, (nn.Dense, nn.Conv2d)):
            return Transformer2DModel._operate_on_continuous_inputs(self, hidden_states)
        batch, channels, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states).reshape(batch, channels, height * width)
        weight = self.proj_in.weight.reshape(self.proj_in.weight.shape[0], channels)
        tokens = dense_to_tokens(hidden_states, weight, self.proj_in.bias)
        return tokens, weight.shape[0]

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if not isinstance(self.proj_out, (nn.Dense, nn.Conv2d)):
            return Transformer2DModel._get_output_for_continuous_inputs(
                self, hidden_states, residual, batch_size, height, width, inner_dim)
        weight = self.proj_out.weight.reshape(self.proj_out.weight.shape[0], inner_dim)
        image = dense_to_image(hidden_states, weight, self.proj_out.bias)
        return image.reshape(batch_size, weight.shape[0], height, width) + residual


def _is_pointwise(layer) -> bool:
    """A layer dense_to_tokens / dense_to_image can stand in for: a plain Dense, or a 1x1
    convolution with stride 1, no padding and one group."""
    if type(layer) is nn.Dense:
        return layer.activation is None
    return type(layer) is nn.Conv2d and tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1) \
        and layer.group == 1 and layer.data_format == "NCHW" and layer.pad_mode in ("valid", "pad", "same") \
        and not any(layer.padding if isinstance(layer.padding, tuple) else (layer.padding,))


def apply_cpu_rewrites(unet, block_elements: int = 1 << 23) -> int:
    """On CPU, swap in the attention core, the GEGLUs' GELU, the ResnetBlock2Ds' time-embedding
    add and the Transformer2DModels' projections; elsewhere (Ascend: mindone's flash attention
    and MindSpore's kernels) leave every layer as it is.

    Returns how many layers changed. The switch is mindscedit.layers.cpu_kernel_workarounds
    (MINDSCEDIT_CPU_REWRITES=0 turns it off on CPU too).
    """
    if not cpu_kernel_workarounds():
        return 0
    changed = 0
    for _, cell in unet.cells_and_names():
        if isinstance(cell, Attention) and type(cell.processor) is AttnProcessor2_0:
            cell.attention_core = AttentionCore(cell.scale, block_elements)
            cell.set_processor(CoreAttnProcessor())
            changed += 1
        elif isinstance(cell, GEGLU) and not isinstance(cell.gelu, ExactGELU):
            cell.exact_gelu = ExactGELU()
            object.__setattr__(cell, "gelu", cell.exact_gelu)  # shadows GEGLU's gelu() method
            changed += 1
        elif type(cell) is ResnetBlock2D and cell.time_embedding_norm == "default" \
                and cell.time_emb_proj is not None:
            cell.__class__ = BiasAddResnetBlock2D  # same attributes and weights, another construct
            changed += 1
        elif type(cell) is Transformer2DModel and cell.is_input_continuous \
                and _is_pointwise(cell.proj_in) and _is_pointwise(cell.proj_out):
            cell.__class__ = TokenProjTransformer2DModel
            changed += 1
    return changed
