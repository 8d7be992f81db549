from dataclasses import dataclass, field
from typing import List

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD_TARGETS = ["ff.net.0.proj", "ff.net.2"]
# The text encoders' attention projections (CLIP's layer names), where diffusers' DreamBooth scripts put
# text-encoder LoRA.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_TARGET_PRESETS = {"attn": ATTENTION_TARGETS, "attn+ff": ATTENTION_TARGETS + FEED_FORWARD_TARGETS}


@dataclass
class LoRAConfig:
    """LoRA on the UNet's attention projections (and optionally its feed-forward layers).

    alpha defaults to rank (scaling 1), as in diffusers' train_text_to_image_lora.py. The down
    projection (lora_A) starts gaussian with std 1/rank, the up projection (lora_B) at zero.
    use_dora: weight-decomposed LoRA (DoRA): W' = m * (W + s B A) / ||W + s B A||_row with a learned
    magnitude m per output row, initialised to ||W||_row (so a fresh adapter changes nothing).
    """

    rank: int = 4
    alpha: float = None
    target_modules: List[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    adapter_name: str = "default"
    use_dora: bool = False

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)
