"""Pivotal tuning's new tokens (textual inversion inside DreamBooth): config (which tokens, which words
stand for them), layer (the extended token embedding), model (adding them to tokenizers and text
encoders), io (the embeddings file)."""
from .config import NewTokens
from .io import EMBEDDINGS_SUFFIX, embeddings_file_name, read_embeddings, save_embeddings
from .layer import ExtendedTokenEmbedding
from .model import EMBEDDING_KEYS, add_new_tokens, new_rows_of

__all__ = ["NewTokens", "ExtendedTokenEmbedding", "EMBEDDING_KEYS", "EMBEDDINGS_SUFFIX", "add_new_tokens",
           "embeddings_file_name", "new_rows_of", "read_embeddings", "save_embeddings"]
