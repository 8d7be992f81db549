from .config import SCTunerConfig
from .layer import SCEAdapter, SCTuner
from .model import (
    SkipEditedUpBlock,
    decoder_skip_slots,
    encoder_skip_channels,
    encoder_skip_layout,
    get_sc_tuners,
    inject_sc_tuners,
    sc_tuner_dims,
    sc_tuner_named_parameters,
    sc_tuner_parameters,
    set_tuner_scale,
)
from .io import load_sc_tuners, save_sc_tuners, sc_tuner_state_dict
