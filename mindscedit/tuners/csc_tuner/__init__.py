"""CSC-Tuner (SCEdit's controllable generation): condition hints that edit the UNet's skips."""
from .config import CSCTunerConfig
from .layer import CSCTuner
from .model import ControlledUNet, build_csc_tuner
from .io import load_csc_tuner_weights, read_csc_tuner_file, save_csc_tuner
