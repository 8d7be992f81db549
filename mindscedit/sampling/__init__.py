"""Text-to-image sampling with mindone's schedulers, for trained SC-Tuners, LoRA or plain UNets."""
from .adapters import apply_csc_tuners, apply_loras, apply_sc_tuners, set_lora_scale
from .images import image_grid, save_images, slug
from .sampler import Sampler
from .schedulers import SCHEDULERS, make_scheduler
from .validation import Validator
