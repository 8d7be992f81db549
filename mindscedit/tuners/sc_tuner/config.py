from dataclasses import dataclass


@dataclass
class SCTunerConfig:
    """SC-Tuner (SCEdit, CVPR 2024): one residual MLP per UNet decoder skip connection.

    down_ratio: hidden width of each MLP as a fraction of the skip's channels (1.0: no bottleneck).
    adapter_name: the name used in saved keys (`scetuner_<name>`), "default" as in ms-swift.
    detach_encoder: cut the gradient into the encoder. Right whenever the tuners are the only
        trainable weights: backward then stops at the skips and never runs through the encoder.
    """

    down_ratio: float = 1.0
    adapter_name: str = "default"
    detach_encoder: bool = True
