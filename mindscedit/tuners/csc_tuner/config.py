from dataclasses import dataclass


@dataclass
class CSCTunerConfig:
    """One CSC-Tuner per condition type (canny, depth, ...).

    dense_hint_kernel: 3 (as scepter's shipped configs; 99.1M parameters on SD1.5) or 1 (28.8M,
        about 8% of a ControlNet: the paper's figure).
    down_ratio: hidden width of each skip MLP as a fraction of the skip's channels.
    condition_channels: channels of the condition image (3: RGB in [0, 1]).
    hint_channels: width of the pre-hint encoder's output.
    """

    dense_hint_kernel: int = 3
    down_ratio: float = 1.0
    condition_channels: int = 3
    hint_channels: int = 256
