"""Sampling: determinism, SC-Tuner scale 0, guidance 1, every scheduler, v-prediction, PNGs, CLI, validation."""
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn, ops
from PIL import Image
from safetensors.numpy import load_file

from mindscedit.models import build_unet, load_components, unet_preset
from mindscedit.sampling import (
    Sampler, apply_loras, apply_sc_tuners, make_scheduler, save_images, schedulers_for, set_lora_scale,
)
from mindscedit.tuners.lora import LoRAConfig, inject_lora, save_lora
from mindscedit.tuners.sc_tuner import inject_sc_tuners, save_sc_tuners, sc_tuner_parameters, set_tuner_scale

PROMPTS = ["a red house, at night", "a cat"]
ARGS = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, num_images_per_prompt=2, progress=False)


def pixels(images):
    return np.stack([np.asarray(i) for i in images])


@pytest.fixture(scope="module")
def base_sampler(tiny_model_dir):
    return Sampler(load_components(tiny_model_dir), "ddim")


@pytest.fixture(scope="module")
def scedit_dir(tmp_path_factory):
    """SC-Tuner weights as training writes them, randomised so that the tuners change the output."""
    ms.set_seed(1)
    unet = build_unet(unet_preset("tiny"))
    inject_sc_tuners(unet)
    rng = np.random.default_rng(5)
    for p in sc_tuner_parameters(unet):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    folder = str(tmp_path_factory.mktemp("scedit"))
    save_sc_tuners(unet, folder)
    return folder


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    ms.set_seed(2)
    unet = build_unet(unet_preset("tiny"))
    config = LoRAConfig(rank=2, alpha=4)
    rng = np.random.default_rng(6)
    for p in inject_lora(unet, config):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    folder = str(tmp_path_factory.mktemp("lora"))
    save_lora(unet, folder, config)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_same_seed_same_images_and_different_seed_different(base_sampler):
    first = base_sampler(PROMPTS, negative_prompt="blurry", seed=0, **ARGS)
    again = base_sampler(PROMPTS, negative_prompt="blurry", seed=0, **ARGS)
    other = base_sampler(PROMPTS, negative_prompt="blurry", seed=1, **ARGS)
    assert len(first) == 4 and first[0].size == (32, 32) and first[0].mode == "RGB"
    np.testing.assert_array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    # Image k of each prompt has seed + k; seed 1's first image is seed 0's second one.
    assert [i.info["seed"] for i in first] == ["0", "1", "0", "1"]
    np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(first[1]))
    assert [i.info["prompt"] for i in first] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2


@pytest.mark.slow
def test_tuner_scale_zero_gives_the_base_model_images(base_sampler, tiny_model_dir, scedit_dir):
    components = load_components(tiny_model_dir)
    apply_sc_tuners(components.unet, scedit_dir, scale=0.0)
    tuned = Sampler(components, "ddim")
    base = pixels(base_sampler(PROMPTS, seed=3, **ARGS))
    np.testing.assert_array_equal(pixels(tuned(PROMPTS, seed=3, **ARGS)), base)
    set_tuner_scale(components.unet, 1.0)  # a Parameter: same compiled graph, new strength
    assert np.abs(pixels(tuned(PROMPTS, seed=3, **ARGS)).astype(int) - base).max() > 0


class Spy:
    """Stands in for a denoiser Cell: records the latent batch of each call and forwards it."""

    def __init__(self, cell):
        self.cell, self.batches = cell, []

    def __call__(self, latents, *args):
        self.batches.append(latents.shape[0])
        return self.cell(latents, *args)


@pytest.mark.slow
def test_guidance_one_runs_only_the_conditional_batch(base_sampler, monkeypatch):
    guided, cond = Spy(base_sampler.guided_denoiser), Spy(base_sampler.cond_denoiser)
    monkeypatch.setattr(base_sampler, "guided_denoiser", guided)
    monkeypatch.setattr(base_sampler, "cond_denoiser", cond)
    plain = base_sampler(PROMPTS, seed=0, **dict(ARGS, guidance_scale=1.0))
    assert guided.batches == [] and cond.batches == [4] * 3
    # The guided path at scale 1 computes u + 1 * (c - u): the same images up to rounding.
    base_sampler(PROMPTS, seed=0, **ARGS)
    assert guided.batches == [4] * 3  # [uncond; cond] doubles inside the Cell: one UNet call per step
    latents_guided, _ = base_sampler.sample_latents(PROMPTS, "", 3, 1.0 + 1e-7, 0, 32, 32, 2, False)
    latents_plain, _ = base_sampler.sample_latents(PROMPTS, "", 3, 1.0, 0, 32, 32, 2, False)
    np.testing.assert_allclose(latents_guided.asnumpy(), latents_plain.asnumpy(), atol=1e-4)
    assert np.isfinite(pixels(plain)).all()


def test_every_scheduler_yields_finite_images(base_sampler):
    results = {}
    try:
        for name in schedulers_for("ddpm"):
            base_sampler.scheduler = name  # same compiled Cells: latents, timestep and scale keep their shapes
            latents, _ = base_sampler.sample_latents(PROMPTS, "", 3, 5.0, 0, 32, 32, 2, False)
            assert np.isfinite(latents.asnumpy()).all(), name
            images = base_sampler(PROMPTS, seed=0, **ARGS)
            assert all(i.info["scheduler"] == name for i in images)
            results[name] = pixels(images).astype(int)
    finally:
        base_sampler.scheduler = "ddim"
    assert all(r.std() > 0 for r in results.values())
    # DDIM (eta 0) is Euler's method on the same ODE and timesteps; the others step differently.
    assert np.abs(results["euler"] - results["ddim"]).max() <= 1
    for name in ("euler_a", "dpm++_2m", "dpm++_2m_karras"):
        assert np.abs(results[name] - results["ddim"]).max() > 1, name


def test_scheduler_config_carries_prediction_type(tiny_vpred_model_dir):
    from mindscedit.models.loading import load_noise_scheduler

    config = load_noise_scheduler(tiny_vpred_model_dir).config
    for name in schedulers_for("ddpm"):
        assert make_scheduler(name, config).config.prediction_type == "v_prediction"
    assert make_scheduler("dpm++_2m_karras", config).config.use_karras_sigmas
    assert make_scheduler("dpm++_2m", config).config.algorithm_type == "dpmsolver++"


class OracleUNet(nn.Cell):
    """A perfect denoiser for one clean latent x0: returns the exact epsilon or v of its input."""

    def __init__(self, alphas_cumprod, prediction_type, x0):
        super().__init__()
        self.alphas_cumprod = ms.Tensor(alphas_cumprod.astype(np.float32))
        self.v = prediction_type == "v_prediction"
        self.x0 = ms.Tensor(x0)
        self.dtype = ms.float32
        self.config = SimpleNamespace(in_channels=4, sample_size=4)

    def construct(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
        a = self.alphas_cumprod[timestep.astype(ms.int32)].reshape(-1, 1, 1, 1)
        eps = (sample - ops.sqrt(a) * self.x0) / ops.sqrt(1 - a)
        return (ops.sqrt(a) * eps - ops.sqrt(1 - a) * self.x0 if self.v else eps,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_perfect_model_recovers_its_target(prediction_type, base_sampler, tiny_model_dir, tiny_vpred_model_dir):
    """The scheduler config's prediction_type drives the update: an exact model lands on x0."""
    from dataclasses import replace

    folder = tiny_vpred_model_dir if prediction_type == "v_prediction" else tiny_model_dir
    from mindscedit.models.loading import load_noise_scheduler

    noise_scheduler = load_noise_scheduler(folder)
    size = 32 // base_sampler.components.vae_scale_factor
    x0 = np.random.default_rng(9).standard_normal((1, 4, size, size)).astype(np.float32)
    oracle = OracleUNet(noise_scheduler.alphas_cumprod.asnumpy(), prediction_type, x0)
    components = replace(base_sampler.components, unet=oracle, noise_scheduler=noise_scheduler)
    sampler = Sampler(components, "ddim")
    sampler.text_encoder = base_sampler.text_encoder  # compiled already
    for name in ("ddim", "dpm++_2m"):
        sampler.scheduler = name
        latents, _ = sampler.sample_latents(["x"], "", 4, 1.0, 0, 32, 32, 1, False)
        np.testing.assert_allclose(latents.asnumpy(), x0, atol=2e-3, err_msg=name)


def test_pngs_carry_prompt_and_seed(base_sampler, tmp_path):
    images = base_sampler(PROMPTS, negative_prompt="blurry", seed=7, **ARGS)
    written = save_images(images, str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "000-a-red-house-at-night-grid.png", "000-a-red-house-at-night-seed7.png", "000-a-red-house-at-night-seed8.png",
        "001-a-cat-grid.png", "001-a-cat-seed7.png", "001-a-cat-seed8.png",
    ]
    assert len(written["images"]) == 4 and len(written["grids"]) == 2
    with Image.open(tmp_path / "000-a-red-house-at-night-seed8.png") as png:
        assert png.text["prompt"] == PROMPTS[0] and png.text["seed"] == "8"
        assert png.text["negative_prompt"] == "blurry" and png.text["scheduler"] == "ddim"
        np.testing.assert_array_equal(np.asarray(png), np.asarray(images[1]))
    with Image.open(tmp_path / "001-a-cat-grid.png") as grid:
        assert grid.size == (64, 32) and grid.text["seeds"] == "7,8"


def test_lora_file_loads_with_its_rank_alpha_and_scale(lora_file):
    from mindscedit.tuners.lora import lora_layers

    unet = build_unet(unet_preset("tiny"))
    assert apply_loras(unet, [lora_file], scale=0.5) == ["lora0"]
    saved = load_file(lora_file)
    layers = lora_layers(unet)
    assert {f"unet.{path}.lora_A.weight" for path in layers} == {k for k in saved if k.endswith("lora_A.weight")}
    for path, layer in layers.items():
        np.testing.assert_array_equal(layer.lora_A["lora0"].weight.asnumpy(), saved[f"unet.{path}.lora_A.weight"])
        np.testing.assert_array_equal(layer.lora_B["lora0"].weight.asnumpy(), saved[f"unet.{path}.lora_B.weight"])
        assert layer.scaling["lora0"] == pytest.approx(0.5 * 4 / 2)  # scale * alpha / rank
    set_lora_scale(unet, 0.0)
    assert all(not layer.is_on("lora0") for layer in layers.values())  # weight 0: the base layer exactly


def _unet_output(lora_files):
    """The tiny UNet's output on fixed inputs with `lora_files` loaded as the sampler's --lora loads them."""
    ms.set_seed(2)
    unet = build_unet(unet_preset("tiny"))
    apply_loras(unet, lora_files, scale=1.0)
    rng = np.random.default_rng(3)
    x = ms.Tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    text = ms.Tensor(rng.standard_normal((1, 5, 32)).astype(np.float32))
    return unet(x, ms.Tensor([400], ms.int32), text)[0].asnumpy()


def test_merged_loras_load_in_the_sampler_and_act_as_their_sum(lora_file, tmp_path):
    """merge-lora's output through the sampler's loading: cat with weights 1, 1 is exactly the two
    adapters active together; a ties merge loads (rank kept) and changes the output."""
    from mindscedit.cli import main
    from mindscedit.tuners.lora.formats import LoraModule
    from mindscedit.tuners.lora.io import read_lora_file, write_lora_file

    rng = np.random.default_rng(7)
    other = {name: LoraModule(rng.standard_normal(m.down.shape).astype(np.float32) * 0.1,
                              rng.standard_normal(m.up.shape).astype(np.float32) * 0.1, m.alpha)
             for name, m in read_lora_file(lora_file)[0].items()}
    second = write_lora_file(other, str(tmp_path / "b.safetensors"))
    for combination, options in (("cat", []), ("ties", ["--density", "0.5"])):
        assert main(["merge-lora", lora_file, second, "--weights", "1", "1", "--combination", combination,
                     "--out", str(tmp_path / combination), *options]) == 0
    together = _unet_output([lora_file, second])
    merged = _unet_output([str(tmp_path / "cat" / "pytorch_lora_weights.safetensors")])
    np.testing.assert_allclose(merged, together, rtol=1e-4, atol=1e-5)
    base, ties = _unet_output([]), _unet_output([str(tmp_path / "ties" / "pytorch_lora_weights.safetensors")])
    assert np.isfinite(ties).all() and not np.allclose(ties, base, atol=1e-4)
    assert not np.allclose(together, base, atol=1e-4)  # the adapters are strong enough to show


@pytest.mark.smoke
@pytest.mark.slow
def test_cli_sample_writes_images_and_grids(tiny_vpred_model_dir, scedit_dir, lora_file, tmp_path):
    """End to end on the v-prediction model, with SC-Tuners and LoRA on the UNet and a stochastic scheduler."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a dog on grass\n\n")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "mindscedit.cli", "sample", "--pretrained_model_name_or_path", tiny_vpred_model_dir,
        "--scedit", scedit_dir, "--tuner_scale", "0.5", "--lora", lora_file, "--lora_scale", "0.8",
        "--prompt", "a cat, sitting", "--prompt_file", str(prompt_file), "--negative_prompt", "blurry",
        "--num_inference_steps", "3", "--guidance_scale", "4", "--seed", "11", "--height", "32", "--width", "32",
        "--num_images_per_prompt", "2", "--scheduler", "euler_a", "--output_dir", str(out), "--device_target", "CPU",
    ]
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", GLOG_v="3")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 4 images and 2 grids" in done.stdout
    assert sorted(os.listdir(out)) == [
        "000-a-cat-sitting-grid.png", "000-a-cat-sitting-seed11.png", "000-a-cat-sitting-seed12.png",
        "001-a-dog-on-grass-grid.png", "001-a-dog-on-grass-seed11.png", "001-a-dog-on-grass-seed12.png",
    ]
    with Image.open(out / "001-a-dog-on-grass-seed12.png") as png:
        assert png.text["prompt"] == "a dog on grass" and png.text["seed"] == "12" and png.size == (32, 32)
        assert png.text["scheduler"] == "euler_a" and np.asarray(png).std() > 0

    bad = subprocess.run(command[:6] + ["--output_dir", str(out)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--prompt" in bad.stderr


@pytest.mark.slow
def test_cli_sample_in_fp16_is_close_to_fp32(tiny_model_dir, scedit_dir, lora_file, tmp_path):
    """The Ascend setting: the model in fp16, SC-Tuners and LoRA on their fp32 weights."""
    images = {}
    for precision in ("no", "fp16"):
        out = tmp_path / precision
        command = [
            sys.executable, "-m", "mindscedit.cli", "sample", "--pretrained_model_name_or_path", tiny_model_dir,
            "--scedit", scedit_dir, "--lora", lora_file, "--prompt", "a cat", "--num_inference_steps", "3",
            "--height", "32", "--width", "32", "--output_dir", str(out), "--device_target", "CPU",
            "--mixed_precision", precision,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", GLOG_v="3"))
        assert done.returncode == 0, done.stderr[-3000:]
        with Image.open(out / "000-a-cat-seed0.png") as png:
            images[precision] = np.asarray(png).astype(np.float32) / 255
    assert images["fp16"].std() > 0.01
    assert np.abs(images["fp16"] - images["no"]).mean() < 0.02  # fp16 rounding, not another image


@pytest.mark.slow
def test_validation_leaves_the_training_losses_unchanged(tiny_model_dir, photos_dir, tmp_path, caplog):
    from mindscedit.training.config import load_config
    from mindscedit.training.trainer import Trainer

    def run(output_dir, **extra):
        config = load_config(None, dict(
            pretrained_model_name_or_path=tiny_model_dir, train_data_dir=photos_dir, output_dir=str(output_dir),
            resolution=32, center_crop=True, train_batch_size=2, max_train_steps=4, checkpointing_steps=1000,
            learning_rate=5e-3, device_target="CPU", **extra,
        ))
        return Trainer(config).train()

    with caplog.at_level(logging.INFO, logger="mindscedit"):
        plain = run(tmp_path / "plain", resume_from_checkpoint="latest")  # nothing to resume: says so, starts at 0
    assert f"resume_from_checkpoint latest: no checkpoint in {tmp_path / 'plain'} yet; starting from step 0" in caplog.text
    validated = run(tmp_path / "validated", validation_prompt=["a photo, outdoors"], validation_steps=2,
                    num_validation_images=2)
    assert validated.losses == plain.losses
    assert sorted(os.listdir(tmp_path / "validated" / "validation")) == ["step_2", "step_4"]
    step_2 = sorted(os.listdir(tmp_path / "validated" / "validation" / "step_2"))
    assert step_2 == ["000-a-photo-outdoors-grid.png", "000-a-photo-outdoors-seed0.png", "000-a-photo-outdoors-seed1.png"]
    assert not (tmp_path / "plain" / "validation").exists()
    # The tuners moved between step 2 and step 4, and the validation images show it.
    with Image.open(tmp_path / "validated" / "validation" / "step_2" / step_2[1]) as a, \
            Image.open(tmp_path / "validated" / "validation" / "step_4" / step_2[1]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    saved = json.load(open(tmp_path / "validated" / "train_config.json"))
    assert saved["validation_prompt"] == ["a photo, outdoors"]


def test_validation_prompt_flag_repeats_and_keeps_commas(tiny_model_dir, photos_dir):
    from mindscedit.cli import build_parser, config_overrides
    from mindscedit.training.config import load_config
    from mindscedit.errors import UserError

    args, extra = build_parser().parse_known_args([
        "train", "--validation_prompt", "a cat, sitting", "--validation_prompt", "a dog", "--validation_steps", "5",
    ])
    overrides = config_overrides(args)
    base = dict(pretrained_model_name_or_path=tiny_model_dir, train_data_dir=photos_dir)
    config = load_config(None, dict(base, **overrides))
    assert config.validation_prompt == ["a cat, sitting", "a dog"] and config.validation_steps == 5
    assert load_config(None, dict(base, validation_prompt="a, b")).validation_prompt == ["a, b"]
    with pytest.raises(UserError, match="num_validation_images"):
        load_config(None, dict(base, validation_prompt=["x"], num_validation_images=0))


def test_cli_sample_refuses_bf16_on_cpu_in_one_line(tiny_model_dir, tmp_path, capsys):
    from mindscedit.cli import main

    args = ["sample", "--pretrained_model_name_or_path", tiny_model_dir, "--prompt", "a cat", "--device_target", "CPU",
            "--mixed_precision", "bf16", "--output_dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --mixed_precision bf16 needs an Ascend device (MindSpore's CPU has no bf16 MatMul kernel)"]
    assert not (tmp_path / "out").exists()


def _with_a_nan(source: str, target: str) -> str:
    """A copy of a safetensors file with one NaN in its first tensor (sorted by key)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    state = load_file(source)
    with safe_open(source, framework="np") as f:
        metadata = f.metadata()
    first = sorted(state)[0]
    state[first] = state[first].copy()
    state[first].flat[0] = np.nan
    save_file(state, target, metadata=metadata)
    return first


@pytest.mark.parametrize("kind", ["lora", "scedit"])
def test_weights_holding_nan_are_refused_naming_file_and_key(kind, tiny_model_dir, scedit_dir, lora_file, tmp_path,
                                                             capfd):
    from mindscedit.cli import main

    source = lora_file if kind == "lora" else os.path.join(scedit_dir, "adapter_model.safetensors")
    target = str(tmp_path / os.path.basename(source))
    key = _with_a_nan(source, target)
    out = tmp_path / "out"
    argv = ["sample", "--pretrained_model_name_or_path", tiny_model_dir, f"--{kind}", target, "--prompt", "a cat",
            "--num_inference_steps", "1", "--height", "32", "--width", "32", "--output_dir", str(out),
            "--device_target", "CPU"]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert f"error: {target}: '{key}' holds 1 non-finite value(s) (NaN or Inf); refusing to load it" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--tuner_scale", "--lora_scale", "--guidance_scale", "--control_scale"])
def test_a_non_finite_strength_is_bad_input(flag, capfd):
    from mindscedit.cli import main

    assert main(["sample", "--pretrained_model_name_or_path", "m", "--prompt", "a", flag, "nan",
                 "--output_dir", "o"]) == 2
    assert f"{flag} must be" in capfd.readouterr().err


def test_non_finite_latents_are_reported_not_saved_as_black_images():
    from mindscedit.errors import UserError

    latents = np.zeros((4, 4, 2, 2), np.float32)
    Sampler._check_finite(latents, ["a", "b"], [0, 1, 0, 1], 2)  # all finite: nothing to say
    latents[3, 0, 0, 0] = np.inf
    with pytest.raises(UserError, match=r"non-finite latents for 1 of 4 images \(first: prompt 'b', seed 1\); "
                                        r"no image was written"):
        Sampler._check_finite(latents, ["a", "b"], [0, 1, 0, 1], 2)


def test_a_validation_that_goes_non_finite_warns_and_training_goes_on(tmp_path, caplog):
    """The sampler's refusal, met during training: a warning naming the step, no folder, no exception."""
    from mindscedit.sampling.validation import Validator

    def diverged_sampler(prompts, **_):
        Sampler._check_finite(np.full((1, 4, 2, 2), np.nan, np.float32), prompts, [0], 1)

    validator = Validator.__new__(Validator)
    validator.sampler, validator.prompts, validator.condition_images = diverged_sampler, ["a cat"], None
    validator.output_dir, validator.resolution, validator.num_images, validator.seed = str(tmp_path), 32, 1, 0
    with caplog.at_level(logging.WARNING, logger="mindscedit"):
        assert validator(7) is None
    assert not (tmp_path / "validation").exists()
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert message.startswith("validation at step 7: sampling gave non-finite latents for 1 of 1 images")


@pytest.mark.slow
def test_sample_with_a_vanilla_trained_unet(tiny_model_dir, tmp_path, capfd):
    """`--unet` takes vanilla training's output (OUTPUT_DIR/unet) in place of the model's UNet."""
    from mindscedit.cli import main

    trained = tmp_path / "vanilla-run"
    ms.set_seed(7)  # other weights than the model's: as if fully fine-tuned
    build_unet(unet_preset("tiny")).save_pretrained(str(trained / "unet"))
    common = ["sample", "--pretrained_model_name_or_path", tiny_model_dir, "--prompt", "a cat", "--seed", "3",
              "--num_inference_steps", "2", "--height", "32", "--width", "32", "--device_target", "CPU"]

    def image(*extra, out):
        assert main(common + list(extra) + ["--output_dir", str(tmp_path / out)]) == 0
        return np.asarray(Image.open(tmp_path / out / "000-a-cat-seed3.png"))

    base = image(out="base")
    np.testing.assert_array_equal(image("--unet", os.path.join(tiny_model_dir, "unet"), out="same"), base)
    assert not np.array_equal(image("--unet", str(trained), out="trained"), base)
    assert main(common + ["--unet", str(tmp_path), "--output_dir", str(tmp_path / "bad")]) == 2
    assert f"--unet: {tmp_path} has no config.json" in capfd.readouterr().err
