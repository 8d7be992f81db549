"""SDXL folders: detection, the tiny SDXL pipeline, prompt encoding as mindone's pipeline does it,
and the time ids."""
import json
import re
import shutil

import numpy as np
import mindspore as ms
import pytest

from mindscedit.errors import ModelFolderError
from mindscedit.models.family import SDXL, StableDiffusion, detect_family
from mindscedit.models.time_ids import time_ids


@pytest.fixture(scope="module")
def components(tiny_sdxl_model_dir):
    from mindscedit.models.loading import load_components

    return load_components(tiny_sdxl_model_dir)


def test_sd_and_sdxl_folders_are_told_apart(tiny_model_dir, tiny_sdxl_model_dir):
    assert detect_family(tiny_model_dir) is StableDiffusion
    assert detect_family(tiny_sdxl_model_dir) is SDXL


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
    unet = comps.unet.config
    assert unet.addition_embed_type == "text_time"
    te1, te2 = comps.text_encoder.config, comps.text_encoder_2.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert comps.vae.config.scaling_factor == 0.13025


def test_make_tiny_model_still_writes_sd_by_default(tmp_path):
    from mindscedit.cli import main

    main(["make-tiny-model", str(tmp_path / "sd")])
    assert detect_family(str(tmp_path / "sd")) is StableDiffusion


def test_the_prompt_tokenizer_gives_one_row_per_tokenizer(components):
    ids = SDXL.prompt_tokenizer(components)("a photo of a cat")
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    for row, tokenizer in zip(ids, (components.tokenizer, components.tokenizer_2)):
        expected = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True)["input_ids"]
        np.testing.assert_array_equal(row, expected)


def test_prompt_encoding_matches_mindones_sdxl_pipeline(components, tiny_sdxl_model_dir):
    from mindone.diffusers import StableDiffusionXLPipeline

    prompts = ["a photo of a cat", "an oil painting of a red barn by the sea"]
    tokenize = SDXL.prompt_tokenizer(components)
    ids = ms.Tensor(np.stack([tokenize(p) for p in prompts]))
    hidden_states, text_embeds = SDXL.prompt_encoder(components)(ids)
    te1, te2 = components.text_encoder.config, components.text_encoder_2.config
    assert hidden_states.shape == (2, 77, te1.hidden_size + te2.hidden_size)
    assert text_embeds.shape == (2, te2.projection_dim)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir, local_files_only=True)
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    np.testing.assert_allclose(hidden_states.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text_embeds.asnumpy(), expected_pooled.asnumpy(), rtol=1e-5, atol=1e-5)
    # Not a degenerate comparison: different prompts give different states.
    assert not np.allclose(expected.asnumpy()[0], expected.asnumpy()[1])


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


@pytest.mark.parametrize("command", ["train", "sample"])
def test_training_and_sampling_refuse_sdxl_in_one_line_until_they_pass_its_conditions(
        command, tiny_sdxl_model_dir, photos_dir, tmp_path, capfd):
    from mindscedit.cli import main

    args = {"train": ["--train_data_dir", photos_dir], "sample": ["--prompt", "a cat"]}[command]
    assert main([command, "--pretrained_model_name_or_path", tiny_sdxl_model_dir, "--output_dir", str(tmp_path / "out"),
                 "--device_target", "CPU", *args]) == 2
    purpose = {"train": "training", "sample": "sampling"}[command]
    assert capfd.readouterr().err.strip().splitlines() == [
        f"error: {tiny_sdxl_model_dir} is an SDXL pipeline; {purpose} supports SD1.x/2.x folders so far"]
