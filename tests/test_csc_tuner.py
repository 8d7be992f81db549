"""CSC-Tuner: parameter counts, zero-init identity, control scales, several conditions."""
import math

import numpy as np
import mindspore as ms
import pytest
from PIL import Image
from mindspore.nn.utils import no_init_parameters

from mindscedit.data.conditions import annotate, to_condition_tensor
from mindscedit.models import build_unet, unet_preset
from mindscedit.tuners.csc_tuner import ControlledUNet, CSCTunerConfig, build_csc_tuner


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _randomise(cell, rng, std=0.05):
    for p in cell.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * std))


def _tiny_unet():
    ms.set_seed(0)
    return build_unet(unet_preset("tiny"))


def _inputs(rng, batch=2):
    return (
        ms.Tensor(rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)),
        ms.Tensor(np.array([10, 600][:batch], np.int32)),
        ms.Tensor(rng.standard_normal((batch, 77, 32)).astype(np.float32)),
    )


def _scalar(v):
    return ms.Tensor(v, ms.float32)


@pytest.fixture(scope="module")
def setup():
    """A tiny UNet, its plain output, and a ControlledUNet with two (random) condition tuners."""
    rng = np.random.default_rng(0)
    unet = _tiny_unet()
    x, t, text = _inputs(rng)
    base = unet(x, t, text)[0].asnumpy()
    tuners = {"canny": build_csc_tuner(unet), "depth": build_csc_tuner(unet, CSCTunerConfig(dense_hint_kernel=1))}
    controlled = ControlledUNet(unet, tuners)
    conditions = tuple(ms.Tensor(rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)) for _ in range(2))
    return dict(unet=unet, controlled=controlled, tuners=tuners, inputs=(x, t, text), base=base,
                conditions=conditions, rng=rng)


def run(setup, scales, control_scale):
    return setup["controlled"](*setup["inputs"], setup["conditions"], ms.Tensor(scales, ms.float32),
                               _scalar(control_scale)).asnumpy()


def test_sd15_parameter_counts_match_the_paper():
    with no_init_parameters():
        unet = build_unet(unet_preset("sd15"))
        k3 = sum(p.size for p in build_csc_tuner(unet, CSCTunerConfig(dense_hint_kernel=3)).get_parameters())
        k1 = build_csc_tuner(unet, CSCTunerConfig(dense_hint_kernel=1))
        from mindone.diffusers import ControlNetModel

        controlnet = sum(p.size for p in ControlNetModel.from_unet(unet).get_parameters())
    named = dict(k1.parameters_and_names())
    assert k3 == 99_111_760  # 99.1M: pre-hint 0.35M + dense chain 79.08M + SC adapters 19.68M
    assert sum(p.size for p in named.values()) == 28_824_400  # 28.8M with 1x1 dense convs
    assert sum(p.size for n, p in named.items() if n.startswith("pre_hint_blocks.")) == 348_880
    assert sum(p.size for n, p in named.items() if n.startswith("lsc_tuner_blocks.")) == 19_680_000
    assert 355e6 < controlnet < 365e6  # ControlNet of the same UNet: ~361M
    assert 0.075 < 28_824_400 / controlnet < 0.085  # ~8% of ControlNet
    assert {"pre_hint_blocks.12.weight", "dense_hint_blocks.11.1.weight",
            "lsc_tuner_blocks.11.tuner_op.ln2.bias"} <= set(named)  # scepter's key layout


@pytest.mark.slow
def test_fresh_tuners_leave_the_unet_output_unchanged(setup):
    np.testing.assert_array_equal(run(setup, [1.0, 1.0], 1.0), setup["base"])


def test_hints_match_skip_shapes_and_control_follows_the_formula():
    """The CSC-Tuner on its own (no UNet forward: in the quick subset)."""
    rng = np.random.default_rng(1)
    tuner = build_csc_tuner(_tiny_unet())
    _randomise(tuner, rng)
    # The skip shapes of the tiny UNet at 8x8 latents, in encoder push order.
    shapes = [(2, 32, 8, 8)] * 3 + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * 2
    hints = tuner.hints(ms.Tensor(rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)))
    assert [h.shape for h in hints] == shapes
    skips = tuple(ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    controls = tuner.control(skips, hints)
    for i in (0, 3, 5):
        mlp = tuner.lsc_tuner_blocks[len(shapes) - 1 - i].tuner_op
        x = (skips[i].asnumpy() + hints[i].asnumpy()).transpose(0, 2, 3, 1)
        y = _gelu(x @ mlp.ln1.weight.asnumpy().T + mlp.ln1.bias.asnumpy()) @ mlp.ln2.weight.asnumpy().T + mlp.ln2.bias.asnumpy()
        expected = hints[i].asnumpy() + y.transpose(0, 3, 1, 2)
        np.testing.assert_allclose(controls[i].asnumpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_scales_and_several_conditions(setup):
    for tuner in setup["tuners"].values():
        _randomise(tuner, setup["rng"])
    base = setup["base"]
    np.testing.assert_array_equal(run(setup, [1.0, 1.0], 0.0), base)  # control_scale 0: base exactly
    np.testing.assert_array_equal(run(setup, [0.0, 0.0], 1.0), base)
    assert np.abs(run(setup, [1.0, 0.0], 1.0) - base).max() > 1e-4

    # Skip edits add up: skip + cs * (a * ctrl_canny + b * ctrl_depth).
    controlled, rng = setup["controlled"], setup["rng"]
    shapes = [(2, 32, 8, 8)] * 3 + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * 2
    skips = tuple(ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    ctrl = [tuner(skips, c) for tuner, c in zip(setup["tuners"].values(), setup["conditions"])]
    edited = controlled.edit_skips(skips, setup["conditions"], ms.Tensor([0.7, 0.4], ms.float32), _scalar(0.5))
    for i, s in enumerate(skips):
        expected = s.asnumpy() + 0.5 * (0.7 * ctrl[0][i].asnumpy() + 0.4 * ctrl[1][i].asnumpy())
        np.testing.assert_allclose(edited[i].asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_builtin_annotators():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = (200, 50, 50)  # a red square on black
    edges = annotate("canny", image)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[14:18, 30].max() == 255 and edges[24:40, 24:40].max() == 0  # border found, inside empty
    coarse = annotate("color", image, cell=32)
    assert coarse.shape == image.shape and len(np.unique(coarse.reshape(-1, 3), axis=0)) <= 4
    gray = annotate("grayscale", image)
    assert (gray[..., 0] == gray[..., 1]).all() and gray[32, 32, 0] > 0
    masked = annotate("inpainting", np.full((64, 64, 3), 255, np.uint8), rng)
    hole = (masked == 0).all(axis=2)
    assert 0.06 < hole.mean() < 0.37 and not (masked[~hole] == 0).any()
    cond = to_condition_tensor(edges)
    assert cond.shape == (3, 64, 64) and cond.dtype == np.float32 and cond.max() == 1.0
    with pytest.raises(ValueError, match="unknown annotator 'hed'"):
        annotate("hed", image)


# ----------------------------------------------------------------------------- training and data


def _control_config(model_dir, data_dir, output_dir, **overrides):
    from mindscedit.training.config import load_config

    values = dict(method="scedit_control", control_type="canny", pretrained_model_name_or_path=model_dir,
                  train_data_dir=data_dir, output_dir=str(output_dir), resolution=64, center_crop=True,
                  train_batch_size=2, max_train_steps=30, learning_rate=5e-3, device_target="CPU")
    values.update(overrides)
    return load_config(None, values)


@pytest.mark.slow
def test_control_training_lowers_the_loss_and_touches_only_the_tuner(tiny_model_dir, photos_dir, tmp_path):
    from mindscedit.training.trainer import Trainer
    from mindscedit.tuners.csc_tuner import read_csc_tuner_file

    condition_file = tmp_path / "edges.png"
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16:48, 16] = edges[16:48, 47] = edges[16, 16:48] = edges[47, 16:48] = 255  # a square's outline
    Image.fromarray(edges).save(condition_file)
    config = _control_config(tiny_model_dir, photos_dir, tmp_path, validation_prompt=["a photo"],
                             validation_image=[str(condition_file)], num_validation_images=1)
    trainer = Trainer(config).build()
    comps = trainer.components
    frozen = {(i, n): p.asnumpy().copy() for i, c in enumerate((comps.unet, comps.vae, comps.text_encoder))
              for n, p in c.parameters_and_names()}
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    from mindscedit.data.conditions import pixels_to_uint8

    condition = np.stack([to_condition_tensor(annotate("canny", pixels_to_uint8(p))) for p in pixels])
    ids = ms.Tensor(np.zeros((2, 77), np.int32))
    randomness = trainer.draw_randomness(0, 2)
    lr = ms.Tensor(trainer.lrs[0], ms.float32)
    losses = [float(trainer.train_step(ms.Tensor(pixels), ids, *randomness, ms.Tensor(condition), lr)[1].asnumpy())
              for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses
    for (i, n), value in frozen.items():
        current = dict((c for c in (comps.unet, comps.vae, comps.text_encoder)[i].parameters_and_names()))[n]
        np.testing.assert_array_equal(current.asnumpy(), value)  # UNet, VAE, text encoder untouched

    # Validation samples with the tuner being trained, under the validation condition image: a
    # blank condition gives other images than the edge map.
    validator = trainer.validator
    assert validator.sampler.controlled is trainer.method.controlled_unet
    with_edges = np.asarray(Image.open(sorted((tmp_path / validator(30)).glob("*seed*.png"))[0]))
    validator.condition_images = [np.zeros_like(validator.condition_images[0])]
    blank = np.asarray(Image.open(sorted((tmp_path / validator(31)).glob("*seed*.png"))[0]))
    assert with_edges.shape == (64, 64, 3) and not np.array_equal(with_edges, blank)

    trainer.method.save_weights(comps.unet, str(tmp_path / "w"))
    name, config, state = read_csc_tuner_file(str(tmp_path / "w"))
    assert name == "canny" and config.dense_hint_kernel == 3
    tuned = dict(trainer.method.tuner.parameters_and_names())
    assert set(state) == set(tuned)
    for key, value in state.items():
        np.testing.assert_array_equal(value, tuned[key].asnumpy())


def test_condition_gets_the_crop_and_flip_of_its_target(photos_dir):
    import tempfile

    from mindscedit.data import ImageTransform, TextImageDataset, decode_image, load_records, write_tiny_clip_tokenizer
    from mindscedit.data.conditions import ConditionSpec, pixels_to_uint8

    tokenizer = write_tiny_clip_tokenizer(tempfile.mkdtemp())
    # A dataset whose condition column is the photo itself: an aligned condition equals the target.
    records = load_records(photos_dir, condition_column="image")
    transform = ImageTransform(48, center_crop=False, random_flip=True)
    paired = TextImageDataset(records, transform, tokenizer, seed=3, condition=ConditionSpec("column"))
    canny = TextImageDataset(records, transform, tokenizer, seed=3, condition=ConditionSpec("canny"))
    flipped = 0
    for key in range(16):
        pixels, _, condition = paired[key]
        np.testing.assert_allclose(condition, (pixels + 1) / 2, atol=1e-5)
        _, _, edges = canny[key]
        np.testing.assert_array_equal(edges, to_condition_tensor(annotate("canny", pixels_to_uint8(pixels))))
        _, params = transform(decode_image(records[key].image, ""), np.random.default_rng([3, 0, key]))
        flipped += params["flipped"]
    assert 0 < flipped < 16  # both flipped and unflipped samples were checked


def test_condition_that_does_not_fit_names_the_row(photos_dir, tmp_path):
    import json

    from PIL import Image

    from mindscedit.data import DataError, ImageTransform, TextImageDataset, load_records, write_tiny_clip_tokenizer
    from mindscedit.data.conditions import ConditionSpec

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 40)).save(tmp_path / "a_depth.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x", "depth": "a_depth.png"}) + "\n")
    records = load_records(str(tmp_path), condition_column="depth")
    dataset = TextImageDataset(records, ImageTransform(32), write_tiny_clip_tokenizer(str(tmp_path / "tok")),
                               on_bad_sample="error", condition=ConditionSpec("column"))
    with pytest.raises(DataError, match=r"metadata.jsonl line 1: condition image is 30x40, expected 40x40"):
        dataset[0]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x", "depth": "gone.png"}) + "\n")
    dataset.records = load_records(str(tmp_path), condition_column="depth")
    with pytest.raises(DataError, match=r"metadata.jsonl line 1 \(condition\) \(gone.png\): cannot decode image"):
        dataset[0]


def test_control_type_without_annotator_needs_a_column():
    from mindscedit.training.config import load_config
    from mindscedit.errors import UserError

    base = dict(method="scedit_control", pretrained_model_name_or_path="m", train_data_dir="d")
    with pytest.raises(UserError, match="control_type 'depth' is not built in"):
        load_config(None, dict(base, control_type="depth"))
    assert load_config(None, dict(base, control_type="depth", conditioning_image_column="depth_map")).control_type == "depth"


@pytest.mark.slow
def test_sampling_with_control_scale_zero_is_the_base_model(tiny_model_dir):
    from mindscedit.models import load_components
    from mindscedit.sampling import Sampler

    comps = load_components(tiny_model_dir)
    tuner = build_csc_tuner(comps.unet)
    _randomise(tuner, np.random.default_rng(5), std=0.2)
    condition = np.random.default_rng(6).uniform(0, 1, (3, 64, 64)).astype(np.float32)
    args = dict(prompts=["a cat"], num_inference_steps=2, guidance_scale=3.0, height=64, width=64, progress=False)
    base, _ = Sampler(comps).sample_latents(args["prompts"], None, 2, 3.0, 0, 64, 64, 1, False)
    controlled = Sampler(comps, controlled=ControlledUNet(comps.unet, {"canny": tuner}))
    off, _ = controlled.sample_latents(args["prompts"], None, 2, 3.0, 0, 64, 64, 1, False, [condition], [1.0], 0.0)
    on, _ = controlled.sample_latents(args["prompts"], None, 2, 3.0, 0, 64, 64, 1, False, [condition], [1.0], 1.0)
    np.testing.assert_array_equal(off.asnumpy(), base.asnumpy())
    assert np.abs(on.asnumpy() - base.asnumpy()).max() > 1e-4
    # The condition images are graph inputs: the second call reuses the first one's graph.
    assert len(controlled.guided_denoiser.compile_cache) == 1


@pytest.mark.slow
def test_controlled_unet_follows_the_unets_own_forward_with_added_embeddings():
    """A UNet with SDXL's added embeddings (text_time: pooled text and time ids): with its
    CSC-Tuner at scale 0 the controlled forward is the UNet's own, and the tuner's control reaches
    the output otherwise."""
    from mindscedit.models.presets import TINY_UNET

    ms.set_seed(0)
    config = dict(TINY_UNET, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8)
    unet = build_unet(config)
    rng = np.random.default_rng(0)
    x, t, text = _inputs(rng)
    added = {"text_embeds": ms.Tensor(rng.standard_normal((2, 32)).astype(np.float32)),
             "time_ids": ms.Tensor(np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1)))}
    expected = unet(x, t, text, added_cond_kwargs=added)[0].asnumpy()
    tuner = build_csc_tuner(unet)
    _randomise(tuner, rng)
    controlled = ControlledUNet(unet, {"canny": tuner})
    condition = (ms.Tensor(rng.uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)),)
    off = controlled(x, t, text, condition, ms.Tensor([1.0], ms.float32), _scalar(0.0), added).asnumpy()
    np.testing.assert_allclose(off, expected, rtol=1e-5, atol=1e-5)
    on = controlled(x, t, text, condition, ms.Tensor([1.0], ms.float32), _scalar(1.0), added).asnumpy()
    assert np.abs(on - expected).max() > 1e-3
    other_time_ids = controlled(x, t, text, condition, ms.Tensor([1.0], ms.float32), _scalar(0.0),
                                  dict(added, time_ids=added["time_ids"] * 2)).asnumpy()
    assert np.abs(other_time_ids - expected).max() > 1e-4  # the added embeddings do reach the UNet
