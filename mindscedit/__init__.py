"""mindscedit: vanilla, LoRA/DoRA, SCEdit and CSC-Tuner fine-tuning of Stable Diffusion on MindSpore."""
import os

# oneDNN picks a slow reference convolution on AVX-512 CPUs; capping it at AVX2 makes CPU
# convolutions ~60x faster. It must be set before MindSpore loads oneDNN, and it has no effect
# on Ascend. A value the user set is kept.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
# transformers announces at import that it found no PyTorch: expected here (MindSpore runs the
# models; transformers only tokenizes), so the notice stays out of every log.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
