"""Prompts to token ids, and a tiny byte-level CLIP tokenizer for tests and tiny models."""
import json
import logging
from pathlib import Path
from typing import Union

import numpy as np

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

__all__ = ["PromptTokenizer", "PromptTokenizers", "write_tiny_clip_tokenizer"]

logger = logging.getLogger("mindscedit")

MODEL_MAX_LENGTH = 77  # CLIP's context length, as in Stable Diffusion's tokenizer_config.json
# transformers sets model_max_length to ~1e30 when the tokenizer config does not give one.
_MAX_SANE_TOKEN_LENGTH = 100_000


class PromptTokenizer:
    """text -> int32 token ids [L], padded and cut to the tokenizer's length, as the text encoder
    reads them. A prompt longer than that is cut; the first such prompt is named in a warning."""

    def __init__(self, tokenizer, rewrite=None):
        if tokenizer.model_max_length > _MAX_SANE_TOKEN_LENGTH:
            raise ValueError("tokenizer.model_max_length is not set; load the tokenizer with its tokenizer_config.json")
        self.tokenizer = tokenizer
        self.length = tokenizer.model_max_length
        self.warned = False
        self.rewrite = rewrite  # text -> text before tokenizing (pivotal tuning's abstractions -> new tokens)

    def __call__(self, text: str) -> np.ndarray:
        if self.rewrite is not None:
            text = self.rewrite(text)
        ids = self.tokenizer(text, padding="max_length", max_length=self.length, truncation=False, verbose=False)["input_ids"]
        if len(ids) > self.length:
            self._warn_cut(ids)
            ids = ids[: self.length - 1] + [self.tokenizer.eos_token_id]
        return np.asarray(ids, dtype=np.int32)

    def _warn_cut(self, ids) -> None:
        if self.warned:
            return
        self.warned = True
        cut = self.tokenizer.decode(ids[self.length - 1 : -1])
        logger.warning("a prompt is longer than the text encoder's %d tokens; cut off: %r%s (further long "
                       "prompts are cut without a warning)", self.length, cut[:200], "..." if len(cut) > 200 else "")


class PromptTokenizers:
    """text -> int32 token ids [N, L], row i from tokenizer i (SDXL's two CLIP tokenizers), each
    padded and cut as PromptTokenizer does. All tokenizers must have the same length."""

    def __init__(self, tokenizers, rewrite=None):
        self.tokenizers = [PromptTokenizer(tokenizer, rewrite) for tokenizer in tokenizers]
        lengths = sorted({tokenizer.length for tokenizer in self.tokenizers})
        if len(lengths) > 1:
            raise ValueError(f"the tokenizers' model_max_length differ ({', '.join(map(str, lengths))}); "
                             "one token-id array per prompt needs one length")
        self.length = lengths[0]

    def __call__(self, text: str) -> np.ndarray:
        return np.stack([tokenize(text) for tokenize in self.tokenizers])


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
