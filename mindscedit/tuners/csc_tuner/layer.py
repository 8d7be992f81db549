"""The CSC-Tuner of one condition: pre-hint encoder, dense hint chain, one MLP per decoder skip.

Parameter paths follow scepter's key layout (`pre_hint_blocks.{n}`, `dense_hint_blocks.{i}.1`,
`lsc_tuner_blocks.{m}.tuner_op.ln{1,2}`), so its weight files map one to one.
"""
import math
from typing import Sequence, Tuple

import mindspore as ms
from mindspore import nn
from mindspore.common.initializer import HeUniform, Uniform

from ..sc_tuner.layer import SCEAdapter


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, zero: bool = False) -> nn.Conv2d:
    """Conv2d with PyTorch's padding and default init (or all zeros)."""
    if zero:
        weight, bias = "zeros", "zeros"
    else:
        weight, bias = HeUniform(math.sqrt(5)), Uniform(1.0 / math.sqrt(in_ch * kernel * kernel))
    return nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, pad_mode="pad", padding=kernel // 2,
        has_bias=True, weight_init=weight, bias_init=bias,
    )


class SkipMLP(nn.Cell):
    """Holds one SCEAdapter as `tuner_op` (the key layout's level)."""

    def __init__(self, dim: int, down_ratio: float):
        super().__init__()
        self.tuner_op = SCEAdapter(dim, down_ratio)


class CSCTuner(nn.Cell):
    """Condition image -> one control residual per encoder skip.

    skip_layout: (channels, made by a downsampler?) of each encoder skip, in push order.
    hints(cond): pre-hint stack (/8), then the cascaded chain; stage i (SiLU, zero conv, stride 2
        where the encoder downsampled) gives hint_i at skip i's shape.
    control(skips, hints): ctrl_i = hint_i + MLP_m(skip_i + hint_i), with m the decoder step that
        pops skip i. Zero at init: every chain conv and every MLP output layer starts at zero.
    """

    def __init__(self, skip_layout: Sequence[Tuple[int, bool]], dense_hint_kernel: int = 3, down_ratio: float = 1.0,
                 condition_channels: int = 3, hint_channels: int = 256):
        super().__init__()
        if dense_hint_kernel not in (1, 3):
            raise ValueError(f"dense_hint_kernel must be 1 or 3, got {dense_hint_kernel}")
        widths = [condition_channels, 16, 16, 32, 32, 96, 96, hint_channels]
        strides = [1, 1, 2, 1, 2, 1, 2]
        layers = []
        for n, stride in enumerate(strides):
            layers.append(_conv(widths[n], widths[n + 1], 3, stride))
            if n < len(strides) - 1:
                layers.append(nn.SiLU())
        self.pre_hint_blocks = nn.SequentialCell(layers)

        stages, in_ch = [], hint_channels
        for channels, downsampled in skip_layout:
            stride = 2 if downsampled else 1
            stages.append(nn.SequentialCell([nn.SiLU(), _conv(in_ch, channels, dense_hint_kernel, stride, zero=True)]))
            in_ch = channels
        self.dense_hint_blocks = nn.CellList(stages)
        self.lsc_tuner_blocks = nn.CellList([SkipMLP(ch, down_ratio) for ch, _ in reversed(list(skip_layout))])
        self.num_skips = len(skip_layout)

    def hints(self, condition: ms.Tensor) -> Tuple[ms.Tensor, ...]:
        h = self.pre_hint_blocks(condition)
        hints = ()
        for stage in self.dense_hint_blocks:
            h = stage(h)
            hints = hints + (h,)
        return hints

    def control(self, skips: Tuple[ms.Tensor, ...], hints: Tuple[ms.Tensor, ...]) -> Tuple[ms.Tensor, ...]:
        controls = ()
        for i in range(self.num_skips):
            mlp = self.lsc_tuner_blocks[self.num_skips - 1 - i].tuner_op
            x = skips[i].astype(hints[i].dtype) + hints[i]
            controls = controls + ((hints[i] + mlp(x)).astype(skips[i].dtype),)
        return controls

    def construct(self, skips, condition):
        """Mixed precision as in peft: the tuner computes in its weights' dtype (fp32 master
        weights under a low-precision UNet) and hands back controls in the skips' dtype."""
        weight_dtype = self.pre_hint_blocks[0].weight.dtype
        return self.control(skips, self.hints(condition.astype(weight_dtype)))
