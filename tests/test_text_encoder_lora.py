"""Text-encoder LoRA (train_text_encoder): LoRA on the CLIP attention projections of every text
encoder beside the UNet's, at its own learning rate until train_text_encoder_frac, saved in the
same file under text_encoder. / text_encoder_2. (kohya: lora_te_ / lora_te1_ / lora_te2_) and put
back on the encoders by the sampler."""
import dataclasses
import os

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.models import load_components
from mindscedit.sampling import apply_loras
from mindscedit.training.config import load_config
from mindscedit.training.trainer import Trainer
from mindscedit.tuners.lora import TEXT_ENCODER_TARGETS, lora_layers, read_lora_file, write_lora_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAT2 = os.path.join(REPO, "mindscedit", "assets", "cat2")
PROMPT = "a photo of sks cat"


def te_config(model_dir, out, **overrides):
    values = dict(pretrained_model_name_or_path=model_dir, instance_data_dir=CAT2, instance_prompt=PROMPT,
                  train_text_encoder=True, train_text_encoder_frac=0.5, method="lora", output_dir=str(out),
                  resolution=32, max_train_steps=4, checkpointing_steps=1, learning_rate=1e-2, text_encoder_lr=5e-2,
                  rank=2, device_target="CPU", seed=1)
    values.update(overrides)
    return load_config(None, values)


def lora_file_of(folder):
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def part(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def encoded(components, prompt=PROMPT):
    family = components.family
    out = family.prompt_encoder(components)(ms.Tensor(family.prompt_tokenizer(components)(prompt)[None]))
    return [o.asnumpy() for o in (out if isinstance(out, tuple) else (out,))]


def on_fresh_pipeline(model_dir, lora_path):
    components = load_components(model_dir)
    apply_loras(components.unet, [lora_path], 1.0, dict(zip(components.family.text_encoders,
                                                            components.text_encoders)))
    return components


@pytest.fixture(scope="module")
def te_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("te") / "run"
    config = te_config(tiny_model_dir, out)
    trainer = Trainer(config)
    result = trainer.train()
    saved = {step: lora_file_of(out / f"checkpoint-{step}") for step in (1, 2, 3, 4)}
    final = lora_file_of(out)
    trainer.config = dataclasses.replace(config, resume_from_checkpoint=str(out / "checkpoint-1"))
    resumed = trainer.train()
    return trainer, result, saved, final, resumed, out


@pytest.mark.slow
def test_the_text_encoder_lora_trains_until_its_fraction_and_the_encoder_stays_frozen(te_run, tiny_model_dir):
    trainer, result, saved, final, _, _ = te_run
    assert result.global_step == 4 and trainer.pivot_step == 2
    text = {step: part(state, "text_encoder.") for step, state in saved.items()}
    unet = {step: part(state, "unet.") for step, state in saved.items()}
    layers = {k.rsplit(".", 2)[0] for k in text[1]}
    assert len(layers) == 4 * trainer.components.text_encoder.config.num_hidden_layers
    assert {layer.rsplit(".", 1)[1] for layer in layers} == set(TEXT_ENCODER_TARGETS)
    moved = [k for k in text[1] if k.endswith("lora_B.weight") and np.abs(text[2][k]).max() > 0]
    assert moved and any(not np.array_equal(text[2][k], text[1][k]) for k in text[1])  # step 2 trains them
    for k in text[2]:  # from the pivot (step 2) on: not at all
        np.testing.assert_array_equal(text[4][k], text[2][k], err_msg=k)
    assert any(not np.array_equal(unet[4][k], unet[2][k]) for k in unet[2])  # while the UNet's LoRA goes on
    fresh = load_components(tiny_model_dir)
    base = {n: p for n, p in trainer.components.text_encoder.parameters_and_names() if ".lora_" not in n}
    for name, param in fresh.text_encoder.parameters_and_names():
        trained = base[name.replace("_proj.", "_proj.base_layer.")] if name not in base else base[name]
        np.testing.assert_array_equal(trained.asnumpy(), param.asnumpy(), err_msg=name)
    assert final.keys() == saved[4].keys()


@pytest.mark.slow
def test_a_resumed_text_encoder_lora_run_ends_with_the_same_file(te_run):
    _, _, _, final, resumed, out = te_run
    assert resumed.global_step == 4
    again = lora_file_of(out)
    for key, value in final.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@pytest.mark.slow
def test_the_sampler_puts_the_text_encoder_part_back_in_either_layout(te_run, tiny_model_dir, tmp_path):
    trainer, _, _, _, _, out = te_run
    want = encoded(trainer.components)
    file = str(out / "pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(encoded(on_fresh_pipeline(tiny_model_dir, file))[0], want[0], rtol=1e-5, atol=1e-6)
    kohya = write_lora_file(read_lora_file(file)[0], str(tmp_path / "kohya.safetensors"), "kohya")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in load_file(kohya))
    np.testing.assert_allclose(encoded(on_fresh_pipeline(tiny_model_dir, kohya))[0], want[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(encoded(load_components(tiny_model_dir))[0], want[0], atol=1e-4)  # the LoRA matters


@pytest.mark.slow
def test_sdxl_trains_lora_on_both_text_encoders(tiny_sdxl_model_dir, tmp_path):
    out = tmp_path / "xl"
    trainer = Trainer(te_config(tiny_sdxl_model_dir, out, max_train_steps=2, checkpointing_steps=2,
                                train_text_encoder_frac=1.0))
    assert trainer.train().global_step == 2
    state = lora_file_of(out)
    for component in ("text_encoder", "text_encoder_2"):
        b = {k: v for k, v in part(state, component + ".text_model").items() if k.endswith("lora_B.weight")}
        assert b and any(np.abs(v).max() > 0 for v in b.values()), component  # both encoders' LoRA trained
    names = {layer.split(".", 1)[0] for layer in lora_layers(trainer.components.text_encoder_2)}
    assert names == {"text_model"}
    kohya = write_lora_file(read_lora_file(str(out))[0], str(tmp_path / "k.safetensors"), "kohya", "sdxl")
    prefixes = {k.split("_text_model")[0] for k in load_file(kohya) if "_text_model" in k}
    assert prefixes == {"lora_te1", "lora_te2"}
    components = on_fresh_pipeline(tiny_sdxl_model_dir, kohya)
    for got, want in zip(encoded(components), encoded(trainer.components)):  # hidden states and pooled
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
