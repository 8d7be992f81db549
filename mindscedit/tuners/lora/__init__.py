from .config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, LoRAConfig
from .model import inject_lora
from .io import load_lora, read_lora_metadata, save_lora
