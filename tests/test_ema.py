"""The EMA of the trained weights (--use_ema) and the held-out loss (--validation_loss_samples).

The average is checked against a NumPy reference on a network whose gradients are its inputs
(both steps: branch-free and accumulating), through a skipped step, a swap of the averages into
the weights and a resume from a checkpoint; then in a tiny run, for every method's final weights.
"""
import dataclasses
import json

import numpy as np
import mindspore as ms
import pytest

from mindscedit.training.checkpoint import TRAINING_STATE_FILE, load_training_state, save_training_state
from mindscedit.training.ema import ema_decay_at
from mindscedit.training.optimizers import adamw
from mindscedit.training.step import build_train_step
from tests.conftest import GradientsAreInputs


@pytest.mark.parametrize("settings", [
    dict(decay=0.9999), dict(decay=0.99, update_after_step=3), dict(decay=0.999, min_decay=0.5),
    dict(decay=0.9999, use_warmup=True, power=3 / 4), dict(decay=0.9, use_warmup=True, inv_gamma=2.0, power=1.0),
])
def test_ema_decay_is_diffusers_emamodel_get_decay(settings):
    from mindone.diffusers.training_utils import EMAModel

    names = dict(use_warmup="use_ema_warmup")
    reference = EMAModel([], **{names.get(k, k): v for k, v in settings.items()})
    for step in (1, 2, 3, 4, 5, 10, 100, 10_000, 1_000_000):
        assert ema_decay_at(step, **settings) == reference.get_decay(step), step


EMA = dict(decay=0.9, update_after_step=1)  # decays 0, 0, 2/11, 3/12, ...: the average lags visibly


def make_step(accumulation):
    net = GradientsAreInputs()
    step = build_train_step(net, adamw([net.w, net.b], 0.0), "no", 1.0, accumulation, use_ema=True)
    return net, step


def weights(net):
    return [net.w.asnumpy().astype(np.float64), net.b.asnumpy().astype(np.float64)]


def averages(step):
    return [a.asnumpy() for a in step.ema.averages]


def run_step(step, net, k, accumulation, rng, skip):
    """Optimizer step k (from 1): its micro-steps, a NaN gradient in the last one if `skip`."""
    decay = ms.Tensor(ema_decay_at(k, **EMA), ms.float32)
    for micro in range(accumulation):
        grads = [rng.standard_normal(4).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)]
        if skip and micro == accumulation - 1:
            grads[1][0, 0] = np.nan
        step(*(ms.Tensor(g) for g in grads), decay, ms.Tensor(1e-2, ms.float32))


@pytest.mark.parametrize("accumulation", [1, 2])  # the branch-free step, mindone's accumulating one
def test_ema_follows_the_numpy_reference_through_a_skip_a_swap_and_a_resume(accumulation, tmp_path):
    net, step = make_step(accumulation)
    rng = np.random.default_rng(0)
    reference = weights(net)  # the average starts from the first weights
    for k in range(1, 9):
        skip = k == 4
        before = averages(step)
        run_step(step, net, k, accumulation, rng, skip)
        if skip:  # nothing moved: weights (AdamW's gate) and the average, bit for bit
            assert all(np.array_equal(a, b) for a, b in zip(averages(step), before))
        else:
            d = ema_decay_at(k, **EMA)
            reference = [r - (1 - d) * (r - w) for r, w in zip(reference, weights(net))]
        for got, want in zip(averages(step), reference):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert k > 2 or all(np.array_equal(a, w) for a, w in zip(averages(step), weights(net)))  # decay 0: a copy

        if k == 5:  # validation with the averages: swapped in, then the raw weights back, bit for bit
            raw = [p.asnumpy().copy() for p in step.parameters]
            with step.ema.swapped_in(step.parameters):
                assert all(np.array_equal(p.asnumpy(), a) for p, a in zip(step.parameters, averages(step)))
            assert all(np.array_equal(p.asnumpy(), r) for p, r in zip(step.parameters, raw))
        if k == 6:  # a checkpoint, resumed into a new step that carries on
            save_training_state(str(tmp_path), step, {"global_step": k, "micro_step": k * accumulation})
            saved = averages(step)
            net, step = make_step(accumulation)
            load_training_state(str(tmp_path), step)
            assert all(np.array_equal(a, b) for a, b in zip(averages(step), saved))


def test_a_checkpoint_without_an_ema_starts_the_average_from_its_weights(tmp_path):
    from safetensors.numpy import load_file, save_file

    net, step = make_step(1)
    run_step(step, net, 3, 1, np.random.default_rng(0), skip=False)
    save_training_state(str(tmp_path), step, {"global_step": 3, "micro_step": 3})
    state = load_file(str(tmp_path / TRAINING_STATE_FILE))
    assert {"ema/w", "ema/b"} <= set(state)
    save_file({k: v for k, v in state.items() if not k.startswith("ema/")}, str(tmp_path / TRAINING_STATE_FILE))
    _, resumed = make_step(1)
    load_training_state(str(tmp_path), resumed)
    for p, average in zip(resumed.parameters, resumed.ema.averages):
        np.testing.assert_array_equal(average.asnumpy(), p.asnumpy())
    np.testing.assert_array_equal(resumed.parameters[0].asnumpy(), state["param/w"])


def test_held_out_samples_are_seeded_apart_from_the_subset_and_leave_the_rest_in_order():
    from mindscedit.errors import UserError
    from mindscedit.training.held_out import split_held_out
    from mindscedit.training.plan import select_samples

    records = list(range(16))
    held, rest = split_held_out(records, 4, seed=0)
    assert len(held) == 4 and sorted(held + rest) == records and rest == sorted(rest)
    assert split_held_out(records, 4, seed=0) == (held, rest) and split_held_out(records, 4, seed=1)[0] != held
    assert held != select_samples(records, 4, seed=0)  # its own stream, not max_train_samples' first N
    with pytest.raises(UserError, match="validation_loss_samples 16 leaves nothing to train on: the data has 16"):
        split_held_out(records, 16, seed=0)


# ----------------------------------------------------------------------------- in the trainer
WEIGHT_FILES = {"vanilla": "unet/diffusion_pytorch_model.safetensors", "lora": "pytorch_lora_weights.safetensors",
                "scedit": "adapter_model.safetensors", "scedit_control": "csc_tuner.safetensors"}


def trainer_config(model_dir, data_dir, output_dir, **overrides):
    from mindscedit.training.config import load_config

    values = dict(pretrained_model_name_or_path=model_dir, train_data_dir=data_dir, output_dir=str(output_dir),
                  resolution=32, center_crop=True, train_batch_size=2, device_target="CPU", use_ema=True)
    values.update(overrides)
    return load_config(None, values)


def saved_values(path):
    from safetensors.numpy import load_file

    return sorted(v.tobytes() for v in load_file(str(path)).values())


@pytest.mark.parametrize("method", list(WEIGHT_FILES))
def test_final_weights_are_the_average_and_the_raw_ones_are_kept_beside_them(method, tiny_model_dir, photos_dir,
                                                                             tmp_path):
    """Every method's weight files: the averages at the top of output_dir, the trained weights in raw/ (no step runs:
    the averages are set by hand, apart from the weights)."""
    from mindscedit.training.trainer import RAW_WEIGHTS_FOLDER, Trainer

    trainer = Trainer(trainer_config(tiny_model_dir, photos_dir, tmp_path, method=method)).build()
    params = trainer.train_step.parameters
    raw = [p.asnumpy().copy() for p in params]
    for p, average in zip(params, trainer.ema.averages):
        average.set_data(ms.Tensor(p.asnumpy() + 0.25))
    trainer.save_final_weights()
    assert all(np.array_equal(p.asnumpy(), r) for p, r in zip(params, raw))  # swapped back
    top, kept = tmp_path / WEIGHT_FILES[method], tmp_path / RAW_WEIGHTS_FOLDER / WEIGHT_FILES[method]
    assert top.is_file() and kept.is_file() and not (tmp_path / ".final").exists()
    with trainer.ema.swapped_in(params):
        trainer.method.save_weights(trainer.components.unet, str(tmp_path / "averages"))
    trainer.method.save_weights(trainer.components.unet, str(tmp_path / "trained"))
    assert saved_values(top) == saved_values(tmp_path / "averages" / WEIGHT_FILES[method])
    assert saved_values(kept) == saved_values(tmp_path / "trained" / WEIGHT_FILES[method])
    assert saved_values(top) != saved_values(kept)


TEXT_SIDE = {  # the text encoders' trainable weights are averaged too: LoRA on them, pivotal tuning's embeddings
    "text_encoder_lora": (dict(method="lora", train_text_encoder=True), "pytorch_lora_weights.safetensors", "text_encoder."),
    "pivotal_tuning": (dict(method="lora", train_text_encoder_ti=True, train_data_dir=None,
                            instance_prompt="a photo of TOK cat"), "run_emb.safetensors", "clip_l"),
}


@pytest.mark.parametrize("case", list(TEXT_SIDE))
def test_the_text_sides_final_weights_are_averages_too(case, tiny_model_dir, photos_dir, tmp_path):
    import os

    from safetensors.numpy import load_file

    from mindscedit.training.trainer import RAW_WEIGHTS_FOLDER, Trainer

    overrides, file, text_key = TEXT_SIDE[case]
    cat2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindscedit", "assets", "cat2")
    if "instance_prompt" in overrides:
        overrides = dict(overrides, instance_data_dir=cat2)
    out = tmp_path / "run"
    trainer = Trainer(trainer_config(tiny_model_dir, photos_dir, out, **overrides)).build()
    params = trainer.train_step.parameters
    for p, average in zip(params, trainer.ema.averages):
        average.set_data(ms.Tensor(p.asnumpy() + 0.25))
    trainer.save_final_weights()
    top, raw = load_file(str(out / file)), load_file(str(out / RAW_WEIGHTS_FOLDER / file))
    text = [key for key in top if key.startswith(text_key)]
    assert text and set(top) == set(raw)
    for key in text:  # every text-side tensor is its average, 0.25 above the trained one
        np.testing.assert_allclose(top[key], raw[key] + 0.25, rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def ema_run(tiny_model_dir, photos_dir, tmp_path_factory):
    """SC-Tuners, 8 steps with an EMA and 4 held-out samples evaluated every 4 steps; then steps 5-8 again from
    checkpoint-4, in the same Trainer."""
    from mindscedit.training.trainer import Trainer

    out = tmp_path_factory.mktemp("ema") / "run"
    config = trainer_config(tiny_model_dir, photos_dir, out, method="scedit", learning_rate=2e-2, max_train_steps=8,
                            checkpointing_steps=4, validation_steps=4, validation_loss_samples=4, logging_steps=3,
                            ema_decay=0.9)
    trainer = Trainer(config).build()
    before = trainer.evaluate_held_out()  # the first weights' held-out loss (compiles the forward)
    result = trainer.train()
    first = dict(logs=[json.loads(line) for line in open(out / "logs.jsonl")], averages=averages(trainer.train_step),
                 weights=[p.asnumpy().copy() for p in trainer.train_step.parameters], losses=result.losses)
    trainer.config = dataclasses.replace(config, resume_from_checkpoint=str(out / "checkpoint-4"))
    resumed = trainer.train()
    return dict(trainer=trainer, out=out, config=config, before=before, first=first, resumed=resumed)


@pytest.mark.slow
def test_held_out_loss_is_logged_deterministic_and_falls(ema_run):
    trainer, first = ema_run["trainer"], ema_run["first"]
    held_out = {r.origin for r in trainer.held_out_records}
    assert len(held_out) == 4 and not held_out & {r.origin for r in trainer.records}  # never trained on
    logs = first["logs"]
    # Rows every logging_steps (3, 6), the last step, and every validation_steps with the held-out loss (4, 8).
    assert [r["step"] for r in logs] == [3, 4, 6, 8]
    assert [r["step"] for r in logs if "validation_loss" in r] == [4, 8]
    at_4, at_8 = (r["validation_loss"] for r in logs if "validation_loss" in r)
    assert at_8 < at_4 < ema_run["before"], (ema_run["before"], logs)
    # The same weights (those the resumed run ended with, which are the first run's) give the same loss, exactly.
    assert trainer.evaluate_held_out() == trainer.evaluate_held_out() == logs[-1]["validation_loss"]
    # The resumed run logs the held-out loss of its steps again, as the first run did.
    resumed_logs = [json.loads(line) for line in open(ema_run["out"] / "logs.jsonl")]
    assert [(r["step"], r.get("validation_loss")) for r in resumed_logs] == [
        (r["step"], r.get("validation_loss")) for r in logs]


@pytest.mark.slow
def test_the_average_resumes_exactly_and_validation_can_use_it(ema_run):
    trainer, first = ema_run["trainer"], ema_run["first"]
    np.testing.assert_allclose(ema_run["resumed"].losses, first["losses"][4:], rtol=1e-6)
    for got, want in zip(averages(trainer.train_step), first["averages"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    params = trainer.train_step.parameters
    assert not all(np.array_equal(a, p.asnumpy()) for a, p in zip(first["averages"], params))  # it lags
    raw_loss = trainer.evaluate_held_out()
    trainer.config = dataclasses.replace(ema_run["config"], validation_use_ema=True)
    with trainer.ema.swapped_in(params):
        expected = trainer.held_out_loss.evaluate()
    assert trainer.evaluate_held_out() == expected != raw_loss
    with trainer.validation_weights():  # what the validation images are sampled with
        assert all(np.array_equal(p.asnumpy(), a) for p, a in zip(params, averages(trainer.train_step)))
    assert all(np.array_equal(p.asnumpy(), w) for p, w in zip(params, first["weights"]))  # the raw weights back


@pytest.mark.slow
def test_held_out_loss_of_a_csc_tuner_is_deterministic(tiny_model_dir, photos_dir, tmp_path):
    """The held-out samples carry their condition image into the controlled network's forward."""
    from mindscedit.training.trainer import Trainer

    config = trainer_config(tiny_model_dir, photos_dir, tmp_path, method="scedit_control", control_type="canny",
                            use_ema=False, validation_loss_samples=2)
    trainer = Trainer(config).build()
    assert [len(inputs) for inputs in trainer.held_out_loss.inputs] == [6, 6]  # ..., timestep, condition
    first = trainer.evaluate_held_out()
    assert np.isfinite(first) and trainer.evaluate_held_out() == first


@pytest.mark.slow
def test_a_cli_run_through_the_compile_cache_keeps_the_average(tiny_model_dir, photos_dir, tmp_path):
    """A launch saves its step to the compile cache and (on CPU) reloads it: the averages must be bound to the
    reloaded graph. Checkpoints every step give the weights the reference average follows."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mindscedit.cli", "train", "--pretrained_model_name_or_path", tiny_model_dir,
           "--train_data_dir", photos_dir, "--output_dir", str(out), "--resolution", "32", "--center_crop",
           "--train_batch_size", "2", "--max_train_steps", "3", "--method", "scedit", "--learning_rate", "2e-2",
           "--checkpointing_steps", "1", "--use_ema", "--validation_loss_samples", "2", "--validation_steps", "2",
           "--device_target", "CPU", "--compile_cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved to the compile cache" in proc.stdout
    states = [load_file(str(out / f"checkpoint-{k}" / TRAINING_STATE_FILE)) for k in (1, 2, 3)]
    names = [key[len("ema/"):] for key in states[0] if key.startswith("ema/")]
    assert len(names) == 24
    for name in names:
        reference = states[0][f"param/{name}"].astype(np.float64)  # step 1's decay is 0: a copy
        for k, state in enumerate(states, 1):
            d = ema_decay_at(k)
            reference = d * reference + (1 - d) * state[f"param/{name}"]
            np.testing.assert_allclose(state[f"ema/{name}"], reference, rtol=1e-6, atol=1e-7, err_msg=name)
    averaged = load_file(str(out / "adapter_model.safetensors"))
    raw = load_file(str(out / "raw" / "adapter_model.safetensors"))
    assert saved_values(out / "adapter_model.safetensors") == sorted(
        v.tobytes() for k, v in states[-1].items() if k.startswith("ema/"))
    assert saved_values(out / "raw" / "adapter_model.safetensors") == sorted(
        v.tobytes() for k, v in states[-1].items() if k.startswith("param/"))
    assert averaged.keys() == raw.keys()
    logs = [json.loads(line) for line in open(out / "logs.jsonl")]
    assert [r["step"] for r in logs if "validation_loss" in r] == [2, 3]
