"""Small Cells shared by the tuners and the UNet's CPU rewrites (models/cpu_rewrites.py)."""
import math
import os

import mindspore as ms
from mindspore import nn, ops

CPU_WORKAROUNDS_ENV = "MINDSCEDIT_CPU_REWRITES"
OLD_CPU_WORKAROUNDS_ENV = "MINDSCEDIT_FAST_LAYERS"  # its earlier name, still read


def cpu_kernel_workarounds() -> bool:
    """The one switch for every rewrite that works around MindSpore's CPU kernels (the index
    memory of broadcasts and transposes, attention without a fused kernel): on for a CPU
    context, off on Ascend, where mindone's and MindSpore's own layers (flash attention) run.
    MINDSCEDIT_CPU_REWRITES=0 turns the rewrites off on CPU too (A/B runs, and running the
    Ascend-shaped graph on CPU)."""
    setting = os.environ.get(CPU_WORKAROUNDS_ENV, os.environ.get(OLD_CPU_WORKAROUNDS_ENV, "1"))
    return ms.get_context("device_target") == "CPU" and setting != "0"


SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class ExactGELU(nn.Cell):
    """x * Phi(x), Phi the standard normal CDF (torch's default GELU), backward Phi(x) + x * phi(x).

    The same formula as MindSpore's `ops.gelu(approximate="none")`, which builds it from products
    with 0-d tensors: on CPU each such implicit broadcast keeps 16 bytes of index per element for
    as long as the graph lives (about 40 bytes per element over forward and backward). Python
    scalars and a hand-written backward that keeps only x avoid that.
    """

    def construct(self, x):
        return x * (0.5 + 0.5 * ops.erf(x * SQRT_HALF))

    def bprop(self, x, out, dout):
        cdf = 0.5 + 0.5 * ops.erf(x * SQRT_HALF)
        pdf = ops.exp(x * x * -0.5) * INV_SQRT_2PI
        return (dout * (cdf + x * pdf),)


# Moving between the image layout [batch, channels, pixels] and tokens [batch, pixels, channels]
# by transposing costs on CPU: MindSpore's Transpose kernel keeps 8 bytes of index per element
# for as long as the graph lives. A Dense layer next to the move can take it over instead, by
# multiplying with transposed operands; the only data moved is whole [channels, pixels] blocks,
# batch by batch (unstack / stack, which keep nothing).
_COLUMNS_TIMES_WEIGHT_T = ops.MatMul(transpose_a=True, transpose_b=True)  # A^T W^T
_WEIGHT_TIMES_ROWS_T = ops.MatMul(transpose_b=True)                     # W A^T


def swap_leading_axes(x):
    """[a, b, n] -> [b, a, n], unstacking along the shorter of the two axes."""
    a, b, n = x.shape
    if a == 1 or b == 1:
        return x.reshape(b, a, n)
    if a <= b:
        return ops.stack(ops.unstack(x, axis=0), axis=1)
    return ops.stack(ops.unstack(x, axis=1), axis=0)


def _in_dtype_of(x, weight, bias):
    """The layer's weights in the activations' dtype, as a Dense cell under AMP O2 casts them
    (fp32 weights, fp16 compute); a no-op where they already match."""
    return weight.astype(x.dtype), None if bias is None else bias.astype(x.dtype)


def dense_to_tokens(x, weight, bias=None):
    """A Dense layer (weight [out, channels]) on every pixel of x [batch, channels, pixels]:
    returns tokens [batch, pixels, out]."""
    batch, channels, pixels = x.shape
    weight, bias = _in_dtype_of(x, weight, bias)
    columns = swap_leading_axes(x).reshape(channels, batch * pixels)
    tokens = _COLUMNS_TIMES_WEIGHT_T(columns, weight)
    if bias is not None:
        tokens = ops.bias_add(tokens, bias)
    return tokens.reshape(batch, pixels, weight.shape[0])


def dense_to_image(tokens, weight, bias=None):
    """A Dense layer (weight [out, channels]) on tokens [batch, pixels, channels]: returns the
    image layout [batch, out, pixels]."""
    batch, pixels, channels = tokens.shape
    weight, bias = _in_dtype_of(tokens, weight, bias)
    out = _WEIGHT_TIMES_ROWS_T(weight, tokens.reshape(batch * pixels, channels))
    out = swap_leading_axes(out.reshape(weight.shape[0], batch, pixels))
    if bias is not None:
        out = ops.bias_add(out, bias)  # along axis 1, the channels
    return out
