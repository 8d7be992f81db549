"""Adding pivotal tuning's new tokens to a pipeline's tokenizers and text encoders."""
from typing import Dict, List, Optional, Sequence

import numpy as np

from ...errors import UserError
from .config import NewTokens
from .layer import ExtendedTokenEmbedding

# The key of each text encoder's rows in an embeddings file, as diffusers' advanced DreamBooth
# scripts write them and its load_textual_inversion takes them: CLIP ViT-L, then OpenCLIP ViT-bigG.
EMBEDDING_KEYS = ("clip_l", "clip_g")


def initial_rows(table: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Random normal rows scaled to the spread of the existing embeddings (diffusers' initialisation)."""
    return (rng.standard_normal((count, table.shape[1])) * float(table.std())).astype(np.float32)


def add_new_tokens(tokenizers: Sequence, text_encoders: Sequence, new_tokens: NewTokens,
                   rows: Optional[Dict[str, np.ndarray]] = None, seed: int = 0) -> List:
    """Add the new tokens to every tokenizer and their rows to every text encoder (ExtendedTokenEmbedding);
    returns the new-row Parameters, one per encoder. rows: the rows by EMBEDDING_KEYS (loading saved
    embeddings), else drawn with `seed` (the same on every rank). Call it before building the Cells that
    run the encoders: a Cell compiled before keeps the graph it compiled, without the new rows."""
    tokens = new_tokens.tokens
    rng = np.random.default_rng([seed, 0x7E11])
    params = []
    for key, tokenizer, encoder in zip(EMBEDDING_KEYS, tokenizers, text_encoders):
        embedding = encoder.get_input_embeddings()
        if isinstance(embedding, ExtendedTokenEmbedding):
            raise UserError(f"{key}: this text encoder already has new tokens")
        table = embedding.embedding_table
        vocab = int(table.shape[0])
        if len(tokenizer) != vocab:
            raise UserError(f"{key}: the tokenizer has {len(tokenizer)} tokens but its text encoder {vocab} "
                            "embeddings; new tokens need them to agree")
        present = [t for t in tokens if t in tokenizer.get_vocab()]
        if present:
            raise UserError(f"token {present[0]} is already in the {key} tokenizer's vocabulary; choose other tokens")
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        if ids != list(range(vocab, vocab + len(tokens))):
            raise UserError(f"{key}: the new tokens got ids {ids}, expected {vocab}..{vocab + len(tokens) - 1}")
        if rows is None:
            new_rows = initial_rows(table.asnumpy().astype(np.float32), len(tokens), rng)
        else:
            new_rows = rows[key]
            if new_rows.shape != (len(tokens), table.shape[1]):
                raise UserError(f"{key}: embeddings of shape {tuple(new_rows.shape)}, but this text encoder takes "
                                f"{len(tokens)} rows of {table.shape[1]}")
        extended = ExtendedTokenEmbedding(embedding, new_rows, f"{key}.new_token_embeddings")
        encoder.set_input_embeddings(extended)
        params.append(extended.new_embeddings)
    return params


def new_rows_of(text_encoders: Sequence) -> Dict[str, np.ndarray]:
    """The trained rows of each encoder, by EMBEDDING_KEYS."""
    return {key: encoder.get_input_embeddings().new_embeddings.asnumpy()
            for key, encoder in zip(EMBEDDING_KEYS, text_encoders)}
