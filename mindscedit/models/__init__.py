from .loading import SDComponents, build_unet, check_model_folder, load_components
from .presets import UNET_PRESETS, unet_preset
from .tiny import make_tiny_model
