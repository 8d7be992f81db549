"""Speed/memory optimisations change no numbers: same losses, same trained weights, same keys.

Each method trains the tiny UNet a few steps with the trainer's step (training.builder) from
identical weights and inputs, once as mindone builds it and once with an optimisation
(`apply_cpu_rewrites`, `share_repeated_blocks`); loss trajectories and the trained weights must
agree to fp32 rounding.
"""
import math

import numpy as np
import pytest
import mindspore as ms
from mindone.diffusers.models.attention_processor import Attention
from mindone.diffusers.models.resnet import ResnetBlock2D
from mindone.diffusers.models.transformers.transformer_2d import Transformer2DModel

from mindscedit.training.config import TrainConfig
from mindscedit.layers import ExactGELU, dense_to_image, dense_to_tokens, swap_leading_axes
from mindscedit.losses import DiffusionLoss
from mindscedit.models import build_unet, unet_preset
from mindscedit.models.cpu_rewrites import (AttentionCore, BiasAddResnetBlock2D, CoreAttnProcessor,
                                          TokenProjTransformer2DModel, apply_cpu_rewrites, merge_heads, split_heads)
from mindscedit.models.graph_sharing import REPEATED_BLOCKS, block_key, has_active_dropout, share_repeated_blocks
from mindscedit.training.builder import build_step
from mindscedit.training.methods import get_method
from mindscedit.tuners.lora.config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS

STEPS = 4
BATCH = 2


@pytest.fixture(scope="module")
def base_weights():
    ms.set_seed(0)
    unet = build_unet(unet_preset("tiny"))
    # Non-zero everywhere, so a wrong attention would change the output.
    return {name: p.asnumpy().copy() for name, p in unet.parameters_and_names()}


def fresh_unet(weights):
    unet = build_unet(unet_preset("tiny"))
    for name, p in unet.parameters_and_names():
        p.set_data(ms.Tensor(weights[name]))
    return unet


def train(weights, method_name, optimisation=None, steps=STEPS):
    """(losses, {param name: trained value}) after `steps` steps of `method_name`, the step built
    by the trainer's builder with the optimisation(s) named on and the others off."""
    from mindone.diffusers import DDPMScheduler
    from mindscedit.models.presets import SD_SCHEDULER

    unet = fresh_unet(weights)
    config = TrainConfig(method=method_name, rank=4, lora_target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS,
                         seed=1,  # same tuner / LoRA initialisation in every run
                         gradient_checkpointing=optimisation in ("checkpointed_shared_blocks", "all_checkpointed"))

    def start_scedit_non_trivially(trainable):  # zero-initialised ln2 would hide the encoder path
        if method_name == "scedit":
            for p in trainable:
                p.set_data(ms.Tensor(np.random.default_rng(2).normal(0, 0.05, p.shape).astype(np.float32)))

    alphas = DDPMScheduler(**SD_SCHEDULER).alphas_cumprod.asnumpy()
    built = build_step(config, get_method(config), unet, DiffusionLoss(alphas, "epsilon"),
                       1e-3,
                       cpu_rewrites=optimisation in ("cpu_rewrites", "all_checkpointed"),
                       share_blocks=optimisation in ("shared_blocks", "checkpointed_shared_blocks", "all_checkpointed"),
                       on_prepared=start_scedit_non_trivially)
    rewritten = any(isinstance(c, Attention) and type(c.processor) is CoreAttnProcessor for _, c in unet.cells_and_names())
    assert rewritten == (optimisation in ("cpu_rewrites", "all_checkpointed"))
    shared = any(hasattr(c, "cell_init_args") for _, c in unet.cells_and_names() if isinstance(c, REPEATED_BLOCKS))
    assert shared == (optimisation in ("shared_blocks", "checkpointed_shared_blocks", "all_checkpointed"))
    names = {id(p): name for name, p in unet.parameters_and_names()}
    trainable, step = built.trainable, built.train_step
    if steps == 0:
        return np.array([]), {names[id(p)]: p.asnumpy() for p in trainable}
    rng = np.random.default_rng(0)
    size, ctx = 8, unet.config.cross_attention_dim
    losses = []
    for _ in range(steps):
        latents = rng.standard_normal((BATCH, 4, size, size), dtype=np.float32)
        text = rng.standard_normal((BATCH, 77, ctx), dtype=np.float32)
        noise = rng.standard_normal((BATCH, 4, size, size), dtype=np.float32)
        t = rng.integers(0, 1000, (BATCH,), dtype=np.int32)
        loss = step(ms.Tensor(latents), ms.Tensor(text), ms.Tensor(noise), ms.Tensor(t), ms.Tensor(1e-3, ms.float32))[1]
        losses.append(float(loss.asnumpy()))
    return np.array(losses), {names[id(p)]: p.asnumpy() for p in trainable}


@pytest.fixture(scope="module")
def plain_run(base_weights):
    """The reference run of a method, as mindone builds the UNet; run once per method."""
    runs = {}

    def run(method_name):
        if method_name not in runs:
            runs[method_name] = train(base_weights, method_name)
        return runs[method_name]
    return run


# Each optimisation alone on SCEdit (whose backward skips the encoder), and the combinations users
# run with LoRA (backward through every block): on Ascend shared blocks with recompute, on CPU
# everything on.
@pytest.mark.parametrize("method_name, optimisation", [
    ("scedit", "cpu_rewrites"), ("scedit", "shared_blocks"),
    ("lora", "checkpointed_shared_blocks"), ("lora", "all_checkpointed"),
])
@pytest.mark.slow
def test_optimisations_leave_the_loss_trajectory_and_trained_weights_unchanged(base_weights, plain_run, method_name,
                                                                             optimisation):
    start = {k: v for k, v in train(base_weights, method_name, steps=0)[1].items()}
    losses, weights = plain_run(method_name)
    fast_losses, fast_weights = train(base_weights, method_name, optimisation)
    assert np.all(np.isfinite(losses)) and len(set(np.round(losses, 6))) > 1  # it did train
    np.testing.assert_allclose(fast_losses, losses, rtol=1e-4, atol=1e-6)
    assert fast_weights.keys() == weights.keys()
    # AdamW moves a weight by ~lr whatever its gradient's size, so fp32 rounding of a near-zero
    # gradient can flip single entries: compare the whole update, not entry by entry.
    update = np.concatenate([(weights[k] - start[k]).ravel() for k in weights])
    fast_update = np.concatenate([(fast_weights[k] - start[k]).ravel() for k in weights])
    assert np.linalg.norm(update) > 0
    assert np.linalg.norm(fast_update - update) < 0.02 * np.linalg.norm(update)


def test_cpu_rewrites_keep_state_dict_keys_and_replace_every_plain_attention_and_geglu(base_weights):
    unet = fresh_unet(base_weights)
    keys = [name for name, _ in unet.parameters_and_names()]
    from mindone.diffusers.models.activations import GEGLU
    from mindone.diffusers.models.attention_processor import Attention

    attentions = [c for _, c in unet.cells_and_names() if isinstance(c, Attention)]
    gated = [c for _, c in unet.cells_and_names() if isinstance(c, GEGLU)]
    resnets = [c for _, c in unet.cells_and_names() if isinstance(c, ResnetBlock2D)]
    transformers = [c for _, c in unet.cells_and_names() if isinstance(c, Transformer2DModel)]
    assert attentions and gated and resnets and transformers
    assert apply_cpu_rewrites(unet) == len(attentions) + len(gated) + len(resnets) + len(transformers)
    assert [name for name, _ in unet.parameters_and_names()] == keys
    assert all(isinstance(a.processor, CoreAttnProcessor) and isinstance(a.attention_core, AttentionCore)
               for a in attentions)
    assert all(isinstance(g.gelu, ExactGELU) for g in gated)
    assert all(type(r) is BiasAddResnetBlock2D for r in resnets)
    assert all(type(t) is TokenProjTransformer2DModel for t in transformers)
    assert apply_cpu_rewrites(unet) == 0  # idempotent


class SquaredOutput(ms.nn.Cell):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def construct(self, *inputs):
        return (self.block(*inputs) ** 2).sum()


@pytest.mark.parametrize("up", [False, True])
def test_bias_add_resnet_block_matches_mindones_forward_and_gradients(up):
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((3, 8, 6, 6), dtype=np.float32))
    temb = ms.Tensor(rng.standard_normal((3, 12), dtype=np.float32))
    weights = None
    results = []
    for fast in (False, True):
        block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, up=up)
        if fast:
            block.__class__ = BiasAddResnetBlock2D
        weights = weights or {n: rng.normal(0, 0.3, p.shape).astype(np.float32)  # non-trivial norms, biases
                              for n, p in block.parameters_and_names()}
        for name, p in block.parameters_and_names():
            p.set_data(ms.Tensor(weights[name]))
        value, (input_grads, weight_grads) = ms.value_and_grad(
            SquaredOutput(block), grad_position=(0, 1), weights=block.trainable_params())(x, temb)
        results.append([value, *input_grads, *weight_grads])
    for got, want in zip(*reversed(results)):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-4, atol=1e-4)


class TransformerOutput(ms.nn.Cell):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def construct(self, x, context):
        return self.block(x, encoder_hidden_states=context, return_dict=False)[0]


@pytest.mark.parametrize("linear_projection, batch", [(False, 3), (True, 3), (False, 1)])
def test_token_projection_transformer_matches_mindones_forward_and_gradients(linear_projection, batch):
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal((batch, 8, 3, 5), dtype=np.float32))
    context = ms.Tensor(rng.standard_normal((batch, 4, 6), dtype=np.float32))
    weights = None
    results = []
    for fast in (False, True):
        block = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, out_channels=8,
                                   norm_num_groups=4, cross_attention_dim=6, use_linear_projection=linear_projection)
        if fast:
            assert apply_cpu_rewrites(block) > 0 and type(block) is TokenProjTransformer2DModel
        weights = weights or {n: rng.normal(0, 0.3, p.shape).astype(np.float32) for n, p in block.parameters_and_names()}
        for name, p in block.parameters_and_names():
            p.set_data(ms.Tensor(weights[name]))
        value, (input_grads, weight_grads) = ms.value_and_grad(
            SquaredOutput(TransformerOutput(block)), grad_position=(0, 1), weights=block.trainable_params())(x, context)
        results.append([value, *input_grads, *weight_grads])
    for got, want in zip(*reversed(results)):
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5, 7), (5, 3, 7), (1, 4, 2), (4, 1, 2)])
def test_swap_leading_axes_and_head_moves_are_exact_transposes(shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(swap_leading_axes(ms.Tensor(x)).asnumpy(), x.transpose(1, 0, 2))
    tokens = rng.standard_normal((shape[0], shape[1], shape[2] * 4)).astype(np.float32)  # heads * head_dim 4
    heads = split_heads(ms.Tensor(tokens), shape[2])
    expected = tokens.reshape(shape[0], shape[1], shape[2], -1).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(heads.asnumpy(), expected)
    np.testing.assert_array_equal(merge_heads(heads).asnumpy(), tokens)


@pytest.mark.parametrize("batch", [1, 3])
def test_dense_between_image_layout_and_tokens_matches_numpy_with_gradients(batch):
    rng = np.random.default_rng(3)
    x, w_in, b_in, w_out, b_out = (rng.standard_normal(s).astype(np.float32)
                                   for s in [(batch, 6, 10), (4, 6), (4,), (6, 4), (6,)])
    d_image = rng.standard_normal((batch, 6, 10)).astype(np.float32)

    def loss(x, w_in, b_in, w_out, b_out):
        tokens = dense_to_tokens(x, w_in, b_in)
        return (dense_to_image(tokens, w_out, b_out) * ms.Tensor(d_image)).sum(), tokens

    (value, tokens), grads = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2, 3, 4), has_aux=True))(
        *map(ms.Tensor, (x, w_in, b_in, w_out, b_out)))
    want_tokens = x.transpose(0, 2, 1) @ w_in.T + b_in
    np.testing.assert_allclose(tokens.asnumpy(), want_tokens, rtol=1e-5, atol=1e-5)
    image = (want_tokens @ w_out.T + b_out).transpose(0, 2, 1)
    np.testing.assert_allclose(value.asnumpy(), (image * d_image).sum(), rtol=1e-5)
    d_tokens = d_image.transpose(0, 2, 1) @ w_out  # [batch, pixels, 4]
    want = [(d_tokens @ w_in).transpose(0, 2, 1), np.einsum("bpo,bcp->oc", d_tokens, x), d_tokens.sum((0, 1)),
            np.einsum("bcp,bpi->ci", d_image, want_tokens), d_image.sum((0, 2))]
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got.asnumpy(), expected, rtol=1e-4, atol=1e-4)


def test_exact_gelu_and_its_hand_written_backward_match_the_erf_formula():
    x = np.linspace(-6, 6, 241, dtype=np.float32).reshape(1, -1)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x64 / math.sqrt(2)))
    pdf = np.exp(-0.5 * x64 ** 2) / math.sqrt(2 * math.pi)
    d_out = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    gelu = ExactGELU()
    out = gelu(ms.Tensor(x)).asnumpy()

    def loss(a):
        return (gelu(a) * ms.Tensor(d_out)).sum()

    grad = ms.jit(ms.grad(loss))(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(out, x64 * cdf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, d_out * (cdf + x64 * pdf), rtol=1e-5, atol=1e-6)
    # and it is what mindone's GEGLU computed before
    np.testing.assert_allclose(out, ms.ops.gelu(ms.Tensor(x)).asnumpy(), rtol=1e-5, atol=1e-6)


def test_repeated_blocks_share_a_graph_only_when_equal_but_for_their_weights(base_weights):
    unet = fresh_unet(base_weights)
    keys = [name for name, _ in unet.parameters_and_names()]
    blocks = {path: c for path, c in unet.cells_and_names() if isinstance(c, REPEATED_BLOCKS)}
    assert share_repeated_blocks(unet) == len(blocks)  # the tiny UNet has no block inside another
    assert [name for name, _ in unet.parameters_and_names()] == keys
    assert all(b.no_inline is False for b in blocks.values())
    by_key = {}
    for path, block in blocks.items():
        by_key.setdefault(block.cell_init_args, []).append(path)
    shared = [paths for paths in by_key.values() if len(paths) > 1]
    assert shared and len(by_key) < len(blocks)  # some blocks do share
    first, second = (blocks[p] for p in shared[0][:2])
    assert block_key(first) == block_key(second)
    # A constant, or which weights train, tells blocks apart.
    first.extra_constant = 2.0
    assert block_key(first) != block_key(second)
    first, second = (blocks[p] for p in shared[1][:2])
    next(iter(first.get_parameters())).requires_grad = False
    next(iter(second.get_parameters())).requires_grad = True
    assert block_key(first) != block_key(second)


def test_blocks_with_active_dropout_keep_their_own_graph(base_weights):
    from mindspore import nn

    unet = fresh_unet(base_weights)
    blocks = [c for _, c in unet.cells_and_names() if isinstance(c, REPEATED_BLOCKS)]
    dropouts = [c for c in blocks if any(isinstance(d, nn.Dropout) for _, d in c.cells_and_names())]
    assert dropouts  # mindone's transformer blocks hold Dropout(p=0.0), which draws nothing
    for _, d in dropouts[0].cells_and_names():
        if isinstance(d, nn.Dropout):
            d.p = 0.1
    assert share_repeated_blocks(unet) == len(blocks) - 1
    assert not hasattr(dropouts[0], "no_inline")


def test_sharing_policy_comes_from_the_environment(base_weights, monkeypatch):
    from mindscedit.errors import UserError

    unet = fresh_unet(base_weights)
    blocks = [c for _, c in unet.cells_and_names() if isinstance(c, REPEATED_BLOCKS)]
    monkeypatch.setenv("MINDSCEDIT_SHARE_GRAPHS", "0")
    assert share_repeated_blocks(unet) == 0 and not any(hasattr(b, "cell_init_args") for b in blocks)
    monkeypatch.setenv("MINDSCEDIT_SHARE_GRAPHS", "yes")
    with pytest.raises(UserError, match="MINDSCEDIT_SHARE_GRAPHS='yes': expected one of front, calls, 0"):
        share_repeated_blocks(unet)
    monkeypatch.setenv("MINDSCEDIT_SHARE_GRAPHS", "calls")
    with pytest.raises(UserError, match="calls needs an Ascend device"):  # this is a CPU context
        share_repeated_blocks(unet)
    assert not any(hasattr(b, "cell_init_args") for b in blocks)
    real_get_context = ms.get_context
    monkeypatch.setattr(ms, "get_context", lambda key: "Ascend" if key == "device_target" else real_get_context(key))
    assert share_repeated_blocks(unet) == len(blocks)
    # lazy_inline's own default: keyed, no_inline left unset, so the shared graphs stay calls
    assert all(b.cell_init_args == block_key(b) and not hasattr(b, "no_inline") for b in blocks)


@pytest.mark.slow
def test_shared_blocks_leave_text_encoder_and_vae_outputs_unchanged(tiny_model_dir):
    from mindscedit.models.loading import load_components
    from mindscedit.sampling.sampler import VaeDecoder

    ids = ms.Tensor(np.random.default_rng(0).integers(0, 50, (1, 77)).astype(np.int32))
    latents = ms.Tensor(np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32))
    outputs = []
    for share in (False, True):
        components = load_components(str(tiny_model_dir))
        if share:
            assert share_repeated_blocks(components.text_encoder) == 2  # its two layers
            assert share_repeated_blocks(components.vae) > 0
        family = components.family
        outputs.append((family.prompt_encoder(components)(ids).asnumpy(),
                        VaeDecoder(components.vae, family.latent_scaling(components.vae))(latents).asnumpy()))
    for plain, shared in zip(*outputs):
        np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-6)
    # A layer whose attention drops out (functional dropout on a rate) keeps its own graph.
    attention = next(c for _, c in components.text_encoder.cells_and_names() if hasattr(c, "dropout"))
    attention.dropout = 0.1
    blocks = [c for _, c in components.text_encoder.cells_and_names() if isinstance(c, REPEATED_BLOCKS)]
    assert sum(has_active_dropout(b) for b in blocks) == 1


def numpy_attention_grads(q, k, v, d_out, scale):
    """Output and (dQ, dK, dV) of softmax(scale Q K^T) V for the loss sum(out * d_out)."""
    s = scale * q @ k.transpose(0, 2, 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    d_p = d_out @ v.transpose(0, 2, 1)
    d_s = p * (d_p - (d_p * p).sum(-1, keepdims=True))
    return out, scale * d_s @ k, scale * d_s.transpose(0, 2, 1) @ q, p.transpose(0, 2, 1) @ d_out


@pytest.mark.parametrize("block_elements", [1 << 23, 3 * 6 * 5])  # one block; blocks of 3 slices, last one short
def test_attention_core_forward_and_hand_written_backward_match_numpy(block_elements):
    from mindscedit.models.cpu_rewrites import AttentionCore

    rng = np.random.default_rng(0)
    batch, heads, tokens, context, dim, scale = 2, 4, 6, 5, 3, 0.7
    q = rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32)
    k = rng.standard_normal((batch, heads, context, dim)).astype(np.float32)
    v = rng.standard_normal((batch, heads, context, dim)).astype(np.float32)
    d_out = rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32)
    core = AttentionCore(scale, block_elements)

    def loss(a, b, c):
        return (core(a, b, c) * ms.Tensor(d_out)).sum()

    grad_fn = ms.jit(ms.grad(loss, grad_position=(0, 1, 2)))
    out = core(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v)).asnumpy()
    grads = [g.asnumpy() for g in grad_fn(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v))]
    flat = [x.reshape(batch * heads, x.shape[2], dim) for x in (q, k, v, d_out)]
    expected = numpy_attention_grads(*flat, scale)
    np.testing.assert_allclose(out.reshape(batch * heads, tokens, dim), expected[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected[1:]):
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5)
