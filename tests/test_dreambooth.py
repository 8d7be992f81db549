"""DreamBooth data: a folder of instance images captioned with the instance prompt (or its own
captions), repeats, and the one-line refusals of incomplete settings."""
import os
import shlex

import numpy as np
import mindspore as ms
import pytest
from PIL import Image

from mindscedit.cli import main
from mindscedit.data import load_instance_records, load_records
from mindscedit.errors import UserError
from mindscedit.training.config import load_config
from mindscedit.training.trainer import Trainer

PROMPT = "a photo of sks dog"


@pytest.fixture
def instance_dir(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.JPG", "c.webp"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            folder / name, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[name.split(".")[1].lower()])
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_every_instance_image_gets_the_instance_prompt(instance_dir):
    records = load_instance_records(instance_dir, PROMPT)
    assert [r.image for r in records] == [str(instance_dir / n) for n in ("a.JPG", "b.png", "c.webp")]
    assert {r.caption for r in records} == {PROMPT}


def test_an_instance_folder_in_a_dataset_layout_keeps_its_captions(photos_dir):
    records = load_instance_records(photos_dir, PROMPT)
    assert [r.caption for r in records] == [r.caption for r in load_records(photos_dir)]
    assert PROMPT not in {r.caption for r in records}


def test_an_instance_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=f"^{tmp_path}: no images"):
        load_instance_records(tmp_path, PROMPT)


@pytest.mark.parametrize("flags, message", [
    (["--instance_data_dir", "{dog}"],
     "instance_data_dir needs instance_prompt (the caption of every instance image)"),
    (["--instance_data_dir", "{dog}", "--instance_prompt", "x", "--train_data_dir", "{dog}"],
     "give one data source, not train_data_dir and instance_data_dir"),
    (["--instance_data_dir", "{dog}/notes.txt", "--instance_prompt", "x"],
     "instance_data_dir is not a folder: {dog}/notes.txt"),
    (["--instance_data_dir", "{dog}", "--instance_prompt", "x", "--repeats", "0"], "repeats must be >= 1, got 0"),
])
def test_incomplete_dreambooth_settings_are_one_line(flags, message, instance_dir, tiny_model_dir, tmp_path, capsys):
    flags = [f.format(dog=instance_dir) for f in flags]
    assert main(["train", "--pretrained_model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"),
                 "--device_target", "CPU", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message.format(dog=instance_dir)}"]


def test_instance_images_train_repeated_with_the_instance_prompt(instance_dir, tiny_model_dir, record_steps, tmp_path):
    config = load_config(None, dict(
        pretrained_model_name_or_path=tiny_model_dir, instance_data_dir=str(instance_dir), instance_prompt=PROMPT,
        repeats=4, validation_loss_samples=1, output_dir=str(tmp_path / "out"), resolution=32, train_batch_size=2,
        max_train_steps=3, device_target="CPU", dataloader_num_workers=1))
    trainer = Trainer(config).build()
    held_out = {r.image for r in trainer.held_out_records}
    assert len(trainer.records) == 2 * 4 and not held_out & {r.image for r in trainer.records}
    assert trainer.plan.update_steps_per_epoch == 4  # 8 samples // batch 2

    step = record_steps(trainer)
    trainer.held_out_loss = None
    assert trainer.train().global_step == 3
    prompt_ids = trainer.family.prompt_tokenizer(trainer.components)(PROMPT)
    for call in step.calls:
        assert all(np.array_equal(ids, prompt_ids) for ids in call[1])


# ----------------------------------------------------------------------------- prior preservation
def per_sample_mse(pred, target):
    return ((pred.astype(np.float64) - target) ** 2).mean(axis=(1, 2, 3))


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_the_prior_loss_is_the_instance_mean_plus_the_weighted_class_mean(snr_gamma):
    from mindone.diffusers import DDPMScheduler

    from mindscedit.losses import min_snr_weight_table, training_loss
    from mindscedit.models.presets import SD_SCHEDULER

    scheduler = DDPMScheduler(**SD_SCHEDULER)
    loss = training_loss(scheduler, "epsilon", snr_gamma, prior_split=(2, 0.7))
    rng = np.random.default_rng(3)
    latents, noise, pred = (rng.standard_normal((4, 4, 2, 2)).astype(np.float32) for _ in range(3))
    timesteps = np.array([10, 900, 300, 40], np.int32)
    value = float(loss(*(ms.Tensor(a) for a in (pred, latents, noise, timesteps))).asnumpy())

    errors = per_sample_mse(pred, noise)
    if snr_gamma:
        errors = errors * min_snr_weight_table(scheduler.alphas_cumprod.asnumpy(), snr_gamma, "epsilon")[timesteps]
    assert value == pytest.approx(errors[:2].mean() + 0.7 * errors[2:].mean(), rel=1e-5)
    assert value != pytest.approx(errors.mean(), rel=1e-3)  # not the plain mean over the batch


def test_missing_class_images_are_the_first_free_indices(tmp_path):
    from mindscedit.training.prior import CLASS_IMAGE_NAME, consecutive_runs, missing_indices

    Image.new("RGB", (8, 8)).save(tmp_path / "mine.jpg")  # a user's own class image counts
    Image.new("RGB", (8, 8)).save(tmp_path / CLASS_IMAGE_NAME.format(1))
    (tmp_path / (CLASS_IMAGE_NAME.format(0) + ".tmp")).write_bytes(b"half")  # an interrupted write does not
    assert missing_indices(str(tmp_path), 5) == [0, 2, 3]
    assert missing_indices(str(tmp_path), 2) == []
    assert consecutive_runs([0, 2, 3, 4, 5, 9], 3) == [[0], [2, 3, 4], [5], [9]]


def fill(folder, count):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(folder / f"cls{i}.png")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_each_batch_pairs_instance_and_class_samples(family, request, record_steps, instance_dir, tmp_path):
    """Prompts, randomness and (SDXL) time ids split as the batch: instance samples, then class ones."""
    tiny_model_dir = request.getfixturevalue("tiny_sdxl_model_dir" if family == "sdxl" else "tiny_model_dir")
    fill(tmp_path / "class", 3)  # all there: nothing to generate
    config = load_config(None, dict(
        pretrained_model_name_or_path=tiny_model_dir, instance_data_dir=str(instance_dir), instance_prompt=PROMPT,
        with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a photo of a dog",
        num_class_images=3, output_dir=str(tmp_path / "out"), resolution=32, train_batch_size=2, max_train_steps=3,
        device_target="CPU", dataloader_num_workers=1))
    trainer = Trainer(config).build()
    assert len(trainer.class_records) == 3
    loss = trainer.train_step.model.denoise.loss
    assert loss.split and loss.num_instance == 2 and loss.prior_loss_weight == 1.0
    step = record_steps(trainer)
    assert trainer.train().global_step == 3
    tokenize = trainer.family.prompt_tokenizer(trainer.components)
    for call in step.calls:
        pixels, ids, latent_eps, noise, timesteps = call[:5]
        assert len(pixels) == len(latent_eps) == len(noise) == len(timesteps) == 4
        assert [np.array_equal(i, tokenize(PROMPT)) for i in ids] == [True, True, False, False]
        assert all(np.array_equal(i, tokenize("a photo of a dog")) for i in ids[2:])
        if family == "sdxl":  # each sample's own size: instance images are 40x48, class images 40x40
            time_ids = call[5]
            assert [tuple(t[:2]) for t in time_ids] == [(40, 48), (40, 48), (40, 40), (40, 40)]


@pytest.mark.parametrize("flags, message", [
    (["--with_prior_preservation", "--class_prompt", "a dog"],
     "with_prior_preservation needs class_data_dir (the class images' folder)"),
    (["--with_prior_preservation", "--class_data_dir", "{dog}"],
     "with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')"),
    (["--with_prior_preservation", "--class_data_dir", "{dog}", "--class_prompt", "a dog", "--method",
      "scedit_control"],
     "with_prior_preservation is for text-to-image methods, not scedit_control (class images have no condition)"),
])
def test_incomplete_prior_preservation_settings_are_one_line(flags, message, instance_dir, tiny_model_dir, tmp_path,
                                                             capsys):
    flags = [f.format(dog=instance_dir) for f in flags]
    assert main(["train", "--pretrained_model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"),
                 "--device_target", "CPU", "--instance_data_dir", str(instance_dir), "--instance_prompt", "x",
                 *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


@pytest.mark.slow
def test_a_prior_preservation_run_generates_only_the_missing_class_images(instance_dir, tiny_model_dir, tmp_path):
    from mindscedit.training.prior import CLASS_IMAGE_NAME, generate_class_images

    class_dir = tmp_path / "class"
    fill(class_dir, 1)
    args = ["train", "--pretrained_model_name_or_path", tiny_model_dir, "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--with_prior_preservation", "--class_data_dir", str(class_dir),
            "--class_prompt", "a photo of a dog", "--num_class_images", "4", "--sample_batch_size", "2",
            "--snr_gamma", "5", "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2",
            "--method", "lora", "--output_dir", str(tmp_path / "out"), "--device_target", "CPU"]
    assert main(args) == 0
    assert sorted(os.listdir(class_dir)) == sorted(["cls0.png"] + [CLASS_IMAGE_NAME.format(i) for i in range(3)])
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    # The model card names the trigger, and its sample command runs as written.
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- instance prompt (the trigger): `{PROMPT}`" in card and 'pipe.load_lora_weights("' in card
    assert f'pipe = StableDiffusionPipeline.from_pretrained("{tiny_model_dir}")' in card
    command = card.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[0] == "mindscedit"
    out = tmp_path / "card-samples"
    argv = [a if a != "samples/" else str(out) for a in argv[1:]]
    assert main(argv + ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device_target", "CPU"]) == 0
    assert list(out.glob("*.png"))
    first = np.asarray(Image.open(class_dir / CLASS_IMAGE_NAME.format(1)))

    # Full: nothing to do. One lost (as if interrupted): only it comes back, the same image.
    generate = dict(model_path=tiny_model_dir, folder=str(class_dir), prompt="a photo of a dog", num_class_images=4,
                    batch_size=2, resolution=32, seed=0, dtype=ms.float32)
    assert generate_class_images(**generate) == 0
    os.remove(class_dir / CLASS_IMAGE_NAME.format(1))
    assert generate_class_images(**generate) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(class_dir / CLASS_IMAGE_NAME.format(1))), first)
