"""SC-Tuner and LoRA: the math against numpy, identity at init, scale, keys and parameter counts."""
import math

import numpy as np
import mindspore as ms
import pytest
from mindspore.nn.utils import no_init_parameters

from mindscedit.models import build_unet, unet_preset
from mindscedit.tuners.lora import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, LoRAConfig, inject_lora, load_lora, save_lora
from mindscedit.tuners.sc_tuner import (
    SCTuner,
    SCTunerConfig,
    inject_sc_tuners,
    load_sc_tuners,
    save_sc_tuners,
    sc_tuner_dims,
    sc_tuner_named_parameters,
    sc_tuner_parameters,
    set_tuner_scale,
)
from mindscedit.errors import UserError


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _randomise(params, rng, std=0.1):
    for p in params:
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * std))


def _unet_inputs(seed=0, batch=2, size=8, cross_dim=32):
    rng = np.random.default_rng(seed)
    return (
        ms.Tensor(rng.standard_normal((batch, 4, size, size)).astype(np.float32)),
        ms.Tensor(np.array([10, 700][:batch], dtype=np.int32)),
        ms.Tensor(rng.standard_normal((batch, 77, cross_dim)).astype(np.float32)),
    )


def _fresh_tiny_unet(seed=0):
    ms.set_seed(seed)
    return build_unet(unet_preset("tiny"))


@pytest.fixture(scope="module")
def base_output():
    return _fresh_tiny_unet()(*_unet_inputs())[0].asnumpy()


def test_sc_tuner_matches_numpy_formula():
    rng = np.random.default_rng(0)
    tuner = SCTuner(dim=8, down_ratio=0.5)
    _randomise(tuner.tuner_op.get_parameters(), rng, std=0.3)
    x = rng.standard_normal((2, 8, 3, 5)).astype(np.float32)
    w1, b1 = tuner.tuner_op.ln1.weight.asnumpy(), tuner.tuner_op.ln1.bias.asnumpy()
    w2, b2 = tuner.tuner_op.ln2.weight.asnumpy(), tuner.tuner_op.ln2.bias.asnumpy()
    assert w1.shape == (4, 8) and w2.shape == (8, 4)  # [out, in], hidden = int(8 * 0.5)
    tokens = x.transpose(0, 2, 3, 1).reshape(2, 15, 8)
    y = _gelu(tokens @ w1.T + b1) @ w2.T + b2
    expected = x + y.reshape(2, 3, 5, 8).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(tuner(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)

    tuner.scale.set_data(ms.Tensor(0.25, ms.float32))
    np.testing.assert_allclose(tuner(ms.Tensor(x)).asnumpy(), x + 0.25 * (expected - x), rtol=1e-5, atol=1e-5)


def test_fresh_sc_tuner_is_zero_initialised_identity():
    tuner = SCTuner(dim=16)
    assert not tuner.tuner_op.ln2.weight.asnumpy().any() and not tuner.tuner_op.ln2.bias.asnumpy().any()
    assert tuner.tuner_op.ln1.weight.asnumpy().std() > 0  # default init, not zero
    x = np.random.default_rng(1).standard_normal((1, 16, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(tuner(ms.Tensor(x)).asnumpy(), x)


@pytest.mark.slow
def test_sc_tuners_leave_unet_unchanged_at_init_and_at_scale_zero(base_output):
    unet = _fresh_tiny_unet()
    inject_sc_tuners(unet)
    np.testing.assert_array_equal(unet(*_unet_inputs())[0].asnumpy(), base_output)

    _randomise(sc_tuner_parameters(unet), np.random.default_rng(2))
    tuned = unet(*_unet_inputs())[0].asnumpy()
    assert np.abs(tuned - base_output).max() > 1e-3
    set_tuner_scale(unet, 0.0)
    np.testing.assert_array_equal(unet(*_unet_inputs())[0].asnumpy(), base_output)


@pytest.mark.slow
def test_lora_leaves_unet_unchanged_at_init(base_output):
    unet = _fresh_tiny_unet()
    params = inject_lora(unet, LoRAConfig(rank=4))
    assert params and all(".lora_" in p.name for p in params)
    np.testing.assert_allclose(unet(*_unet_inputs())[0].asnumpy(), base_output, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sc_tuner_save_load_gives_identical_outputs(tmp_path):
    unet = _fresh_tiny_unet()
    inject_sc_tuners(unet)
    _randomise(sc_tuner_parameters(unet), np.random.default_rng(3))
    expected = unet(*_unet_inputs())[0].asnumpy()
    save_sc_tuners(unet, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()

    # Other values in the same UNet (one compiled graph), then the file's back.
    _randomise(sc_tuner_parameters(unet), np.random.default_rng(5))
    assert not np.array_equal(unet(*_unet_inputs())[0].asnumpy(), expected)
    load_sc_tuners(unet, str(tmp_path))
    np.testing.assert_array_equal(unet(*_unet_inputs())[0].asnumpy(), expected)


@pytest.mark.slow
def test_lora_save_load_gives_identical_outputs(tmp_path):
    config = LoRAConfig(rank=2, alpha=4)
    unet = _fresh_tiny_unet()
    lora_params = inject_lora(unet, config)
    _randomise(lora_params, np.random.default_rng(4))
    expected = unet(*_unet_inputs())[0].asnumpy()
    save_lora(unet, str(tmp_path), config)

    # Other values in the same UNet (one compiled graph), then the file's back.
    _randomise(lora_params, np.random.default_rng(5))
    assert not np.array_equal(unet(*_unet_inputs())[0].asnumpy(), expected)
    load_lora(unet, str(tmp_path))
    np.testing.assert_array_equal(unet(*_unet_inputs())[0].asnumpy(), expected)


def test_sc_tuner_weights_that_do_not_fit_are_refused_whole(tmp_path):
    from safetensors.numpy import save_file

    unet = _fresh_tiny_unet()
    inject_sc_tuners(unet)
    before = [p.asnumpy().copy() for p in sc_tuner_parameters(unet)]
    state = {key: np.ones(p.shape, np.float32) for key, p in sc_tuner_named_parameters(unet).items()}
    bad_key = "up_blocks.1.resnets.0.scetuner_default.tuner_op.ln1.weight"
    state[bad_key] = np.ones((3, 3), np.float32)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"ln1.weight' has shape \(3, 3\)"):
        load_sc_tuners(unet, str(tmp_path))
    for b, p in zip(before, sc_tuner_parameters(unet)):
        np.testing.assert_array_equal(p.asnumpy(), b)  # nothing half-loaded


def test_sd15_dims_keys_and_parameter_counts():
    with no_init_parameters():
        unet = build_unet(unet_preset("sd15"))
    inject_sc_tuners(unet, SCTunerConfig())
    assert sc_tuner_dims(unet) == [1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 320]
    named = sc_tuner_named_parameters(unet)
    assert sum(p.size for p in named.values()) == 19_680_000
    names = list(named)
    assert names[:4] == [
        "up_blocks.0.resnets.0.scetuner_default.tuner_op.ln1.weight",
        "up_blocks.0.resnets.0.scetuner_default.tuner_op.ln1.bias",
        "up_blocks.0.resnets.0.scetuner_default.tuner_op.ln2.weight",
        "up_blocks.0.resnets.0.scetuner_default.tuner_op.ln2.bias",
    ]
    assert names[-1] == "up_blocks.3.resnets.2.scetuner_default.tuner_op.ln2.bias"

    with no_init_parameters():
        unet = build_unet(unet_preset("sd15"))
    lora = inject_lora(unet, LoRAConfig(rank=64, target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS))
    assert sum(p.size for p in lora) == 23_937_024  # 23.94M
