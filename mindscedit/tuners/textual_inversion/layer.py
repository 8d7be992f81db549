"""A token embedding with new rows after the vocabulary: the only weights pivotal tuning trains in
a text encoder."""
import numpy as np
import mindspore as ms
from mindspore import nn, ops


class _NewRows(nn.Cell):
    def __init__(self, rows: np.ndarray, name: str):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.asarray(rows, np.float32)), name=name)


class ExtendedTokenEmbedding(nn.Cell):
    """ids below the original vocabulary size read the original table (frozen, untouched), the others
    the rows of `new_embeddings`.

    The new rows are a Parameter of their own: training them cannot change any other row, bit for
    bit, without restoring anything after a step (diffusers trains the whole table and copies the
    old rows back), and their gradient is a scatter of [B, L] rows, not one of the whole table.
    They stay fp32 (master weights) in an fp16 or bf16 encoder and are cast to the table's dtype;
    they sit in a sub-Cell after the table, so the encoder's first parameter, whose dtype mindone
    reports as the model's, is still the table.
    """

    def __init__(self, base: nn.Cell, new_rows: np.ndarray, name: str):
        super().__init__()
        self.base = base
        self.vocab_size = int(base.embedding_table.shape[0])
        self.num_new = int(new_rows.shape[0])
        self.new_rows = _NewRows(new_rows, name)

    @property
    def new_embeddings(self) -> ms.Parameter:
        return self.new_rows.weight

    def construct(self, input_ids):
        old = self.base(ops.clamp(input_ids, 0, self.vocab_size - 1))
        rows = ops.clamp(input_ids - self.vocab_size, 0, self.num_new - 1)
        new = ops.gather(self.new_rows.weight, rows, 0).astype(old.dtype)
        is_new = ops.broadcast_to(ops.expand_dims(input_ids >= self.vocab_size, -1), old.shape)
        return ops.select(is_new, new, old)
