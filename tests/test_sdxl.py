"""SDXL and Playground v2.5-style folders: detection, the tiny pipelines, prompt encoding and
guidance as mindone's pipeline does them, the time ids of the data and of sampling, and sampling
with Euler / EDM schedulers, SC-Tuners and fp16."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, ops
from PIL import Image

from mindscedit.data import Record, TextImageDataset, create_dataloader, iterate_batches
from mindscedit.data.conditions import ConditionSpec
from mindscedit.data.transforms import crop_coordinates
from mindscedit.errors import ModelFolderError
from mindscedit.models.family import SDXL, Playground, StableDiffusion, detect_family
from mindscedit.models.time_ids import time_ids

PROMPTS = ["a red house, at night", "a cat"]
ARGS = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, num_images_per_prompt=2, progress=False)
ENV = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", GLOG_v="3")


def pixels(images):
    return np.stack([np.asarray(i) for i in images]).astype(int)


@pytest.fixture(scope="module")
def components(tiny_sdxl_model_dir):
    from mindscedit.models.loading import load_components

    return load_components(tiny_sdxl_model_dir)


@pytest.fixture(scope="module")
def sampler(components):
    from mindscedit.sampling import Sampler

    return Sampler(components)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_model_dir):
    from mindone.diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def playground_components(tiny_playground_model_dir):
    from mindscedit.models.loading import load_components

    return load_components(tiny_playground_model_dir)


# ------------------------------------------------------------------------------ folders


def test_sd_sdxl_and_playground_folders_are_told_apart(tiny_model_dir, tiny_sdxl_model_dir, tiny_playground_model_dir):
    assert detect_family(tiny_model_dir) is StableDiffusion
    assert detect_family(tiny_sdxl_model_dir) is SDXL
    assert detect_family(tiny_playground_model_dir) is Playground
    assert (StableDiffusion.noise_schedule, SDXL.noise_schedule, Playground.noise_schedule) == ("ddpm", "ddpm", "edm")
    assert Playground.added_conditions == SDXL.added_conditions == ("text_embeds", "time_ids")


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_2"])
def test_an_sdxl_folder_without_its_second_encoder_fails_in_one_line(tiny_sdxl_model_dir, tmp_path, missing):
    folder = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_model_dir, folder)
    shutil.rmtree(folder / missing)
    with pytest.raises(ModelFolderError) as raised:
        detect_family(str(folder))
    assert str(raised.value) == f"model folder {folder} has no '{missing}/' subfolder"


def test_a_text_time_unet_makes_a_folder_sdxl_whatever_its_index_says(tiny_sdxl_model_dir, tmp_path):
    folder = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_model_dir, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline"}))
    assert detect_family(str(folder)) is SDXL
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(dict(config, addition_embed_type="image")))
    with pytest.raises(ModelFolderError, match=re.escape(f"{folder}: the UNet's addition_embed_type 'image'")):
        detect_family(str(folder))


def test_make_tiny_model_writes_an_sdxl_folder_that_loads(tmp_path, capsys):
    from mindscedit.cli import main
    from mindscedit.models.loading import load_components

    folder = tmp_path / "cli-sdxl"
    main(["make-tiny-model", str(folder), "--family", "sdxl"])
    assert f"written to {folder}" in capsys.readouterr().out
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    comps = load_components(str(folder))
    assert comps.family is SDXL
    assert type(comps.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert comps.tokenizer_2 is not None and comps.text_encoders == [comps.text_encoder, comps.text_encoder_2]
    assert comps.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert comps.scheduler_config["timestep_spacing"] == "leading"
    assert comps.pipeline_config["force_zeros_for_empty_prompt"] is True
    unet = comps.unet.config
    assert unet.addition_embed_type == "text_time"
    te1, te2 = comps.text_encoder.config, comps.text_encoder_2.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert comps.vae.config.scaling_factor == 0.13025


def test_make_tiny_model_writes_a_playground_folder_with_edm_and_latent_statistics(tmp_path):
    from mindscedit.cli import main
    from mindscedit.models.loading import load_components

    folder = tmp_path / "cli-playground"
    main(["make-tiny-model", str(folder), "--family", "playground"])
    comps = load_components(str(folder))
    assert comps.family is Playground
    assert type(comps.noise_scheduler).__name__ == "EDMDPMSolverMultistepScheduler"  # its sigmas, not DDPM's betas
    config = comps.noise_scheduler.config
    assert (config.sigma_min, config.sigma_max, config.sigma_data) == (0.002, 80.0, 0.5)
    vae = comps.vae.config
    assert vae.scaling_factor == 0.5 and len(vae.latents_mean) == len(vae.latents_std) == 4
    assert comps.unet.config.addition_embed_type == "text_time"


def test_make_tiny_model_still_writes_sd_by_default(tmp_path):
    from mindscedit.cli import main

    main(["make-tiny-model", str(tmp_path / "sd")])
    assert detect_family(str(tmp_path / "sd")) is StableDiffusion


# ------------------------------------------------------------------------------ time ids and data


def test_time_ids_are_original_size_crop_and_target_size():
    np.testing.assert_array_equal(time_ids((768, 1024), (32, 0), (512, 512)),
                                  np.array([[768, 1024, 32, 0, 512, 512]], np.float32))
    per_sample = time_ids([[600, 800], [1024, 683]], [[0, 44], [171, 0]], (512, 512))
    assert per_sample.dtype == np.float32
    np.testing.assert_array_equal(per_sample, [[600, 800, 0, 44, 512, 512], [1024, 683, 171, 0, 512, 512]])
    tensor = SDXL.add_time_ids((1024, 1024), (0, 0), (1024, 1024))
    assert tensor.dtype == ms.float32 and tensor.shape == (1, 6)
    np.testing.assert_array_equal(tensor.asnumpy(), [[1024, 1024, 0, 0, 1024, 1024]])
    with pytest.raises(ValueError, match=r"crop_top_left: expected a pair or \[batch, 2\], got shape \(3,\)"):
        time_ids((64, 64), (0, 0, 0), (64, 64))


@pytest.mark.parametrize("params, expected", [
    # A landscape 300x200 (w x h) photo at 64: resized to 96x64, cropped at x = 10.
    (dict(original_size=(300, 200), resized_size=(96, 64), top=0, left=10, crop_size=64, flipped=False),
     [200, 300, 0, 10, 64, 64]),
    # The same crop flipped: diffusers' scripts set x = crop width - x = 64 - 10 (not 96 - 10 - 64 = 22).
    (dict(original_size=(300, 200), resized_size=(96, 64), top=0, left=10, crop_size=64, flipped=True),
     [200, 300, 0, 54, 64, 64]),
    # A portrait 683x1024 photo at 512: resized to 512x768, cropped 171 rows down.
    (dict(original_size=(683, 1024), resized_size=(512, 768), top=171, left=0, crop_size=512, flipped=False),
     [1024, 683, 171, 0, 512, 512]),
    (dict(original_size=(683, 1024), resized_size=(512, 768), top=171, left=0, crop_size=512, flipped=True),
     [1024, 683, 171, 512, 512, 512]),
])
def test_crop_coordinates_give_the_time_ids_of_diffusers_sdxl_scripts(params, expected):
    (values,) = SDXL.size_condition_values(*crop_coordinates(params))
    assert values.dtype == np.float32 and values.shape == (6,)
    np.testing.assert_array_equal(values, expected)
    assert StableDiffusion.size_condition_values(*crop_coordinates(params)) == ()


def gradient_png(width: int, height: int) -> bytes:
    """Brightness rising left to right (red) and top to bottom (green): a flip or crop shows."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sdxl_tokenizer(tmp_path_factory):
    from mindscedit.models.text import PromptTokenizers, write_tiny_clip_tokenizer

    folder = tmp_path_factory.mktemp("tokenizers")
    return PromptTokenizers([write_tiny_clip_tokenizer(folder / "a"), write_tiny_clip_tokenizer(folder / "b")])


def test_sdxl_samples_carry_the_time_ids_of_their_crop_and_flip_and_the_condition_follows(sdxl_tokenizer):
    """A 300x200 landscape at 64, centre crop (x = 16 of the 96-wide resize), random flip; the
    condition column is the same image, so it must come out as the same crop and flip."""
    from mindscedit.data.transforms import ImageTransform

    image = gradient_png(300, 200)
    records = [Record(image=image, caption="a gradient", origin="row 0", condition=image)]
    dataset = TextImageDataset(records, ImageTransform(64, center_crop=True, random_flip=True), sdxl_tokenizer,
                               seed=3, condition=ConditionSpec("column"), family=SDXL)
    seen = set()
    for epoch in range(12):
        pixel_values, input_ids, condition, ids = dataset[epoch]  # key = epoch * 1 + index 0
        flipped = bool(pixel_values[0, 0, 0] > pixel_values[0, 0, -1])  # red falls left to right
        seen.add(flipped)
        np.testing.assert_array_equal(ids, [200, 300, 0, 64 - 16 if flipped else 16, 64, 64])
        assert input_ids.shape == (2, 77)
        np.testing.assert_allclose(condition, (pixel_values + 1) / 2, atol=1e-6)
    assert seen == {False, True}

    sd_sample = TextImageDataset(records, ImageTransform(64, center_crop=True), sdxl_tokenizer, seed=3,
                                 family=StableDiffusion)[0]
    assert len(sd_sample) == 2  # SD: pixels and token ids only, as before


def test_the_loader_has_a_time_ids_column_for_sdxl_only(sdxl_tokenizer):
    """80x64 and 88x64 images at 64, centre crop: x = 8 and 12; SD's batches keep their columns."""
    records = [Record(image=gradient_png(80 + 8 * i, 64), caption=f"image {i}", origin=f"row {i}") for i in range(4)]
    batches = {}
    for family in (SDXL, StableDiffusion):
        loader = create_dataloader(records, sdxl_tokenizer, 64, 2, center_crop=True, shuffle=False, num_workers=1,
                                   prefetch_size=None, family=family)
        batches[family] = next(iterate_batches(loader))
    assert sorted(batches[StableDiffusion]) == ["input_ids", "num_skipped", "pixel_values"]
    assert sorted(batches[SDXL]) == ["input_ids", "num_skipped", "pixel_values", "time_ids"]
    assert batches[SDXL]["time_ids"].dtype == np.float32
    np.testing.assert_array_equal(batches[SDXL]["time_ids"], [[64, 80, 0, 8, 64, 64], [64, 88, 0, 12, 64, 64]])


# ------------------------------------------------------------------------------ prompts and guidance


def test_the_prompt_tokenizer_gives_one_row_per_tokenizer(components):
    ids = SDXL.prompt_tokenizer(components)("a photo of a cat")
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    for row, tokenizer in zip(ids, (components.tokenizer, components.tokenizer_2)):
        expected = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
        np.testing.assert_array_equal(row, expected)


def test_prompt_encoding_matches_mindones_sdxl_pipeline(components, pipe):
    prompts = ["a photo of a cat", "an oil painting of a red barn by the sea"]
    tokenize = SDXL.prompt_tokenizer(components)
    ids = ms.Tensor(np.stack([tokenize(p) for p in prompts]))
    hidden_states, text_embeds = SDXL.prompt_encoder(components)(ids)
    te1, te2 = components.text_encoder.config, components.text_encoder_2.config
    assert hidden_states.shape == (2, 77, te1.hidden_size + te2.hidden_size)
    assert text_embeds.shape == (2, te2.projection_dim)

    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    np.testing.assert_allclose(hidden_states.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text_embeds.asnumpy(), expected_pooled.asnumpy(), rtol=1e-5, atol=1e-5)
    # Not a degenerate comparison: different prompts give different states.
    assert not np.allclose(expected.asnumpy()[0], expected.asnumpy()[1])


def assert_close(actual, expected):
    np.testing.assert_allclose(actual.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-5)


def test_guidance_inputs_match_the_pipelines_negative_prompt_rules_and_time_ids(sampler, pipe, monkeypatch):
    """[uncond; cond] hidden states, pooled text_embeds and time_ids as StableDiffusionXLPipeline
    builds them: no negative prompt -> zeros (force_zeros_for_empty_prompt), or the encoded ""
    when the pipeline's config says otherwise; a negative prompt -> its encoding."""
    hidden, (text_embeds, ids) = sampler.text_conditions(PROMPTS, "", 2, True, 48, 32)
    cond, _, pooled, _ = pipe.encode_prompt(PROMPTS, num_images_per_prompt=2, do_classifier_free_guidance=True)
    assert hidden.shape == (8, 77, 72) and text_embeds.shape == (8, 16)
    assert not hidden[:4].asnumpy().any() and not text_embeds[:4].asnumpy().any()
    assert_close(hidden[4:], cond)
    assert_close(text_embeds[4:], pooled)
    np.testing.assert_array_equal(ids.asnumpy(), [[48, 32, 0, 0, 48, 32]] * 8)  # original = target = (h, w)

    hidden, (text_embeds, _) = sampler.text_conditions(PROMPTS, "blurry, dark", 2, True, 32, 32)
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, num_images_per_prompt=2, do_classifier_free_guidance=True,
                                               negative_prompt=["blurry, dark"] * 2)
    assert_close(hidden[:4], neg)
    assert_close(text_embeds[:4], neg_pooled)

    monkeypatch.setitem(sampler.components.pipeline_config, "force_zeros_for_empty_prompt", False)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        hidden, (text_embeds, _) = sampler.text_conditions(PROMPTS, "", 2, True, 32, 32)
        _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, num_images_per_prompt=2, do_classifier_free_guidance=True)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    assert neg.asnumpy().any() and text_embeds[:4].asnumpy().any()
    assert_close(hidden[:4], neg)
    assert_close(text_embeds[:4], neg_pooled)


# ------------------------------------------------------------------------------ schedulers


def test_each_family_samples_only_with_the_schedulers_of_its_noise_schedule(tiny_playground_model_dir, tmp_path,
                                                                             capfd):
    from mindscedit.cli import main
    from mindscedit.sampling import schedulers_for

    assert schedulers_for("edm") == ["edm_euler", "edm_dpm++_2m"]
    assert "ddim" in schedulers_for("ddpm") and "edm_euler" not in schedulers_for("ddpm")
    assert main(["sample", "--pretrained_model_name_or_path", tiny_playground_model_dir, "--prompt", "a cat",
                 "--scheduler", "ddim", "--output_dir", str(tmp_path / "out"), "--device_target", "CPU"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --scheduler: 'ddim' assumes the DDPM noise schedule and this model was trained on the EDM one; "
        "choose one of edm_euler, edm_dpm++_2m"]
    assert not (tmp_path / "out").exists()


def test_sdxl_samples_with_the_euler_scheduler_of_its_folder(components, tiny_sdxl_model_dir):
    """The default scheduler is the folder's own Euler: same timesteps (leading spacing, offset 1)
    and sigmas as EulerDiscreteScheduler loaded from it."""
    from mindone.diffusers import EulerDiscreteScheduler

    from mindscedit.sampling import make_scheduler

    assert SDXL.default_scheduler == "euler"
    ours = make_scheduler("euler", components.noise_scheduler.config)
    folder = EulerDiscreteScheduler.from_pretrained(tiny_sdxl_model_dir, subfolder="scheduler")
    for scheduler in (ours, folder):
        scheduler.set_timesteps(25)
    np.testing.assert_array_equal(ours.timesteps.asnumpy(), folder.timesteps.asnumpy())
    np.testing.assert_array_equal(ours.sigmas.asnumpy(), folder.sigmas.asnumpy())
    assert ours.timesteps.asnumpy()[0] == 961  # leading spacing: 960 + steps_offset 1


class EDMOracleUNet(nn.Cell):
    """A perfect EDM denoiser for one clean latent x0: from the scheduler's scaled input and
    timestep (c_noise = log(sigma) / 4) it returns the F with c_skip * x + c_out * F = x0."""

    def __init__(self, x0, sigma_data):
        super().__init__()
        self.x0 = ms.Tensor(x0)
        self.sigma_data = sigma_data
        self.dtype = ms.float32
        self.config = SimpleNamespace(in_channels=4, sample_size=4)

    def construct(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
        sigma = ops.exp(4.0 * timestep).reshape(-1, 1, 1, 1)
        total = sigma * sigma + self.sigma_data ** 2
        x = sample * ops.sqrt(total)  # the scheduler scaled the input by c_in = 1 / sqrt(sigma^2 + sigma_data^2)
        c_skip = self.sigma_data ** 2 / total
        c_out = sigma * self.sigma_data / ops.sqrt(total)
        return ((self.x0 - c_skip * x) / c_out,)


def test_edm_schedulers_drive_a_perfect_model_to_its_target(playground_components):
    """The timesteps, input scaling and initial noise of the EDM schedulers reach the UNet as
    the schedulers mean them: an exact model lands on x0."""
    from mindscedit.sampling import Sampler

    x0 = np.random.default_rng(4).standard_normal((1, 4, 4, 4)).astype(np.float32)
    oracle = EDMOracleUNet(x0, playground_components.noise_scheduler.config.sigma_data)
    sampler = Sampler(replace(playground_components, unet=oracle))
    assert sampler.scheduler == "edm_dpm++_2m"  # the family's default
    for name in ("edm_dpm++_2m", "edm_euler"):
        sampler.scheduler = name
        latents, _ = sampler.sample_latents(["x"], "", 6, 1.0, 0, 32, 32, 1, False)
        np.testing.assert_allclose(latents.asnumpy(), x0, atol=2e-3, err_msg=name)


def test_playground_decodes_with_its_latent_statistics(playground_components):
    from mindscedit.sampling.sampler import VaeDecoder

    vae = playground_components.vae
    config = vae.config
    scaling = Playground.latent_scaling(vae)
    assert scaling.has_statistics
    np.testing.assert_allclose(scaling.latents_mean.asnumpy().ravel(), config.latents_mean, rtol=1e-6)
    latents = np.random.default_rng(8).standard_normal((1, 4, 4, 4)).astype(np.float32)
    decoded = VaeDecoder(vae, scaling)(ms.Tensor(latents)).asnumpy()
    mean, std = (np.reshape(v, (1, 4, 1, 1)).astype(np.float32) for v in (config.latents_mean, config.latents_std))
    raw = vae.decode(ms.Tensor(latents * std / np.float32(config.scaling_factor) + mean))[0].asnumpy()
    np.testing.assert_allclose(decoded, np.clip(raw / 2 + 0.5, 0, 1), atol=1e-5)
    plain = vae.decode(ms.Tensor(latents / config.scaling_factor))[0].asnumpy()
    assert np.abs(decoded - np.clip(plain / 2 + 0.5, 0, 1)).max() > 1e-2  # the statistics matter


# ------------------------------------------------------------------------------ sampling


@pytest.mark.slow
def test_sdxl_sampling_is_deterministic_per_seed_and_follows_the_negative_prompt(sampler):
    first = sampler(PROMPTS, seed=0, **ARGS)
    compiled = len(sampler.guided_denoiser.compile_cache)
    again = sampler(PROMPTS, seed=0, **ARGS)
    other = sampler(PROMPTS, seed=1, **ARGS)
    negative = sampler(PROMPTS, negative_prompt="blurry", seed=0, **ARGS)
    assert len(first) == 4 and first[0].size == (32, 32) and first[0].info["scheduler"] == "euler"
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert pixels(first).std() > 0
    np.testing.assert_array_equal(pixels(other)[0], pixels(first)[1])  # image k has seed + k
    assert not np.array_equal(pixels(other), pixels(first))
    assert not np.array_equal(pixels(negative), pixels(first))
    # New seeds, negative prompt and added conditions are inputs of the same compiled graph.
    assert len(sampler.guided_denoiser.compile_cache) == compiled


@pytest.mark.slow
def test_sdxl_sample_command_writes_the_images_of_the_sampler(sampler, tiny_sdxl_model_dir, tmp_path):
    """`mindscedit sample` in its own process: Euler by default, and the same pixels as the
    in-process sampler for the same prompt, size and seeds."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mindscedit.cli", "sample", "--pretrained_model_name_or_path",
               tiny_sdxl_model_dir, "--prompt", PROMPTS[1], "--num_inference_steps", "3", "--guidance_scale", "5",
               "--height", "32", "--width", "32", "--num_images_per_prompt", "2", "--seed", "4",
               "--output_dir", str(out), "--device_target", "CPU"]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 2 images and 1 grids" in done.stdout
    expected = sampler([PROMPTS[1]], seed=4, **ARGS)
    for k, image in enumerate(expected):
        with Image.open(out / f"000-a-cat-seed{4 + k}.png") as png:
            assert png.text["scheduler"] == "euler"
            np.testing.assert_array_equal(np.asarray(png), np.asarray(image))


@pytest.mark.slow
def test_sdxl_sample_command_loads_sc_tuners_and_a_lora(sampler, tiny_sdxl_model_dir, sdxl_scedit_dir, tmp_path):
    """`--scedit` and `--lora` on an SDXL folder through the command: both load onto the SDXL UNet;
    at strength 0 the images are the base model's exactly, at strength 1 they are not."""
    from mindscedit.models import build_unet
    from mindscedit.models.tiny import tiny_sdxl_unet_config
    from mindscedit.tuners.lora import LoRAConfig, inject_lora, save_lora

    ms.set_seed(2)
    trained = build_unet(tiny_sdxl_unet_config())
    rng = np.random.default_rng(6)
    for p in inject_lora(trained, LoRAConfig(rank=2, alpha=4)):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    save_lora(trained, str(tmp_path / "lora"), LoRAConfig(rank=2, alpha=4))
    expected = pixels(sampler([PROMPTS[1]], seed=4, **ARGS))
    for strength in ("0", "1"):
        out = tmp_path / f"out{strength}"
        command = [sys.executable, "-m", "mindscedit.cli", "sample", "--pretrained_model_name_or_path",
                   tiny_sdxl_model_dir, "--prompt", PROMPTS[1], "--num_inference_steps", "3", "--guidance_scale", "5",
                   "--height", "32", "--width", "32", "--num_images_per_prompt", "2", "--seed", "4",
                   "--scedit", sdxl_scedit_dir, "--tuner_scale", strength, "--lora", str(tmp_path / "lora"),
                   "--lora_scale", strength, "--output_dir", str(out), "--device_target", "CPU"]
        done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        images = []
        for k in range(2):
            with Image.open(out / f"000-a-cat-seed{4 + k}.png") as png:
                images.append(np.asarray(png))
        if strength == "0":
            np.testing.assert_array_equal(np.stack(images), expected)
        else:
            assert np.abs(np.stack(images).astype(int) - expected).max() > 0


@pytest.mark.slow
def test_playground_sample_command_uses_its_edm_scheduler(tiny_playground_model_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mindscedit.cli", "sample", "--pretrained_model_name_or_path",
               tiny_playground_model_dir, "--prompt", "a cat", "--negative_prompt", "blurry",
               "--num_inference_steps", "4", "--height", "32", "--width", "32", "--output_dir", str(out),
               "--device_target", "CPU"]
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(out / "000-a-cat-seed0.png") as png:
        assert png.text["scheduler"] == "edm_dpm++_2m" and png.size == (32, 32)
        assert np.asarray(png).std() > 0


@pytest.fixture(scope="module")
def sdxl_scedit_dir(tmp_path_factory):
    """SC-Tuners for the tiny SDXL UNet as training writes them, randomised to change the output."""
    from mindscedit.models import build_unet
    from mindscedit.models.tiny import tiny_sdxl_unet_config
    from mindscedit.tuners.sc_tuner import inject_sc_tuners, save_sc_tuners, sc_tuner_dims, sc_tuner_parameters

    ms.set_seed(1)
    unet = build_unet(tiny_sdxl_unet_config())
    inject_sc_tuners(unet)
    assert sc_tuner_dims(unet) == [64, 64, 32, 32, 32, 32]  # the encoder's skip channels, decoder order
    rng = np.random.default_rng(5)
    for p in sc_tuner_parameters(unet):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    folder = str(tmp_path_factory.mktemp("sdxl-scedit"))
    save_sc_tuners(unet, folder)
    return folder


@pytest.mark.slow
def test_sc_tuners_load_on_the_sdxl_unet_and_scale_zero_is_the_base_model(sampler, tiny_sdxl_model_dir,
                                                                           sdxl_scedit_dir):
    from mindscedit.models.loading import load_components
    from mindscedit.sampling import Sampler, apply_sc_tuners
    from mindscedit.tuners.sc_tuner import set_tuner_scale

    components = load_components(tiny_sdxl_model_dir)
    apply_sc_tuners(components.unet, sdxl_scedit_dir, scale=0.0)
    tuned = Sampler(components)
    base = pixels(sampler(PROMPTS, seed=3, **ARGS))
    np.testing.assert_array_equal(pixels(tuned(PROMPTS, seed=3, **ARGS)), base)
    set_tuner_scale(components.unet, 1.0)
    assert np.abs(pixels(tuned(PROMPTS, seed=3, **ARGS)) - base).max() > 0


@pytest.mark.slow
def test_a_csc_tuner_steers_sdxl_sampling_and_control_scale_zero_is_the_base_model(sampler, components):
    """ControlledUNet under the sampler gets SDXL's added conditions: at control scale 0 the
    images are the plain UNet's exactly (they would not be without text_embeds and time_ids)."""
    from mindscedit.sampling import Sampler
    from mindscedit.tuners.csc_tuner import ControlledUNet, build_csc_tuner

    tuner = build_csc_tuner(components.unet)
    rng = np.random.default_rng(5)
    for p in tuner.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    condition = rng.uniform(0, 1, (3, 32, 32)).astype(np.float32)
    controlled = Sampler(components, controlled=ControlledUNet(components.unet, {"depth": tuner}))
    base, _ = sampler.sample_latents(PROMPTS, "", 3, 5.0, 0, 32, 32, 2, False)
    off, _ = controlled.sample_latents(PROMPTS, "", 3, 5.0, 0, 32, 32, 2, False, [condition], [1.0], 0.0)
    on, _ = controlled.sample_latents(PROMPTS, "", 3, 5.0, 0, 32, 32, 2, False, [condition], [1.0], 1.0)
    np.testing.assert_allclose(off.asnumpy(), base.asnumpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(on.asnumpy() - base.asnumpy()).max() > 1e-4
    assert len(controlled.guided_denoiser.compile_cache) == 1  # one graph for both calls


def test_a_lora_file_of_the_sdxl_unet_loads_onto_it(tmp_path):
    """LoRA on SDXL's attention layers (two transformer blocks deep here): every saved layer
    finds its module, with its rank, alpha and weights."""
    from safetensors.numpy import load_file

    from mindscedit.models import build_unet
    from mindscedit.models.tiny import tiny_sdxl_unet_config
    from mindscedit.sampling import apply_loras
    from mindscedit.tuners.lora import LoRAConfig, inject_lora, lora_layers, save_lora

    ms.set_seed(2)
    trained = build_unet(tiny_sdxl_unet_config())
    rng = np.random.default_rng(6)
    for p in inject_lora(trained, LoRAConfig(rank=2, alpha=4)):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    save_lora(trained, str(tmp_path), LoRAConfig(rank=2, alpha=4))
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))

    unet = build_unet(tiny_sdxl_unet_config())
    assert apply_loras(unet, [str(tmp_path / "pytorch_lora_weights.safetensors")]) == ["lora0"]
    layers = lora_layers(unet)
    assert any(".transformer_blocks.1." in path for path in layers)
    assert {f"unet.{path}.lora_A.weight" for path in layers} == {k for k in saved if k.endswith("lora_A.weight")}
    for path, layer in layers.items():
        np.testing.assert_array_equal(layer.lora_B["lora0"].weight.asnumpy(), saved[f"unet.{path}.lora_B.weight"])
        assert layer.scaling["lora0"] == pytest.approx(4 / 2)


@pytest.mark.slow
def test_sdxl_in_fp16_is_close_to_fp32(sampler, tiny_sdxl_model_dir):
    """The Ascend setting: every network in fp16, added conditions cast to the UNet's dtype."""
    from mindscedit.models.loading import load_components
    from mindscedit.sampling import Sampler

    half = Sampler(load_components(tiny_sdxl_model_dir, ms.float16))
    images = {name: pixels(s([PROMPTS[1]], seed=2, **ARGS)) / 255 for name, s in (("fp16", half), ("fp32", sampler))}
    assert images["fp16"].std() > 0.01
    assert np.abs(images["fp16"] - images["fp32"]).mean() < 0.02  # fp16 rounding, not another image


@pytest.mark.slow
def test_the_tiny_unet_takes_the_added_conditions(components):
    """The family's prompt encoder and time ids are what the UNet's text_time embedding reads."""
    hidden_states, text_embeds = SDXL.prompt_encoder(components)(
        ms.Tensor(SDXL.prompt_tokenizer(components)("a cat")[None]))
    conditions = dict(zip(SDXL.added_conditions, (text_embeds, SDXL.add_time_ids((64, 64), (0, 0), (64, 64)))))
    latents = ms.Tensor(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    out = components.unet(latents, ms.Tensor([10]), hidden_states, added_cond_kwargs=conditions)[0]
    assert out.shape == (1, 4, 8, 8)
    other = dict(conditions, time_ids=SDXL.add_time_ids((32, 64), (8, 0), (64, 64)))
    assert not np.allclose(out.asnumpy(), components.unet(latents, ms.Tensor([10]), hidden_states,
                                                          added_cond_kwargs=other)[0].asnumpy())
