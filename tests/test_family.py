"""Model families: prompt tokenization and encoding, latent scaling, detection from the folder."""
import json
import logging
import re
import shutil
from types import SimpleNamespace

import numpy as np
import mindspore as ms
import pytest

from mindscedit.errors import ModelFolderError
from mindscedit.models.family import LatentScaling, StableDiffusion, detect_family
from mindscedit.models.text import PromptTokenizer, write_tiny_clip_tokenizer


def test_latent_scaling_with_and_without_the_vae_statistics():
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    plain = LatentScaling(SimpleNamespace(scaling_factor=0.18215))
    np.testing.assert_allclose(plain.to_model(ms.Tensor(x)).asnumpy(), x * 0.18215, rtol=1e-6)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.5, 1.0]
    stats = LatentScaling(SimpleNamespace(scaling_factor=0.5, latents_mean=mean, latents_std=std))
    expected = (x - np.reshape(mean, (1, 4, 1, 1))) * 0.5 / np.reshape(std, (1, 4, 1, 1))
    z = stats.to_model(ms.Tensor(x))
    np.testing.assert_allclose(z.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.from_model(z).asnumpy(), x, rtol=1e-5, atol=1e-6)


def test_prompt_tokenizer_cuts_as_clip_does_and_warns_once(tmp_path, caplog):
    clip = write_tiny_clip_tokenizer(tmp_path)
    tokenize = PromptTokenizer(clip)
    for text in ("a cat", "x" * 200):
        expected = clip(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        np.testing.assert_array_equal(tokenize(text), np.asarray(expected, np.int32))
    assert tokenize("a cat").dtype == np.int32
    tokenize = PromptTokenizer(clip)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mindscedit"):
        tokenize("a cat")
        tokenize("y" * 100 + "TAIL")
        tokenize("z" * 300)
    warnings = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(warnings) == 1 and "ytail'" in warnings[0]  # CLIP lower-cases and "77 tokens" in warnings[0]


def test_the_family_is_detected_from_the_model_folder(tiny_model_dir, tmp_path):
    assert detect_family(tiny_model_dir) is StableDiffusion
    xl = tmp_path / "xl"
    shutil.copytree(tiny_model_dir, xl)
    index = json.loads((xl / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match=rf"^model folder {re.escape(str(xl))} has no 'text_encoder_2/' subfolder$"):
        detect_family(str(xl))


def test_the_prompt_encoder_gives_the_text_encoders_last_hidden_states(tiny_model_dir):
    from mindscedit.models.loading import load_components

    components = load_components(tiny_model_dir)
    family = components.family
    ids = ms.Tensor(family.prompt_tokenizer(components)("a photo of a cat")[None])
    expected = components.text_encoder(ids)[0].asnumpy()
    np.testing.assert_array_equal(family.prompt_encoder(components)(ids).asnumpy(), expected)
    assert components.text_encoders == [components.text_encoder]
