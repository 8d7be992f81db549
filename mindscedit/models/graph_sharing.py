"""Compile each kind of repeated block once, not once per copy.

MindSpore's front end parses, type-infers and differentiates the graph of every Cell instance
on its own, so the 22 ResnetBlock2D and 16 Transformer2DModel copies of an SD1.5 UNet (and the
VAE's resnets, the text encoder's layers) are each compiled separately. A Cell marked reusable
(what `mindspore.lazy_inline` does from `__init__`) shares one graph with every instance of the
same key. With the "front" policy (the default here) that graph is inlined back in the front
end: parsing and type inference see each kind of block once, the backend one plain graph. With
lazy_inline's own default policy ("calls" here) the shared graph stays a called subgraph through
the whole compile, so the passes after autodiff and the backend also see each kind of block
once; MindSpore supports that on Ascend only (its CPU backend fails on such graphs). Marked
cells must not nest: a reusable cell inside another one crashes the compiler.

`mindspore.lazy_inline` keys instances by their constructor arguments. Here the key is taken
once the network is final (tuners injected, CPU rewrites in place) from what its graph is built
of: every sub-cell's path and class, its recompute state, its plain attributes and tensor
constants, the class of any other object it holds (an attention processor), and every
parameter's path, shape, dtype and requires_grad. Two blocks share a graph only if all of that is equal; only their weights differ.

MINDSCEDIT_SHARE_GRAPHS in the environment picks the policy: "front" (default), "calls" (Ascend
only), or "0" to leave every block compiled on its own (A/B runs).
"""
import hashlib
import os

import mindspore as ms
from mindspore import nn
from .. import runtime  # noqa: F401  (first: it imports mindone's noisy module quietly)
from mindone.diffusers.models.resnet import ResnetBlock2D
from mindone.diffusers.models.transformers.transformer_2d import Transformer2DModel
from mindone.transformers.models.clip.modeling_clip import CLIPEncoderLayer

from ..errors import UserError

REPEATED_BLOCKS = (ResnetBlock2D, Transformer2DModel, CLIPEncoderLayer)  # none contains another
SHARING_POLICIES = ("front", "calls", "0")

_PLAIN = (bool, int, float, str, tuple, type(None))
# Attributes that differ between two builds of the same network and never reach the graph.
VOLATILE_ATTRIBUTES = {"phase", "cell_init_args", "no_inline", "create_time", "arguments_key", "compile_cache",
                       "jit_config_dict", "init_tensor"}


def update_with_cell_constants(digest, cell: nn.Cell) -> None:
    """Feed `digest` with what each sub-cell contributes to a graph besides its weights: path and
    class, tensor constants by value, plain attributes as they are, other objects by class."""
    for path, sub in cell.cells_and_names():
        digest.update(f"{path}:{type(sub).__qualname__}".encode())
        # Recompute (gradient checkpointing) lives in private attributes: a recomputed block and
        # a plain one build different graphs (mindone recomputes all but a block's first resnet).
        recompute = (getattr(sub, "_has_config_recompute", False), getattr(sub, "_scope", None))
        digest.update(f"recompute={recompute!r}".encode())
        # Cell flags: output recompute, and the casts of mixed precision (to_float's fp16/bf16).
        flags = sorted((k, repr(v)) for k, v in sub.get_flags().items()) if hasattr(sub, "get_flags") else []
        digest.update(f"flags={flags!r}".encode())
        for name, value in sorted(vars(sub).items()):
            if name in VOLATILE_ATTRIBUTES or isinstance(value, (ms.Parameter, nn.Cell)):
                continue  # parameters are keyed by shape elsewhere; cells are walked above
            if isinstance(value, ms.Tensor):
                digest.update(name.encode() + value.asnumpy().tobytes())
            elif name.startswith("_"):
                continue
            elif isinstance(value, _PLAIN):
                digest.update(f"{name}={value!r}".encode())
            else:
                digest.update(f"{name}:{type(value).__qualname__}".encode())


def block_key(block: nn.Cell) -> str:
    digest = hashlib.sha256()
    update_with_cell_constants(digest, block)
    for name, p in block.parameters_and_names():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}".encode())
    return f"lazy_inline_{type(block).__name__}_{digest.hexdigest()[:24]}"


def has_active_dropout(block: nn.Cell) -> bool:
    """Blocks sharing a graph share its random ops too: their dropout masks would be the same."""
    for _, cell in block.cells_and_names():
        if isinstance(cell, nn.Dropout):
            rates = [cell.p if cell.p is not None else 1.0 - cell.keep_prob]
        else:  # a rate for functional dropout, as CLIPAttention.dropout
            rates = [v for k, v in vars(cell).items() if "dropout" in k and isinstance(v, float)]
        if any(rate > 0 for rate in rates):
            return True
    return False


def sharing_policy() -> str:
    """MINDSCEDIT_SHARE_GRAPHS, checked against the device the context is set to."""
    policy = os.environ.get("MINDSCEDIT_SHARE_GRAPHS", "front")
    if policy not in SHARING_POLICIES:
        raise UserError(f"MINDSCEDIT_SHARE_GRAPHS={policy!r}: expected one of {', '.join(SHARING_POLICIES)}")
    if policy == "calls" and ms.get_context("device_target") != "Ascend":
        raise UserError("MINDSCEDIT_SHARE_GRAPHS=calls needs an Ascend device: MindSpore's CPU backend "
                        "cannot run shared blocks kept as calls (use front, the default)")
    return policy


def share_repeated_blocks(network: nn.Cell) -> int:
    """Mark every outermost block of REPEATED_BLOCKS in `network` reusable, with the policy of
    MINDSCEDIT_SHARE_GRAPHS, except blocks with active dropout; returns how many blocks were
    marked. Call it once the network is final: a block changed afterwards would keep a stale key."""
    policy = sharing_policy()
    if policy == "0":
        return 0
    marked = []  # paths of marked blocks: their sub-cells are not marked again
    for path, cell in network.cells_and_names():
        if not isinstance(cell, REPEATED_BLOCKS) or has_active_dropout(cell):
            continue
        if not any(path.startswith(p + ".") for p in marked):
            cell.cell_init_args = block_key(cell)
            if policy == "front":
                cell.no_inline = False  # as lazy_inline(policy="front"); left unset, the calls stay
            marked.append(path)
    return len(marked)
