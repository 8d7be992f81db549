"""ControlNet on a frozen UNet, with ControlledUNet's call signature: the baseline that the
CSC-Tuner's parameter count and training memory are compared with (mindscedit bench).

mindone's ControlNetModel (a trainable copy of the UNet's encoder and mid block, built with
ControlNetModel.from_unet) feeds its zero-conv residuals to the frozen UNet's skips.
"""
import mindspore as ms
from mindspore import nn


class ControlNetUNet(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        from mindone.diffusers import ControlNetModel

        self.controlnet = ControlNetModel.from_unet(unet)
        self.unet = unet

    def construct(self, sample, timestep, encoder_hidden_states, conditions, scales, control_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond=conditions[0],
            conditioning_scale=1.0, return_dict=False,
        )
        scale = (scales[0] * control_scale).astype(sample.dtype)
        down = tuple(d * scale for d in down)
        return self.unet(
            sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
            mid_block_additional_residual=mid * scale, return_dict=False,
        )[0]
