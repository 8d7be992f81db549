"""The CPU-kernel rewrites are switched by the device: off on Ascend, and the path Ascend runs
instead computes the same numbers. Graph keys follow what changes the graph (recompute, sharing)."""
import numpy as np
import mindspore as ms
import pytest
from mindone.diffusers.models.resnet import ResnetBlock2D
from mindspore import nn

from mindscedit.layers import ExactGELU
from mindscedit.models import build_unet, unet_preset
from mindscedit.models.cpu_rewrites import CoreAttnProcessor, apply_cpu_rewrites
from mindscedit.models.graph_sharing import block_key
from mindscedit.training.compile_cache import graph_key
from mindscedit.tuners.sc_tuner.layer import SCEAdapter


@pytest.fixture
def ascend_context(monkeypatch):
    real_get_context = ms.get_context
    monkeypatch.setattr(ms, "get_context", lambda key: "Ascend" if key == "device_target" else real_get_context(key))


def test_cpu_rewrites_are_off_on_ascend(ascend_context):
    unet = build_unet(unet_preset("tiny"))
    classes = [type(c) for _, c in unet.cells_and_names()]
    assert apply_cpu_rewrites(unet) == 0
    assert [type(c) for _, c in unet.cells_and_names()] == classes  # every layer is mindone's own
    assert not any(isinstance(getattr(c, "processor", None), CoreAttnProcessor) for _, c in unet.cells_and_names())
    adapter = SCEAdapter(8)
    assert not adapter.image_layout and isinstance(adapter.activate, nn.GELU)


def test_cpu_rewrites_are_on_on_cpu_unless_switched_off(monkeypatch):
    assert apply_cpu_rewrites(build_unet(unet_preset("tiny"))) > 0
    assert SCEAdapter(8).image_layout and isinstance(SCEAdapter(8).activate, ExactGELU)
    monkeypatch.setenv("MINDSCEDIT_CPU_REWRITES", "0")
    assert apply_cpu_rewrites(build_unet(unet_preset("tiny"))) == 0
    assert not SCEAdapter(8).image_layout


class AdapterLoss(nn.Cell):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def construct(self, x, weight):
        return (self.adapter(x) * weight).sum()


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])  # fp16: a low-precision skip into fp32 weights
def test_sc_tuner_plain_path_matches_the_cpu_path(dtype, monkeypatch):
    rng = np.random.default_rng(0)
    cpu_shaped = SCEAdapter(16, down_ratio=0.5)
    monkeypatch.setenv("MINDSCEDIT_CPU_REWRITES", "0")
    plain = SCEAdapter(16, down_ratio=0.5)
    assert cpu_shaped.image_layout and not plain.image_layout
    for (_, a), (_, b) in zip(cpu_shaped.parameters_and_names(), plain.parameters_and_names()):
        value = rng.standard_normal(a.shape).astype(np.float32) * 0.3
        a.set_data(ms.Tensor(value))
        b.set_data(ms.Tensor(value))
    x = ms.Tensor(rng.standard_normal((2, 16, 3, 5)).astype(np.float32)).astype(dtype)
    weight = ms.Tensor(rng.standard_normal((2, 16, 3, 5)).astype(np.float32)).astype(dtype)
    outputs = [adapter(x) for adapter in (cpu_shaped, plain)]
    assert all(o.dtype == dtype for o in outputs)  # handed back in the skip's dtype
    tolerance = 1e-5 if dtype == ms.float32 else 2e-3
    np.testing.assert_allclose(outputs[0].asnumpy().astype(np.float32), outputs[1].asnumpy().astype(np.float32),
                               rtol=tolerance, atol=tolerance)
    grads = [ms.grad(AdapterLoss(adapter), grad_position=None, weights=adapter.trainable_params())(x, weight)
             for adapter in (cpu_shaped, plain)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=tolerance, atol=tolerance)


def test_a_recomputed_block_gets_its_own_graph_key():
    def block():
        return ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4)

    plain, same, recomputed = block(), block(), block()
    recomputed._recompute()  # what mindone's gradient checkpointing does to all but a block's first resnet
    assert block_key(plain) == block_key(same) != block_key(recomputed)


class Scale(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="w")

    def construct(self, x):
        return x * self.w


def test_compile_cache_key_includes_the_sharing_policy(monkeypatch):
    step, inputs = Scale(), (ms.Tensor(np.ones(3, np.float32)),)
    keys = {}
    for policy in ("front", "0"):
        monkeypatch.setenv("MINDSCEDIT_SHARE_GRAPHS", policy)
        keys[policy] = graph_key(step, inputs)
    assert keys["front"] != keys["0"]
    monkeypatch.setenv("MINDSCEDIT_SHARE_GRAPHS", "front")
    assert graph_key(step, inputs) == keys["front"]


def _tiny_step_key(**settings):
    """The compile-cache key of the tiny UNet's train step built for a config (nothing compiled)."""
    from mindscedit.losses import DiffusionLoss
    from mindscedit.models.presets import SD_SCHEDULER
    from mindscedit.training.builder import build_step
    from mindscedit.training.config import TrainConfig
    from mindscedit.training.methods import get_method
    from mindone.diffusers import DDPMScheduler

    config = TrainConfig(**settings)
    unet = build_unet(unet_preset("tiny"))
    alphas = DDPMScheduler(**SD_SCHEDULER).alphas_cumprod.asnumpy()
    loss = DiffusionLoss(alphas, config.prediction_type or "epsilon", config.snr_gamma)
    built = build_step(config, get_method(config), unet, loss, config.learning_rate)
    inputs = (ms.Tensor(np.zeros((1, 4, 8, 8), np.float32)), ms.Tensor(np.zeros((1, 77, 32), np.float32)),
              ms.Tensor(np.zeros((1, 4, 8, 8), np.float32)), ms.Tensor(np.zeros((1,), np.int32)),
              ms.Tensor(config.learning_rate, ms.float32))
    return graph_key(built.train_step, inputs)


@pytest.mark.slow
def test_compile_cache_key_follows_what_the_step_is_built_from():
    """No hand-kept list: settings that never reach the graph leave the key alone, every one that
    shapes it changes it."""
    base = dict(method="vanilla", max_train_steps=4)
    key = _tiny_step_key(**base)
    # The learning rate is a step input (the schedule and the run's length stay outside the graph,
    # so a resumed run with more steps loads the step); AdamW's betas are tensor constants of the graph.
    outside_the_graph = dict(output_dir="elsewhere", seed=3, noise_offset=0.1, logging_steps=7, learning_rate=1e-3,
                             lr_scheduler="cosine", train_data_dir="d", validation_prompt=["a cat"],
                             max_train_steps=5000, lr_warmup_steps=100)
    assert _tiny_step_key(**dict(base, **outside_the_graph)) == key
    for in_the_graph in (dict(mixed_precision="bf16"), dict(mixed_precision="fp16"), dict(max_grad_norm=None),
                         dict(snr_gamma=5.0), dict(prediction_type="v_prediction"), dict(jit_level="O1"),
                         dict(gradient_checkpointing=True), dict(method="scedit"),
                         dict(adam_beta1=0.8)):
        assert _tiny_step_key(**dict(base, **in_the_graph)) != key, in_the_graph
