"""mindscedit: vanilla, LoRA and SCEdit fine-tuning of Stable Diffusion on MindSpore."""
import os

# oneDNN picks a slow reference convolution on AVX-512 CPUs; capping it at AVX2 makes CPU
# convolutions ~60x faster. It must be set before MindSpore loads oneDNN, and it has no effect
# on Ascend. A value the user set is kept.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

__version__ = "0.1.0"
