"""Tuner weights across layouts: LoRA/DoRA math, adapter weights, merging, file layouts, convert."""
import json
import re

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn
from mindspore.nn.utils import no_init_parameters
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mindscedit.cli import main
from mindscedit.convert import convert
from mindscedit.errors import UserError
from mindscedit.models import build_unet, unet_preset
from mindscedit.tuners.lora import (
    ATTENTION_TARGETS,
    FEED_FORWARD_TARGETS,
    LoRAConfig,
    LoraLinear,
    LoraModule,
    add_lora,
    combine_adapters,
    inject_lora,
    kohya_name,
    load_lora,
    lora_layers,
    lora_modules,
    merge_lora,
    module_from_kohya,
    read_lora_file,
    read_lora_metadata,
    save_lora,
    set_adapters,
    unmerge_lora,
    write_lora_file,
)
from mindscedit.tuners.lora.formats import combine, detect_family
from mindscedit.tuners.lora.io import unet_family
from mindscedit.tuners.sc_tuner import inject_sc_tuners, sc_tuner_named_parameters, sc_tuner_parameters
from mindscedit.tuners.sc_tuner.io import load_sc_tuners, save_sc_tuners
from mindscedit.tuners.sc_tuner.model import sc_tuner_dims

RNG = np.random.default_rng(0)


def _inputs(batch=2):
    rng = np.random.default_rng(1)
    return (
        ms.Tensor(rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)),
        ms.Tensor(np.array([10, 700][:batch], dtype=np.int32)),
        ms.Tensor(rng.standard_normal((batch, 77, 32)).astype(np.float32)),
    )


def _tiny_unet():
    ms.set_seed(0)
    return build_unet(unet_preset("tiny"))


def _run(unet):
    return unet(*_inputs())[0].asnumpy()


def _randomise(params, seed, std=0.2):
    rng = np.random.default_rng(seed)
    for p in params:
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * std))


@pytest.fixture(scope="module")
def base_output():
    return _run(_tiny_unet())


# -- one layer against numpy ---------------------------------------------------------------------

class _Wrap(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x):
        return self.layer(x)


def test_lora_and_dora_layer_match_numpy_and_merge_exactly():
    dense = nn.Dense(6, 5)
    w, b = dense.weight.asnumpy().copy(), dense.bias.asnumpy().copy()
    layer = LoraLinear(dense, "plain", r=2, lora_alpha=4.0)
    layer.add_adapter("dora", 3, 3.0, use_dora=True)
    np.testing.assert_allclose(layer.lora_magnitude_vector["dora"].weight.asnumpy(), np.linalg.norm(w, axis=1), rtol=1e-6)
    _randomise([layer.lora_A["plain"].weight, layer.lora_B["plain"].weight,
                layer.lora_A["dora"].weight, layer.lora_B["dora"].weight], seed=2)
    layer.lora_magnitude_vector["dora"].weight.set_data(ms.Tensor(np.linspace(0.5, 2, 5).astype(np.float32)))
    net = _Wrap(layer)
    x = RNG.standard_normal((4, 7, 6)).astype(np.float32)
    (a1, b1, _), (a2, b2, m2) = layer.arrays("plain"), layer.arrays("dora")

    def expected(w1, w2):
        y = x @ w.T + b + w1 * 2.0 * (x @ a1.T @ b1.T)  # s = w * alpha / r
        adapted = w + w2 * 1.0 * b2 @ a2
        dora_w = (m2 / np.linalg.norm(adapted, axis=1))[:, None] * adapted
        return y + x @ (dora_w - w).T

    np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), expected(1.0, 1.0), rtol=1e-4, atol=1e-5)
    # per-adapter weights change Parameters only: the compiled graph follows them
    layer.set_weight("plain", 0.5)
    layer.set_weight("dora", 2.0)
    unmerged = net(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(unmerged, expected(0.5, 2.0), rtol=1e-4, atol=1e-5)

    layer.merge()
    assert not layer.is_on("plain") and not layer.is_on("dora")
    np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.base_weight(), w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), unmerged, rtol=1e-5, atol=1e-5)

    layer.set_weight("plain", 0.0)  # weight 0 switches an adapter off: the base layer exactly
    layer.set_weight("dora", 0.0)
    np.testing.assert_array_equal(net(ms.Tensor(x)).asnumpy(), net.layer.get_base_layer()(ms.Tensor(x)).asnumpy())


# -- adapters on the UNet ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(base_output):
    """Tiny UNet with adapters 'a' (rank 2, alpha 4, attention) and 'b' (rank 3, feed-forward too)."""
    unet = _tiny_unet()
    _randomise(inject_lora(unet, LoRAConfig(rank=2, alpha=4, adapter_name="a")), seed=3)
    _randomise(inject_lora(unet, LoRAConfig(rank=3, adapter_name="b",
                                            target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS)), seed=4)
    return unet


@pytest.mark.slow
def test_adapter_weights_merge_and_unmerge_on_unet(two_adapters, base_output):
    unet = two_adapters
    set_adapters(unet, ["a", "b"], [0.0, 0.0])  # weight 0 switches adapters off: the base UNet exactly
    np.testing.assert_array_equal(_run(unet), base_output)
    set_adapters(unet, ["a", "b"], [0.5, 1.0])
    mixed = _run(unet)
    assert np.abs(mixed - base_output).max() > 1e-3
    set_adapters(unet, "a", 0.5)
    only_a = _run(unet)
    assert np.abs(only_a - mixed).max() > 1e-4

    set_adapters(unet, ["a", "b"], [0.5, 1.0])
    weights_before = {p: l.base_weight().copy() for p, l in lora_layers(unet).items()}
    merge_lora(unet)
    np.testing.assert_allclose(_run(unet), mixed, rtol=1e-5, atol=1e-5)
    unmerge_lora(unet)
    for p, layer in lora_layers(unet).items():
        np.testing.assert_allclose(layer.base_weight(), weights_before[p], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_run(unet), mixed, rtol=1e-5, atol=1e-5)

    weights_before = {p: l.base_weight().copy() for p, l in lora_layers(unet).items()}
    merge_lora(unet, scale=0.0)  # a scale of 0 folds nothing in
    for p, layer in lora_layers(unet).items():
        np.testing.assert_array_equal(layer.base_weight(), weights_before[p])
    unmerge_lora(unet)
    set_adapters(unet, ["a", "b"], [0.5, 1.0])


def test_combining_adapters(two_adapters):
    a, b = lora_modules(two_adapters, "a"), lora_modules(two_adapters, "b")
    cat = combine([a, b], [0.5, 2.0], "cat", same_modules=False)  # b also adapts ff layers
    for module, m in cat.items():
        want = sum(w * x[module].scaling * x[module].up.astype(np.float64) @ x[module].down
                   for x, w in ((a, 0.5), (b, 2.0)) if module in x)
        np.testing.assert_allclose(m.scaling * m.up.astype(np.float64) @ m.down, want, rtol=1e-5, atol=1e-6)
        assert m.rank == sum(x[module].rank for x in (a, b) if module in x)
    with pytest.raises(UserError, match="equal ranks"):
        combine([a, b], [0.5, 0.5], "linear", same_modules=False)
    lin = combine([a, a], [1.0, 1.0], "linear")  # peft's formula: sqrt(w s) A and sqrt(w s) B summed
    m0 = next(iter(a))
    np.testing.assert_allclose(lin[m0].down, 2 * np.sqrt(a[m0].scaling) * a[m0].down, rtol=1e-6)
    np.testing.assert_allclose(lin[m0].up, 2 * np.sqrt(a[m0].scaling) * a[m0].up, rtol=1e-6)
    combine_adapters(two_adapters, ["a", "b"], [0.5, 1.0], "ab")
    assert "ab" in next(iter(lora_layers(two_adapters).values())).adapter_order


def test_lora_layouts_round_trip_identically(two_adapters, tmp_path):
    config = LoRAConfig(rank=2, alpha=4, adapter_name="a")
    original = lora_modules(two_adapters, "a")
    diffusers_file = save_lora(two_adapters, str(tmp_path / "d"), config)
    assert diffusers_file.endswith("pytorch_lora_weights.safetensors")
    with safe_open(diffusers_file, framework="np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 4 and meta["unet.use_dora"] is False
    assert read_lora_metadata(diffusers_file)["lora_alpha"] == 4
    keys = list(load_file(diffusers_file))
    assert all(re.fullmatch(r"unet\.[\w.]+\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight", k) for k in keys)

    convert("diffusers", "kohya", diffusers_file, str(tmp_path / "k"))
    kohya_state = load_file(str(tmp_path / "k" / "lora_kohya.safetensors"))
    assert all(re.fullmatch(r"lora_unet_\w+_(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)", k)
               for k in kohya_state)
    assert {float(v) for k, v in kohya_state.items() if k.endswith(".alpha")} == {4.0}
    convert("kohya", "diffusers", str(tmp_path / "k"), str(tmp_path / "d2"))
    for path in (tmp_path / "k", tmp_path / "d2"):
        back, _ = read_lora_file(str(path))
        assert set(back) == set(original)
        for module, m in original.items():
            np.testing.assert_array_equal(back[module].down, m.down)
            np.testing.assert_array_equal(back[module].up, m.up)
            assert back[module].alpha == m.alpha

    # a fresh UNet takes the kohya file: same weights and scaling, adapter shaped after the file
    other = _tiny_unet()
    add_lora(other, str(tmp_path / "k"), "k", weight=0.5)
    loaded = lora_modules(other, "k")
    for module, m in original.items():
        np.testing.assert_array_equal(loaded[module].up, m.up)
        layer = lora_layers(other)[module.split(".", 1)[1]]
        assert layer.scaling["k"] == pytest.approx(0.5 * 2.0)


def test_lora_file_that_does_not_fit_is_refused_whole(two_adapters, tmp_path):
    file = write_lora_file(lora_modules(two_adapters, "a"), str(tmp_path))
    state = load_file(file)
    bad = sorted(k for k in state if k.endswith("lora_B.weight"))[-1]
    state[bad] = np.zeros((5, 2), np.float32)
    save_file(state, file)
    unet = _tiny_unet()
    inject_lora(unet, LoRAConfig(rank=2, alpha=4))
    before = [p.asnumpy().copy() for p in unet.get_parameters()]
    with pytest.raises(UserError, match=re.escape(f"'{bad}' has shape (5, 2), this UNet expects")):
        load_lora(unet, str(tmp_path))
    with pytest.raises(UserError, match=re.escape(f"'{bad}' has shape (5, 2), this UNet expects")):
        add_lora(unet, str(tmp_path), "other")
    for b, p in zip(before, unet.get_parameters()):
        np.testing.assert_array_equal(p.asnumpy(), b)
    assert all(list(l.adapter_order) == ["default"] for l in lora_layers(unet).values())


# -- DoRA on the UNet ----------------------------------------------------------------------------

@pytest.mark.slow
def test_dora_identity_at_init_save_load_and_merge(base_output, tmp_path):
    config = LoRAConfig(rank=2, use_dora=True)
    unet = _tiny_unet()
    params = inject_lora(unet, config)
    assert sum(".lora_magnitude_vector." in p.name for p in params) == len(lora_layers(unet))
    np.testing.assert_allclose(_run(unet), base_output, rtol=0, atol=1e-5)

    _randomise([p for p in params if ".lora_magnitude_vector." not in p.name], seed=5)
    for p in params:
        if ".lora_magnitude_vector." in p.name:
            p.set_data(p * 1.1)
    tuned = _run(unet)
    assert np.abs(tuned - base_output).max() > 1e-3
    merge_lora(unet)
    np.testing.assert_allclose(_run(unet), tuned, rtol=1e-5, atol=1e-5)
    unmerge_lora(unet)

    save_lora(unet, str(tmp_path), config)
    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert any(re.fullmatch(r"unet\.[\w.]+\.to_q\.lora_magnitude_vector", k) for k in keys)
    assert read_lora_metadata(str(tmp_path))["use_dora"] is True
    with pytest.raises(UserError, match="DoRA"):
        convert("diffusers", "kohya", str(tmp_path), str(tmp_path / "k"))
    other = _tiny_unet()
    inject_lora(other, config)
    load_lora(other, str(tmp_path))
    for module, m in lora_modules(unet).items():
        got = lora_modules(other)[module]
        np.testing.assert_array_equal(got.magnitude, m.magnitude)
        np.testing.assert_array_equal(got.up, m.up)


# -- SC-Tuner layouts ----------------------------------------------------------------------------

def test_sc_tuner_layouts_round_trip_and_load(tmp_path):
    unet = _tiny_unet()
    inject_sc_tuners(unet)
    _randomise(sc_tuner_parameters(unet), seed=6)
    expected = {k: p.asnumpy().copy() for k, p in sc_tuner_named_parameters(unet).items()}

    save_sc_tuners(unet, str(tmp_path / "swift"), swift_root=True)  # what SwiftModel.save_pretrained writes
    assert (tmp_path / "swift" / "configuration.json").read_text() == "{}"
    config = json.loads((tmp_path / "swift" / "default" / "adapter_config.json").read_text())
    assert config["swift_type"] == "SCETuning" and config["tuner_op"] == "SCEAdapter" and config["tuner_mode"] == "decoder"
    assert config["dims"] == [64, 64, 32, 32, 32, 32] and config["down_ratio"] == 1.0
    assert set(load_file(str(tmp_path / "swift" / "default" / "adapter_model.safetensors"))) == set(expected)

    convert("swift", "scepter", str(tmp_path / "swift"), str(tmp_path / "scepter.safetensors"))
    scepter = load_file(str(tmp_path / "scepter.safetensors"))
    assert all(re.fullmatch(r"lsc_identity\.\d+\.tuner_op\.ln[12]\.(weight|bias)", k) for k in scepter)
    np.testing.assert_array_equal(scepter["lsc_identity.4.tuner_op.ln1.weight"],
                                  expected["up_blocks.1.resnets.1.scetuner_default.tuner_op.ln1.weight"])
    # scepter checkpoints often carry the model's prefix
    save_file({"model." + k: v for k, v in scepter.items()}, str(tmp_path / "prefixed.safetensors"))
    assert main(["convert", "--from", "scepter", "--to", "swift", str(tmp_path / "prefixed.safetensors"),
                 str(tmp_path / "back")]) == 0
    back = load_file(str(tmp_path / "back" / "default" / "adapter_model.safetensors"))
    assert set(back) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value)

    for source in (tmp_path / "swift", tmp_path / "prefixed.safetensors"):
        other = _tiny_unet()
        inject_sc_tuners(other)
        load_sc_tuners(other, str(source))
        for key, p in sc_tuner_named_parameters(other).items():
            np.testing.assert_array_equal(p.asnumpy(), expected[key])

    bad = dict(scepter)
    bad["lsc_identity.2.tuner_op.ln2.weight"] = np.zeros((3, 3), np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=re.escape("'lsc_identity.2...tuner_op.ln2.weight' has shape (3, 3)")):
        load_sc_tuners(other, str(tmp_path / "bad.safetensors"))


def test_convert_refuses_mismatched_pairs(tmp_path, capsys):
    assert main(["convert", "--from", "swift", "--to", "kohya", "x", str(tmp_path)]) == 2
    assert "cannot convert SC-Tuner weights (swift) to kohya" in capsys.readouterr().err
    with pytest.raises(UserError, match="not one of"):
        convert("ckpt", "swift", "x", str(tmp_path))


# -- key names on the real SD1.5 UNet ------------------------------------------------------------

def test_sd15_key_names_of_every_layout(tmp_path):
    with no_init_parameters():
        unet = build_unet(unet_preset("sd15"))
    inject_lora(unet, LoRAConfig(rank=4, target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS))
    paths = list(lora_layers(unet))
    assert len(paths) == 16 * 10  # 16 transformer blocks x (2 attentions x q, k, v, out + ff in, ff out)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in paths
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj" in paths
    for path in paths:  # every module's kohya name maps back to it
        assert module_from_kohya(kohya_name("unet." + path)) == "unet." + path
    assert kohya_name("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"
    # original-LDM names of SD1.x attention blocks read as the same modules
    assert module_from_kohya("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q") == \
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert module_from_kohya("lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_2") == \
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"
    assert module_from_kohya("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k") == \
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"

    # names only: small stand-in tensors, the real module paths
    modules = {"unet." + p: LoraModule(np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32), 1.0)
               for p in paths}
    diffusers = load_file(write_lora_file(modules, str(tmp_path / "d")))
    assert all(re.fullmatch(r"unet\.(down_blocks\.\d\.|up_blocks\.\d\.|mid_block\.)attentions\.\d\."
                            r"transformer_blocks\.0\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))"
                            r"\.lora_[AB]\.weight", k) for k in diffusers)
    kohya = load_file(write_lora_file(modules, str(tmp_path / "k"), "kohya"))
    assert all(re.fullmatch(r"lora_unet_(down_blocks_\d_|up_blocks_\d_|mid_block_)attentions_\d_"
                            r"transformer_blocks_0_(attn[12]_(to_[qkv]|to_out_0)|ff_net_(0_proj|2))"
                            r"\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in kohya)
    assert len(kohya) == 3 * len(paths)

    inject_sc_tuners(unet)
    keys = list(sc_tuner_named_parameters(unet))
    assert all(re.fullmatch(r"up_blocks\.[0-3]\.resnets\.[0-2]\.scetuner_default\.tuner_op\.ln[12]\.(weight|bias)", k)
               for k in keys) and len(keys) == 48


def test_per_module_alphas_survive_the_diffusers_metadata():
    """diffusers' layout has no alpha tensors: a module whose alpha differs from the common one is
    carried by `alpha_pattern` in the metadata (peft's suffix rule) and must come back from it."""
    from mindscedit.tuners.lora.formats import from_diffusers, to_diffusers

    def module(rank, alpha):
        return LoraModule(np.ones((rank, 4), np.float32), np.ones((4, rank), np.float32), alpha)

    modules = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": module(2, 4.0),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": module(2, 4.0),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": module(2, 16.0),
    }
    state, metadata = to_diffusers(modules)
    assert not any(k.endswith(".alpha") for k in state)
    assert metadata["unet.alpha_pattern"] == {"up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": 16.0}
    read = from_diffusers(state, metadata)
    assert {name: m.alpha for name, m in read.items()} == {name: m.alpha for name, m in modules.items()}


# -- SDXL: kohya's LDM names, text encoders, nine SC-Tuners ---------------------------------------

def _stand_in(modules):
    """{module: LoraModule} with distinct small tensors (names are what these tests are about)."""
    rng = np.random.default_rng(3)
    return {m: LoraModule(rng.standard_normal((2, 3)).astype(np.float32),
                          rng.standard_normal((3, 2)).astype(np.float32), float(i % 3 + 1))
            for i, m in enumerate(modules)}


def _mindone_reading(kohya_names):
    """{kohya name: diffusers path} by mindone's port of diffusers' SGM mapping (the loader
    diffusers runs on such files), its legacy processor names turned into module paths."""
    from types import SimpleNamespace

    from mindone.diffusers.loaders.lora_conversion_utils import (
        _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers,
    )

    out = {}
    for name in kohya_names:
        mapped = _maybe_map_sgm_blocks_to_diffusers({name + ".lora_down.weight": 0}, SimpleNamespace(layers_per_block=2))
        path = _convert_unet_lora_key(next(iter(mapped)))
        path = re.sub(r"\.processor\.(to_[qkv])_lora\.down\.weight$", r".\1", path)
        path = re.sub(r"\.processor\.to_out_lora\.down\.weight$", ".to_out.0", path)
        out[name] = "unet." + path.replace(".lora.down.weight", "")
    return out


def test_sdxl_key_names_of_every_layout(tmp_path):
    """The real SDXL UNet's Dense layers: kohya's SDXL names (LDM blocks) map back to every module,
    agree with diffusers' own SGM mapping, and SDXL is recognised from the names alone."""
    with no_init_parameters():
        unet = build_unet(unet_preset("sdxl"))
    inject_lora(unet, LoRAConfig(rank=4, target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS + ["time_emb_proj"]))
    paths = ["unet." + p for p in lora_layers(unet)]
    assert len(paths) == 70 * 10 + 17  # 70 transformer blocks x 10, 17 resnets' time_emb_proj
    assert detect_family(paths) == "sdxl" and unet_family(unet) == "sdxl"
    names = {p: kohya_name(p, "sdxl") for p in paths}
    assert all(module_from_kohya(n) == p for p, n in names.items())
    assert all(re.fullmatch(r"lora_unet_(input_blocks_[1-8]_[01]|middle_block_[012]|output_blocks_[0-8]_[01])_\w+", n)
               for n in names.values())
    expected = {  # SGM numbering: down level 0 has no attentions, up level 2 none either
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": "input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj": "input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": "middle_block_1_transformer_blocks_0_attn1_to_out_0",
        "unet.up_blocks.0.attentions.2.transformer_blocks.3.attn1.to_q": "output_blocks_2_1_transformer_blocks_3_attn1_to_q",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks_3_1_transformer_blocks_0_ff_net_2",
        "unet.down_blocks.0.resnets.1.time_emb_proj": "input_blocks_2_0_emb_layers_1",
        "unet.mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "unet.up_blocks.2.resnets.2.time_emb_proj": "output_blocks_8_0_emb_layers_1",
    }
    for module, flat in expected.items():
        assert names[module] == "lora_unet_" + flat
    assert _mindone_reading(names.values()) == {n: p for p, n in names.items()}

    assert not any(n.startswith("lora_unet_input_blocks_1_1") for n in names.values())
    for name, message in [("lora_unet_input_blocks_3_0_op", "downsampler"),
                          ("lora_unet_input_blocks_1_0_in_layers_2", "emb_layers_1"),
                          ("lora_unet_out_2", "not a Dense layer")]:
        with pytest.raises(UserError, match=message):
            module_from_kohya(name)
    with pytest.raises(UserError, match="no kohya SDXL name"):
        kohya_name("unet.conv_in", "sdxl")

    inject_sc_tuners(unet)  # SDXL: 3 up levels x 3 resnets
    keys = list(sc_tuner_named_parameters(unet))
    assert all(re.fullmatch(r"up_blocks\.[0-2]\.resnets\.[0-2]\.scetuner_default\.tuner_op\.ln[12]\.(weight|bias)", k)
               for k in keys) and len(keys) == 36
    assert sc_tuner_dims(unet) == [1280, 1280, 640, 640, 640, 320, 320, 320, 320]


def test_sdxl_lora_convert_round_trips_exactly(tmp_path):
    """diffusers -> kohya (SDXL naming, found from the modules) -> diffusers gives back every tensor
    and alpha, text encoders included; --family overrides the detection both ways."""
    modules = _stand_in([
        "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_v",
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "unet.up_blocks.1.resnets.2.time_emb_proj",
        "unet.add_embedding.linear_1",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
    ])
    source = write_lora_file(modules, str(tmp_path / "d"))
    assert main(["convert", "--from", "diffusers", "--to", "kohya", source, str(tmp_path / "k")]) == 0
    kohya = load_file(str(tmp_path / "k" / "lora_kohya.safetensors"))
    assert {k.rsplit(".", 1)[0].replace(".lora_down", "").replace(".lora_up", "") for k in kohya} == {
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn1_to_v",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
        "lora_unet_output_blocks_5_0_emb_layers_1",
        "lora_unet_label_emb_0_0",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    }
    assert main(["convert", "--from", "kohya", "--to", "diffusers", str(tmp_path / "k"), str(tmp_path / "d2")]) == 0
    back, layout = read_lora_file(str(tmp_path / "d2"))
    assert layout == "diffusers" and set(back) == set(modules)
    for module, m in modules.items():
        np.testing.assert_array_equal(back[module].down, m.down)
        np.testing.assert_array_equal(back[module].up, m.up)
        assert back[module].alpha == m.alpha

    # one text encoder and attention blocks of depth 1 look like SD1.x; --family sdxl says otherwise
    sd_like = _stand_in(["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
                         "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"])
    assert detect_family(sd_like) == "sd"
    source = write_lora_file(sd_like, str(tmp_path / "sd"))
    assert set(load_file(convert("diffusers", "kohya", source, str(tmp_path / "sd_k.safetensors")))) >= {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha"}
    forced = convert("diffusers", "kohya", source, str(tmp_path / "xl_k.safetensors"), family="sdxl")
    assert set(load_file(forced)) >= {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.alpha",
                                      "lora_te1_text_model_encoder_layers_0_self_attn_k_proj.alpha"}
    assert set(read_lora_file(forced)[0]) == set(sd_like)
    with pytest.raises(UserError, match="--family 'sd3'"):
        convert("diffusers", "kohya", source, str(tmp_path / "x"), family="sd3")


def test_sdxl_scepter_numbering_of_nine_tuners(tmp_path):
    """scepter's lsc_identity.m, m = 0..8, is SDXL's decoder skip order: up_blocks.{m // 3}.resnets.{m % 3}."""
    dims = [1280, 1280, 640, 640, 640, 320, 320, 320, 320]
    rng = np.random.default_rng(4)
    state = {f"lsc_identity.{m}.tuner_op.{n}": rng.standard_normal(
        (d, d) if n.endswith("weight") else (d,)).astype(np.float32)
        for m, d in enumerate(dims) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")}
    save_file(state, str(tmp_path / "sdxl_sce.safetensors"))
    convert("scepter", "swift", str(tmp_path / "sdxl_sce.safetensors"), str(tmp_path / "swift"))
    swift = load_file(str(tmp_path / "swift" / "default" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "swift" / "default" / "adapter_config.json").read_text())
    assert config["dims"] == dims and len(swift) == 36
    for m in range(9):
        np.testing.assert_array_equal(swift[f"up_blocks.{m // 3}.resnets.{m % 3}.scetuner_default.tuner_op.ln2.bias"],
                                      state[f"lsc_identity.{m}.tuner_op.ln2.bias"])
    back = load_file(convert("swift", "scepter", str(tmp_path / "swift"), str(tmp_path / "back.safetensors")))
    assert set(back) == set(state) and all(np.array_equal(back[k], v) for k, v in state.items())


def test_tiny_sdxl_unet_lora_and_sc_tuners_through_every_layout(tiny_sdxl_model_dir, tmp_path):
    """On the tiny SDXL UNet (2 levels: 6 SC-Tuners): save_lora's kohya file takes SDXL's names (from
    the UNet config) and loads back into a fresh UNet; SC-Tuners go swift -> scepter -> a fresh UNet."""
    from mindscedit.models.loading import load_unet

    unet = load_unet(tiny_sdxl_model_dir)
    config = LoRAConfig(rank=2, alpha=3, target_modules=ATTENTION_TARGETS + ["time_emb_proj"])
    inject_lora(unet, config)
    _randomise([p for p in unet.trainable_params() if "lora_" in p.name], seed=7)
    original = lora_modules(unet, "default")
    kohya = load_file(save_lora(unet, str(tmp_path / "k"), config, layout="kohya"))
    assert all(re.match(r"lora_unet_(input_blocks_[1-5]|middle_block_[012]|output_blocks_[0-5])_", k) for k in kohya)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.alpha" in kohya
    other = load_unet(tiny_sdxl_model_dir)
    add_lora(other, str(tmp_path / "k"), "k")
    loaded = lora_modules(other, "k")
    assert set(loaded) == set(original)
    for module, m in original.items():
        np.testing.assert_array_equal(loaded[module].down, m.down)
        assert loaded[module].alpha == 3.0

    inject_sc_tuners(unet)
    _randomise(sc_tuner_parameters(unet), seed=8)
    expected = {k: p.asnumpy().copy() for k, p in sc_tuner_named_parameters(unet).items()}
    assert len(expected) == 6 * 4 and sc_tuner_dims(unet) == [64, 64, 32, 32, 32, 32]
    save_sc_tuners(unet, str(tmp_path / "sc"))
    scepter = load_file(convert("swift", "scepter", str(tmp_path / "sc"), str(tmp_path / "sce.safetensors")))
    np.testing.assert_array_equal(scepter["lsc_identity.3.tuner_op.ln1.weight"],
                                  expected["up_blocks.1.resnets.0.scetuner_default.tuner_op.ln1.weight"])
    inject_sc_tuners(other)
    load_sc_tuners(other, str(tmp_path / "sce.safetensors"))
    for key, p in sc_tuner_named_parameters(other).items():
        np.testing.assert_array_equal(p.asnumpy(), expected[key])
