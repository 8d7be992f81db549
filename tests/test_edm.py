"""EDM-style training: the loss against NumPy and mindone's EDM scheduler for both schedule kinds
and both prediction types; tiny runs whose loss falls, on a DDPM model with
do_edm_style_training and on a Playground-style folder (EDM scheduler), which resumes exactly."""
import dataclasses
import shutil

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.cli import main
from mindscedit.losses import DiffusionLoss, EDMLoss, training_loss
from mindscedit.models.presets import PLAYGROUND_SCHEDULER, SD_SCHEDULER
from mindscedit.training.checkpoint import load_training_state
from mindscedit.training.config import load_config
from mindscedit.training.trainer import Trainer


def ddpm_scheduler():
    from mindone.diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULER)


def edm_scheduler(prediction_type="epsilon"):
    from mindone.diffusers import EDMEulerScheduler

    config = {k: v for k, v in PLAYGROUND_SCHEDULER.items() if k in ("sigma_min", "sigma_max", "sigma_data", "rho",
                                                                     "sigma_schedule", "num_train_timesteps")}
    return EDMEulerScheduler(**config, prediction_type=prediction_type)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    x0, noise, pred = (rng.standard_normal((4, 4, 2, 2)).astype(np.float32) for _ in range(3))
    return x0, noise, pred, np.array([0, 17, 500, 999], np.int32)


def run_loss(loss, x0, noise, pred, index):
    """(noisy, unet sample, unet timestep, loss) from the Cell's parts."""
    x0, noise, pred, index = (ms.Tensor(a) for a in (x0, noise, pred, index))
    noisy = loss.add_noise(x0, noise, index)
    sample, timestep = loss.unet_inputs(noisy, index)
    value = loss(pred, x0, noise, index, noisy)
    return noisy.asnumpy(), sample.asnumpy(), timestep.asnumpy(), float(value.asnumpy())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_discrete_schedule_edm_loss_follows_diffusers_formulas(prediction_type):
    scheduler = ddpm_scheduler()
    alphas = scheduler.alphas_cumprod.asnumpy().astype(np.float64)
    loss = training_loss(scheduler, prediction_type, edm_style=True)
    assert isinstance(loss, EDMLoss) and loss.num_train_timesteps == 1000
    x0, noise, pred, index = batch()
    noisy, sample, timestep, value = run_loss(loss, x0, noise, pred, index)

    sigma = np.sqrt((1 - alphas[index]) / alphas[index]).reshape(-1, 1, 1, 1)  # Euler's sigmas of those timesteps
    np.testing.assert_allclose(noisy, x0 + sigma * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sample, noisy / np.sqrt(sigma**2 + 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(timestep, index.astype(np.float32))  # the UNet sees the discrete timestep
    if prediction_type == "epsilon":  # diffusers: model_pred * (-sigmas) + noisy_model_input
        denoised = pred * -sigma + noisy
    else:  # model_pred * (-sigmas / (sigmas**2 + 1) ** 0.5) + noisy_model_input / (sigmas**2 + 1)
        denoised = pred * (-sigma / np.sqrt(sigma**2 + 1)) + noisy / (sigma**2 + 1)
    weight = sigma.reshape(-1) ** -2.0
    expected = np.mean(weight * np.mean((denoised - x0) ** 2, axis=(1, 2, 3)))
    assert value == pytest.approx(expected, rel=1e-4)

    # The DDPM target itself (noise, or v) denoises exactly: the two parameterisations agree.
    a = alphas[index].reshape(-1, 1, 1, 1)
    ddpm_target = noise if prediction_type == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * x0
    assert run_loss(loss, x0, noise, ddpm_target.astype(np.float32), index)[3] < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_scheduler_loss_follows_mindones_preconditioning(prediction_type):
    scheduler = edm_scheduler(prediction_type)
    loss = training_loss(scheduler, prediction_type, edm_style=False)  # an EDM scheduler trains EDM-style anyway
    assert isinstance(loss, EDMLoss) and loss.num_train_timesteps == 1000
    x0, noise, pred, index = batch(1)
    noisy, sample, timestep, value = run_loss(loss, x0, noise, pred, index)

    sigma = scheduler.sigmas.asnumpy()[index].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(noisy, x0 + sigma * noise, rtol=1e-5, atol=1e-5)
    reference_input = scheduler.precondition_inputs(ms.Tensor(noisy), ms.Tensor(sigma)).asnumpy()
    np.testing.assert_allclose(sample, reference_input, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(timestep, 0.25 * np.log(sigma.reshape(-1)), rtol=1e-5, atol=1e-6)  # c_noise
    denoised = scheduler.precondition_outputs(ms.Tensor(noisy), ms.Tensor(pred), ms.Tensor(sigma)).asnumpy()
    expected = np.mean(np.mean((denoised - x0) ** 2, axis=(1, 2, 3)))  # unweighted, as diffusers trains it
    assert value == pytest.approx(expected, rel=1e-4)

    # The same from Karras et al.'s formulas in float64, independent of mindone.
    s, sd = sigma.astype(np.float64), float(scheduler.config.sigma_data)
    assert sd == 0.5
    c_in = 1 / np.sqrt(s**2 + sd**2)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / np.sqrt(s**2 + sd**2) * (1 if prediction_type == "epsilon" else -1)
    np.testing.assert_allclose(sample, c_in * noisy, rtol=1e-5, atol=1e-6)
    numpy_denoised = c_skip * noisy + c_out * pred
    np.testing.assert_allclose(denoised, numpy_denoised, rtol=1e-4, atol=1e-5)
    assert value == pytest.approx(np.mean((numpy_denoised - x0) ** 2), rel=1e-4)


def test_without_edm_the_ddpm_loss_is_unchanged():
    loss = training_loss(ddpm_scheduler(), "epsilon", snr_gamma=5.0)
    assert isinstance(loss, DiffusionLoss) and loss.use_snr_weights


def test_min_snr_with_edm_style_training_is_one_line(tiny_model_dir, photos_dir, tmp_path, capsys):
    assert main(["train", "--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", photos_dir,
                 "--output_dir", str(tmp_path / "out"), "--device_target", "CPU", "--do_edm_style_training",
                 "--snr_gamma", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: snr_gamma: Min-SNR weighting is not defined for EDM-style training (do_edm_style_training); unset one"]


def test_min_snr_on_an_edm_folder_is_one_line(tiny_playground_model_dir, photos_dir, tmp_path, capsys):
    assert main(["train", "--pretrained_model_name_or_path", tiny_playground_model_dir, "--train_data_dir",
                 photos_dir, "--output_dir", str(tmp_path / "out"), "--device_target", "CPU", "--snr_gamma", "5"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: snr_gamma: Min-SNR weighting is not defined for EDM-style training")
    assert tiny_playground_model_dir in line


def test_min_snr_on_an_sd_folder_with_an_edm_scheduler_is_refused_before_class_images(tiny_model_dir, photos_dir,
                                                                                      tmp_path, capsys):
    """Any family whose folder ships an EDM scheduler trains EDM-style, so Min-SNR is refused there too,
    and before prior preservation spends minutes generating class images."""
    import json
    import os

    model = tmp_path / "sd_edm"
    shutil.copytree(tiny_model_dir, model)
    config = dict(PLAYGROUND_SCHEDULER, _class_name="EDMEulerScheduler")
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    class_dir = tmp_path / "class"
    assert main(["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", photos_dir,
                 "--instance_prompt", "a photo of sks cat", "--with_prior_preservation", "--class_data_dir",
                 str(class_dir), "--class_prompt", "a photo of a cat", "--num_class_images", "2",
                 "--output_dir", str(tmp_path / "out"), "--device_target", "CPU", "--snr_gamma", "5"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: snr_gamma: Min-SNR weighting is not defined for EDM-style training")
    assert str(model) in line
    assert not class_dir.exists() or not os.listdir(class_dir)


def make_config(model_dir, data_dir, output_dir, **overrides):
    values = dict(pretrained_model_name_or_path=model_dir, train_data_dir=data_dir, output_dir=str(output_dir),
                  resolution=32, center_crop=True, train_batch_size=2, max_train_steps=30, checkpointing_steps=1000,
                  device_target="CPU", compile_cache_dir="", method="scedit", learning_rate=5e-3)
    values.update(overrides)
    return load_config(None, values)


@pytest.mark.parametrize("method, learning_rate", [("scedit", 5e-3), ("vanilla", 3e-4), ("scedit_control", 5e-3)])
@pytest.mark.slow
def test_edm_style_training_lowers_the_loss_on_a_ddpm_model(method, learning_rate, tiny_model_dir, photos_dir,
                                                             tmp_path):
    trainer = Trainer(make_config(tiny_model_dir, photos_dir, tmp_path, do_edm_style_training=True, method=method,
                                  learning_rate=learning_rate, control_type="canny")).build()
    assert isinstance(trainer.train_step.model.denoise.loss, EDMLoss)
    rng = np.random.default_rng(0)
    pixels = ms.Tensor(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    ids = trainer.family.prompt_tokenizer(trainer.components)("a photo of a cat")
    inputs = (pixels, ms.Tensor(np.stack([ids, ids])), *trainer.draw_randomness(0, 2))
    if trainer.method.takes_condition:  # CSC-Tuner: a fixed condition image beside the batch
        inputs += (ms.Tensor(rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)),)
    lr = ms.Tensor(learning_rate, ms.float32)
    losses = [float(trainer.train_step(*inputs, lr)[1].asnumpy()) for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses


@pytest.mark.slow
def test_a_playground_folder_trains_edm_style_and_resumes_exactly(tiny_playground_model_dir, photos_dir, tmp_path):
    config = make_config(tiny_playground_model_dir, photos_dir, tmp_path / "full", method="lora", max_train_steps=4,
                         checkpointing_steps=2, learning_rate=1e-3)
    trainer = Trainer(config).build()
    assert isinstance(trainer.train_step.model.denoise.loss, EDMLoss)
    full = trainer.train()
    assert full.global_step == 4 and np.isfinite(full.losses).all()
    final = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))

    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    load_training_state(str(tmp_path / "full" / "checkpoint-2"), trainer.train_step, "lora")
    trainer.config = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="latest")
    resumed = trainer.train()
    assert resumed.losses == full.losses[2:]
    again = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    for key in final:
        np.testing.assert_array_equal(again[key], final[key], err_msg=key)


def test_prior_preservation_splits_the_edm_loss_after_the_sigma_weights():
    """EDM-style training with DreamBooth's prior preservation: sigma^-2 weights per sample, then the
    instance half's mean plus prior_loss_weight times the class half's."""
    scheduler = ddpm_scheduler()
    loss = training_loss(scheduler, "epsilon", edm_style=True, prior_split=(2, 0.5))
    x0, noise, pred, index = batch(2)
    noisy, _, _, value = run_loss(loss, x0, noise, pred, index)
    alphas = scheduler.alphas_cumprod.asnumpy().astype(np.float64)
    sigma = np.sqrt((1 - alphas[index]) / alphas[index])
    errors = sigma**-2.0 * np.mean((pred * -sigma.reshape(-1, 1, 1, 1) + noisy - x0) ** 2, axis=(1, 2, 3))
    assert value == pytest.approx(errors[:2].mean() + 0.5 * errors[2:].mean(), rel=1e-4)
