"""ControlNet on a frozen UNet, with ControlledUNet's call signature: the baseline that the
CSC-Tuner's parameter count and training memory are compared with (mindscedit bench).

mindone's ControlNetModel (a trainable copy of the UNet's encoder and mid block, built with
ControlNetModel.from_unet) feeds its zero-conv residuals to the frozen UNet's skips.
"""
from mindspore import nn


class ControlNetUNet(nn.Cell):
    def __init__(self, unet):
        super().__init__()
        from mindone.diffusers import ControlNetModel

        self.controlnet = ControlNetModel.from_unet(unet)
        self.unet = unet

    def construct(self, sample, timestep, encoder_hidden_states, conditions, scales, control_scale,
                  added_cond_kwargs=None):
        # The trainable ControlNet keeps fp32 master weights under a low-precision UNet: it runs
        # in its own dtype and its residuals are cast to the UNet's.
        control_dtype = self.controlnet.conv_in.weight.dtype
        down, mid = self.controlnet(
            sample.astype(control_dtype), timestep, encoder_hidden_states.astype(control_dtype),
            controlnet_cond=conditions[0].astype(control_dtype), conditioning_scale=1.0,
            added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )
        scale = (scales[0] * control_scale).astype(sample.dtype)
        down = tuple(d.astype(sample.dtype) * scale for d in down)
        return self.unet(
            sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
            mid_block_additional_residual=mid.astype(sample.dtype) * scale, added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
