"""The CPU-kernel rewrites are switched by the device: off on Ascend, and the path Ascend runs
instead computes the same numbers. Graph keys follow what changes the graph (recompute, sharing)."""
import numpy as np
import mindspore as ms
import pytest
from mindone.diffusers.models.resnet import ResnetBlock2D
from mindspore import nn

from mindscedit.layers import ExactGELU
from mindscedit.models import build_unet, unet_preset
from mindscedit.models.fast_layers import CoreAttnProcessor, apply_fast_layers
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
    assert apply_fast_layers(unet) == 0
    assert [type(c) for _, c in unet.cells_and_names()] == classes  # every layer is mindone's own
    assert not any(isinstance(getattr(c, "processor", None), CoreAttnProcessor) for _, c in unet.cells_and_names())
    adapter = SCEAdapter(8)
    assert not adapter.image_layout and isinstance(adapter.activate, nn.GELU)


def test_cpu_rewrites_are_on_on_cpu_unless_switched_off(monkeypatch):
    assert apply_fast_layers(build_unet(unet_preset("tiny"))) > 0
    assert SCEAdapter(8).image_layout and isinstance(SCEAdapter(8).activate, ExactGELU)
    monkeypatch.setenv("MINDSCEDIT_FAST_LAYERS", "0")
    assert apply_fast_layers(build_unet(unet_preset("tiny"))) == 0
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
    monkeypatch.setenv("MINDSCEDIT_FAST_LAYERS", "0")
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
        keys[policy] = graph_key(step, inputs, {})
    assert keys["front"] != keys["0"]
    monkeypatch.setenv("MINDSCEDIT_SHARE_GRAPHS", "front")
    assert graph_key(step, inputs, {}) == keys["front"]
