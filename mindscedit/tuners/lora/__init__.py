from .config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, TEXT_ENCODER_TARGETS, LoRAConfig
from .formats import LAYOUTS, LoraModule, kohya_name, module_from_kohya
from .layer import LoraLinear
from .model import (
    adapter_names,
    inject_lora,
    lora_layers,
    lora_modules,
    merge_lora,
    refresh_graph,
    set_adapters,
    unmerge_lora,
)
from .merge import COMBINATIONS, merge_adapters
from .io import (
    add_lora,
    add_lora_modules,
    combine_adapters,
    load_lora,
    merge_lora_files,
    read_lora_file,
    read_lora_metadata,
    save_lora,
    write_lora_file,
)
