"""Text-image data for Stable Diffusion fine-tuning: records, transforms and the MindSpore pipeline."""
from .dataset import (
    ResumableShardedSampler,
    TextImageDataset,
    create_dataloader,
    decode_sample_key,
    encode_sample_key,
    iterate_batches,
)
from .sources import DataError, Record, load_instance_records, load_records
from ..models.text import write_tiny_clip_tokenizer
from .transforms import ImageTransform, apply_params, decode_image, to_rgb

__all__ = [
    "DataError",
    "Record",
    "load_records",
    "load_instance_records",
    "ImageTransform",
    "apply_params",
    "decode_image",
    "to_rgb",
    "TextImageDataset",
    "ResumableShardedSampler",
    "create_dataloader",
    "encode_sample_key",
    "decode_sample_key",
    "iterate_batches",
    "write_tiny_clip_tokenizer",
]
from .conditions import ANNOTATORS, ConditionSpec, annotate
