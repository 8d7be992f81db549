"""The SC-Tuner: a zero-initialised residual MLP applied to one skip feature map."""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform, Uniform

from ...layers import ExactGELU, cpu_kernel_workarounds, dense_to_image, dense_to_tokens


class SCEAdapter(nn.Cell):
    """y = ln2(GELU(ln1(x))) per pixel (over the channels); returns only the residual y.

    ln1 has the default Linear init, ln2 is all zeros, so a fresh adapter adds nothing.
    """

    def __init__(self, dim: int, down_ratio: float = 1.0):
        super().__init__()
        hidden = int(dim * down_ratio)
        if hidden < 1:
            raise ValueError(f"down_ratio {down_ratio} leaves no hidden units for a {dim}-channel skip")
        bound = 1.0 / math.sqrt(dim)
        self.ln1 = nn.Dense(dim, hidden, weight_init=HeUniform(math.sqrt(5)), bias_init=Uniform(bound))
        # On CPU: ln1 and ln2 straight from and back to the image layout (no transposes) and a
        # GELU with a lighter backward (mindscedit.layers says why); elsewhere the plain layers.
        self.image_layout = cpu_kernel_workarounds()
        self.activate = ExactGELU() if self.image_layout else nn.GELU(approximate=False)
        self.ln2 = nn.Dense(hidden, dim, weight_init="zeros", bias_init="zeros")

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        # Runs in its weights' dtype (fp32 master weights under a low-precision UNet) and hands
        # back the skip's dtype, as peft's and mindone's adapters do.
        b, c, h, w = x.shape
        dtype = self.ln1.weight.dtype
        if self.image_layout:
            pixels = x.reshape(b, c, h * w).astype(dtype)
            hidden = self.activate(dense_to_tokens(pixels, self.ln1.weight, self.ln1.bias))
            y = dense_to_image(hidden, self.ln2.weight, self.ln2.bias)
            return y.reshape(b, c, h, w).astype(x.dtype)
        tokens = x.astype(dtype).transpose(0, 2, 3, 1).reshape(b, h * w, c)
        y = self.ln2(self.activate(self.ln1(tokens)))
        return y.reshape(b, h, w, c).transpose(0, 3, 1, 2).astype(x.dtype)


class SCTuner(nn.Cell):
    """skip' = skip + scale * (T(skip) - skip) with T(skip) = skip + SCEAdapter(skip).

    `scale` is the inference strength (tuner_scale): 1 is the trained tuner, 0 the base model
    exactly. It is a non-trainable Parameter so that changing it never needs a new graph.
    """

    def __init__(self, dim: int, down_ratio: float = 1.0):
        super().__init__()
        self.tuner_op = SCEAdapter(dim, down_ratio)
        self.scale = ms.Parameter(ms.Tensor(1.0, ms.float32), name="scale", requires_grad=False)

    def construct(self, skip: ms.Tensor) -> ms.Tensor:
        residual = self.tuner_op(skip)
        return skip + ops.cast(self.scale, residual.dtype) * residual
