"""diffusers' loop options: steps from epochs, a sample subset, a scaled learning rate; TensorBoard
events and loss.png. The arithmetic and the writers are tested alone; two cards on a stand-in step, and
one tiny run resumed from its checkpoint, check them in the trainer."""
import dataclasses
import json
import logging
import os
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest

from mindscedit.cli import main
from mindscedit.data.dataset import ResumableShardedSampler
from mindscedit.errors import UserError
from mindscedit.runtime import Runtime
from mindscedit.sampling.images import save_images
from mindscedit.training import reporting
from mindscedit.training.config import DEFAULT_MAX_TRAIN_STEPS, load_config
from mindscedit.training.plan import (
    batches_per_epoch,
    plan_run,
    resolve_max_train_steps,
    scaled_learning_rate,
    select_samples,
    update_steps_per_epoch,
)
from mindscedit.training.trainer import Trainer


def needs(*modules):
    """Skip where an optional dependency is missing (`pip install -e .[test]` has them all)."""
    for name in modules:
        pytest.importorskip(name)


def read_events(folder):
    needs("tensorboard")  # the reader only; the writer is tensorboardX
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


# ----------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("num_samples, batch, accum, world, batches, steps", [
    (16, 2, 1, 1, 8, 8),
    (16, 2, 3, 1, 8, 3),  # ceil(8 / 3): the last, partial accumulation window is a step, as in diffusers
    (16, 2, 1, 2, 4, 4),  # msrun, 2 cards: each card sees 16 // (2 x 2) batches per epoch
    (16, 2, 3, 2, 4, 2),  # 2 cards and accumulation: ceil(4 / 3)
    (15, 2, 1, 2, 3, 3),  # whole global batches only: the 3 samples left over wait for the next epoch
    (6, 2, 2, 1, 3, 2),
])
def test_steps_per_epoch_follow_diffusers_and_the_sampler(num_samples, batch, accum, world, batches, steps):
    assert batches_per_epoch(num_samples, batch, world) == batches
    assert update_steps_per_epoch(num_samples, batch, accum, world) == steps
    for shard in range(world):  # what each card's sampler actually cuts an epoch into
        assert ResumableShardedSampler(num_samples, batch, world, shard).steps_per_epoch == batches


def test_max_train_steps_wins_then_epochs_then_the_default():
    assert resolve_max_train_steps(7, 3, 4) == 7
    assert resolve_max_train_steps(None, 3, 4) == 12
    assert resolve_max_train_steps(None, None, 4) == DEFAULT_MAX_TRAIN_STEPS == 1000


def test_scaled_learning_rate_counts_every_image_of_an_optimizer_step():
    assert scaled_learning_rate(1e-4, 1) == 1e-4
    assert scaled_learning_rate(1e-4, 2, 3) == pytest.approx(6e-4)
    assert scaled_learning_rate(1e-4, 2, 3, 2) == pytest.approx(1.2e-3)  # msrun with 2 cards


def test_sample_subset_is_seeded_and_a_prefix_of_one_shuffle():
    records = list(range(16))
    four = select_samples(records, 4, seed=0)
    assert len(four) == 4 and len(set(four)) == 4 and set(four) <= set(records)
    assert select_samples(records, 4, seed=0) == four  # every card picks the same subset
    assert select_samples(records, 8, seed=0)[:4] == four  # diffusers: shuffle(seed).select(range(N))
    assert select_samples(records, 4, seed=1) != four
    assert select_samples(records, None, 0) == records == select_samples(records, 99, 0)


def plan_config(**values):
    base = dict(train_batch_size=2, gradient_accumulation_steps=1, max_train_steps=None, num_train_epochs=None,
                learning_rate=1e-4, scale_lr=False)
    return SimpleNamespace(**{**base, **values})


def test_the_plan_says_how_steps_and_rate_came_about():
    plan = plan_run(plan_config(num_train_epochs=3, gradient_accumulation_steps=3, scale_lr=True), 16, world_size=2)
    assert (plan.max_train_steps, plan.update_steps_per_epoch) == (6, 2)
    assert plan.learning_rate == pytest.approx(1.2e-3)
    text = "\n".join(plan.messages)
    assert "4 batches of 2 per card per epoch x 2 cards, 2 optimizer steps per epoch" in text
    assert "num_train_epochs 3 x 2 steps per epoch: max_train_steps 6 (3.00 epochs)" in text
    assert "scale_lr: learning rate 0.0001 x batch 2 x accumulation 3 x cards 2 = 0.0012" in text

    both = plan_run(plan_config(max_train_steps=5, num_train_epochs=3), 16)
    assert both.max_train_steps == 5 and "max_train_steps 5 given: it wins over num_train_epochs 3" in both.messages[-1]
    assert plan_run(plan_config(), 16).max_train_steps == 1000
    with pytest.raises(UserError, match="fewer than one global batch"):
        plan_run(plan_config(train_batch_size=4), 7, world_size=2)


@pytest.mark.parametrize("flag", ["num_train_epochs", "max_train_samples", "max_train_steps"])
def test_counts_below_one_are_refused(flag, tmp_path):
    with pytest.raises(UserError, match=f"{flag} must be >= 1, got 0"):
        load_config(None, dict(pretrained_model_name_or_path="m", train_data_dir="d", **{flag: "0"}))


def test_flags_parse_and_a_config_with_max_train_steps_is_unchanged(tmp_path):
    config = load_config(None, dict(pretrained_model_name_or_path="m", train_data_dir="d", num_train_epochs="2",
                                    max_train_samples="8", scale_lr="true", report_to="tensorboard"))
    assert (config.max_train_steps, config.num_train_epochs, config.max_train_samples) == (None, 2, 8)
    assert config.scale_lr and config.tensorboard_dir == os.path.join("outputs/run", "logs")
    shipped = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_scedit.yaml"),
                          dict(pretrained_model_name_or_path="m", train_data_dir="d", logging_dir=str(tmp_path)))
    assert shipped.max_train_steps == 40 and shipped.tensorboard_dir == str(tmp_path)
    with pytest.raises(UserError, match="report_to: 'wandb' is not one of none, tensorboard"):
        load_config(None, dict(pretrained_model_name_or_path="m", train_data_dir="d", report_to="wandb"))


# ----------------------------------------------------------------------------- TensorBoard
def row(step, loss):
    return {"step": step, "loss": loss, "lr": 1e-4, "s_per_step": 0.5, "img_per_s": 4.0, "skipped": False,
            "skipped_steps": 0, "loss_scale": 1.0}


def test_tensorboard_events_read_back_and_a_resume_does_not_repeat_steps(tmp_path):
    needs("tensorboardX")
    first = reporting.TensorBoardReporter(str(tmp_path), global_step=0)
    for step in range(1, 5):
        first.scalars(row(step, 1.0))
    first.close()  # the run stopped after step 4; its last checkpoint is step 2
    resumed = reporting.TensorBoardReporter(str(tmp_path), global_step=2)
    for step in range(3, 6):
        resumed.scalars(row(step, 2.0))
    resumed.close()

    events = read_events(tmp_path)
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/s_per_step", "train/img_per_s",
                                             "train/loss_scale", "train/skipped_steps"}
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]  # steps 3 and 4 once, from the resumed run
    assert [e.value for e in loss] == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_validation_images_go_to_tensorboard(tmp_path):
    from PIL import Image

    needs("tensorboardX")

    folder = tmp_path / "validation" / "step_2"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "000-a-cat-seed0.png")
    Image.new("RGB", (16, 6)).save(folder / "000-a-cat-grid.png")
    writer = reporting.TensorBoardReporter(str(tmp_path / "logs"))
    writer.images(str(folder), 2)
    writer.close()
    events = read_events(tmp_path / "logs")
    assert events.Tags()["images"] == ["validation/000-a-cat-seed0"]
    (image,) = events.Images("validation/000-a-cat-seed0")
    assert (image.step, image.width, image.height) == (2, 8, 6)


def test_report_to_tensorboard_without_tensorboardx_fails_before_loading(tmp_path, monkeypatch):
    real = reporting.has_module
    monkeypatch.setattr(reporting, "has_module", lambda name: name != "tensorboardX" and real(name))
    config = load_config(None, dict(pretrained_model_name_or_path=str(tmp_path / "none"), train_data_dir="d",
                                    output_dir=str(tmp_path / "run"), device_target="CPU", report_to="tensorboard"))
    with pytest.raises(UserError, match=r"^report_to tensorboard needs tensorboardX: pip install tensorboardX"):
        Trainer(config)


# ----------------------------------------------------------------------------- loss.png
def write_log(folder, rows, method="lora", model="/models/sd-v1-5"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train_config.json").write_text(json.dumps({"method": method, "pretrained_model_name_or_path": model}))


def logged_rows():
    """200 steps of a falling loss, step 51 skipped (NaN), a validation loss every 50 steps."""
    rng = np.random.default_rng(0)
    rows = [row(s, float(0.3 / s ** 0.3 + 0.05 * rng.random())) for s in range(1, 201)]
    rows[50]["loss"] = float("nan")
    for r in rows[::50]:
        r["validation_loss"] = r["loss"] + 0.01 if np.isfinite(r["loss"]) else 0.2
    return rows


def test_loss_png_curves_come_from_the_log_rows():
    rows = logged_rows()
    curves = reporting.log_curves(rows[::-1])  # in step order whatever the file's order
    assert list(curves["loss"][0]) == list(range(1, 201)) and np.isnan(curves["loss"][1][50])
    assert np.isfinite(curves["loss (smoothed)"][1]).all()  # the skipped step is passed over
    assert list(curves["validation loss"][0]) == [1, 51, 101, 151] and curves["validation loss"][1][1] == 0.2
    assert list(curves["learning rate"][1]) == [1e-4] * 200
    no_validation = reporting.log_curves([row(1, 0.5), row(2, 0.4)])["validation loss"]
    assert [len(a) for a in no_validation] == [0, 0]


def test_plot_logs_writes_the_curve(tmp_path, capsys):
    from PIL import Image

    needs("matplotlib")
    write_log(tmp_path / "run", logged_rows())
    assert main(["plot-logs", str(tmp_path / "run")]) == 0
    assert "loss curve written to" in capsys.readouterr().out
    with Image.open(tmp_path / "run" / "loss.png") as image:
        assert image.size == (800, 600)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # curves, not a blank canvas
    assert reporting._run_title(str(tmp_path / "run")) == "lora on sd-v1-5: run"

    assert main(["plot-logs", str(tmp_path / "run"), "--output", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").is_file()


def test_smoothing_passes_over_skipped_steps():
    smoothed = reporting.smooth([1.0, float("nan"), 3.0], 0.5)
    assert smoothed[0] == 1.0 and smoothed[1] == 1.0 and 1.0 < smoothed[2] < 3.0
    assert reporting.smoothing_weight(5) == 0.0 and reporting.smoothing_weight(10_000) == 0.99


def test_plot_logs_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert main(["plot-logs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no logs.jsonl in {tmp_path}: is it a training output_dir?"
    write_log(tmp_path, [row(1, 0.1)])
    real = reporting.has_module
    monkeypatch.setattr(reporting, "has_module", lambda name: name != "matplotlib" and real(name))
    assert main(["plot-logs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {reporting.NEEDS_MATPLOTLIB}"
    assert reporting.plot_after_training(str(tmp_path)) is None  # end of training: an info line, no failure
    assert not (tmp_path / "loss.png").exists()


# ----------------------------------------------------------------------------- two cards, no launcher
class RecordingStep:
    """Stands in for the jitted step: keeps the images it is fed, returns a finite loss."""

    def __init__(self):
        self.images = []
        self.grad_scaler = SimpleNamespace(all_finite=ms.Tensor(True))

    def __call__(self, pixel_values, *inputs):
        self.images.extend(image.tobytes() for image in pixel_values.asnumpy())
        return None, ms.Tensor(0.5, ms.float32)


def test_two_cards_share_one_subset_and_split_its_epochs(tiny_model_dir, photos_dir, tmp_path):
    """Rank 0 and rank 1 of 2 cards, built side by side as msrun starts them, each on a stand-in step."""
    config = load_config(None, dict(
        pretrained_model_name_or_path=tiny_model_dir, train_data_dir=photos_dir, resolution=32, center_crop=True,
        train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2, max_train_samples=8, scale_lr=True,
        learning_rate=1e-4, device_target="CPU", method="scedit",
    ))
    ranks = []
    for rank in (0, 1):
        trainer = Trainer(dataclasses.replace(config, output_dir=str(tmp_path / f"rank{rank}")),
                          runtime=Runtime("CPU", rank=rank, world_size=2)).build()
        trainer.train_step = RecordingStep()
        trainer.save_checkpoint = lambda *args: None  # the stand-in has no optimizer state to save
        trainer.save_final_weights = lambda: None
        ranks.append((trainer, trainer.train()))
    # 8 samples // (2 per card x 2 cards) = 2 batches per card per epoch, ceil(2 / 2 accumulated) = 1 step per
    # epoch: 2 epochs are 2 steps of 2 micro-steps on each card.
    assert [(t.max_train_steps, result.global_step) for t, result in ranks] == [(2, 2), (2, 2)]
    assert [t.lrs[0] for t, _ in ranks] == pytest.approx([8e-4, 8e-4])  # 1e-4 x batch 2 x accumulation 2 x 2 cards
    subsets = [[r.origin for r in t.records] for t, _ in ranks]
    assert subsets[0] == subsets[1] and len(subsets[0]) == 8  # chosen before the split: the same 8 on both cards
    fed = [image for t, _ in ranks for image in t.train_step.images]
    assert len(fed) == 16 and sorted(fed.count(image) for image in set(fed)) == [2] * 8  # each of the 8, per epoch


# ----------------------------------------------------------------------------- one tiny run, resumed
class CapturingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def stand_in_validator(output_dir):
    """Writes what a Validator writes at a step (an image and the grid of one prompt), without sampling."""
    from PIL import Image

    def validate(global_step):
        image = Image.new("RGB", (8, 8), (0, 128, 255))
        image.info.update(prompt="a cat", seed="0")
        folder = os.path.join(output_dir, "validation", f"step_{global_step}")
        save_images([image], folder)
        return folder

    return validate


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, photos_dir, tmp_path_factory):
    """6 steps from 2 epochs of a 6-sample subset; then steps 5 and 6 again from checkpoint-4, as after a
    crash, with a stand-in validator at step 6.

    No gradient accumulation here: a Trainer that has run mindone's accumulating step does not take a
    checkpoint's optimizer step count into that compiled step again (a new process, as every CLI run
    is, does; test_training resumes that way)."""
    needs("tensorboardX", "tensorboard", "matplotlib")
    out = tmp_path_factory.mktemp("parity") / "run"
    config = load_config(None, dict(
        pretrained_model_name_or_path=tiny_model_dir, train_data_dir=photos_dir, output_dir=str(out),
        resolution=32, center_crop=True, train_batch_size=2, checkpointing_steps=4,
        device_target="CPU", method="scedit", learning_rate=1e-3,
        num_train_epochs=2, max_train_samples=6, scale_lr=True, report_to="tensorboard",
    ))
    handler = CapturingHandler()
    logger = logging.getLogger("mindscedit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        trainer = Trainer(config)
        result = trainer.train()
        first = SimpleNamespace(result=result, logs=read_jsonl(out / "logs.jsonl"), events=read_events(out / "logs"),
                                plotted=(out / "loss.png").is_file(), log="\n".join(handler.lines))
        handler.lines = []
        trainer.config = dataclasses.replace(config, resume_from_checkpoint=str(out / "checkpoint-4"),
                                             validation_prompt=["a cat"], validation_steps=3)
        trainer.validator = stand_in_validator(str(out))
        resumed = trainer.train()
    finally:
        logger.removeHandler(handler)
    return SimpleNamespace(out=out, trainer=trainer, config=config, first=first, resumed=resumed,
                           log="\n".join(handler.lines))


@pytest.mark.slow
def test_a_run_from_epochs_on_a_subset_with_a_scaled_rate(tiny_run, photos_dir):
    from mindscedit.data import load_records

    first = tiny_run.first
    # 6 samples chosen with the seed: 3 batches of 2 per epoch, 3 optimizer steps, x 2 epochs.
    assert [r.origin for r in tiny_run.trainer.records] == [
        r.origin for r in select_samples(load_records(photos_dir), 6, tiny_run.config.seed)]
    assert "max_train_samples 6: training on 6 samples" in first.log
    assert "num_train_epochs 2 x 3 steps per epoch: max_train_steps 6 (2.00 epochs)" in first.log
    assert "scale_lr: learning rate 0.001 x batch 2 x accumulation 1 x cards 1 = 0.002" in first.log
    assert first.result.global_step == 6
    assert [r["step"] for r in first.logs] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] == pytest.approx(2e-3) and r["loss_scale"] == 1.0 for r in first.logs)

    events = first.events
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in first.logs])
    assert events.Scalars("train/lr")[-1].value == pytest.approx(2e-3)
    assert "train/loss_scale" in events.Tags()["scalars"] and "train/img_per_s" in events.Tags()["scalars"]

    assert first.plotted and f"loss curve in {tiny_run.out / 'loss.png'}" in first.log
    from PIL import Image

    with Image.open(tiny_run.out / "loss.png") as image:  # drawn from this real run's logs.jsonl
        assert image.size == (800, 600)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once_and_sends_validation_images(tiny_run):
    assert f"resumed from {tiny_run.out / 'checkpoint-4'} at step 4" in tiny_run.log
    assert tiny_run.resumed.global_step == 6
    logs = read_jsonl(tiny_run.out / "logs.jsonl")
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6] and logs[:4] == tiny_run.first.logs[:4]

    events = read_events(tiny_run.out / "logs")
    assert len(list((tiny_run.out / "logs").glob("events.out.tfevents.*"))) == 2  # the resume added a file
    for tag in ("train/loss", "train/lr", "train/s_per_step"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag  # 5 and 6 once, not twice
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in logs])
    assert events.Tags()["images"] == ["validation/000-a-cat-seed0"]  # the grid is left out
    assert [image.step for image in events.Images("validation/000-a-cat-seed0")] == [6]
