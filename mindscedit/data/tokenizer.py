"""A tiny byte-level CLIP tokenizer for tests and tiny models (no download needed)."""
import json
from pathlib import Path
from typing import Union

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

__all__ = ["write_tiny_clip_tokenizer"]

MODEL_MAX_LENGTH = 77  # CLIP's context length, as in Stable Diffusion's tokenizer_config.json


def write_tiny_clip_tokenizer(folder: Union[str, Path]) -> CLIPTokenizer:
    """Write a CLIP tokenizer with a 514-token vocabulary to ``folder`` and return it loaded.

    The vocabulary is CLIP's 256 byte characters, their end-of-word ``</w>`` forms and the two
    special tokens, laid out in the same order as the real CLIP vocab. With no BPE merges every
    character becomes one token, so any text tokenizes without unknown tokens. The folder ends up
    in ``save_pretrained`` format (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json), i.e. what diffusers expects in a pipeline's ``tokenizer/`` subfolder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab = {token: i for i, token in enumerate(tokens)}
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    merges_file.write_text("#version: 0.2\n", "utf-8")  # header only: no merges

    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    return tokenizer
