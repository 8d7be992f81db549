"""Training end to end on the tiny pipeline and the bundled photos (CPU, graph mode)."""
import json
import os
import shutil

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.training.config import load_config
from mindscedit.errors import UserError
from mindscedit.training.checkpoint import list_checkpoints, load_training_state
from mindscedit.training.trainer import Trainer

LEARNING_RATES = {"vanilla": 3e-4, "lora": 5e-3, "scedit": 5e-3}


def make_config(model_dir, data_dir, output_dir, **overrides):
    values = dict(
        pretrained_model_name_or_path=model_dir,
        train_data_dir=data_dir,
        output_dir=str(output_dir),
        resolution=32,
        center_crop=True,
        train_batch_size=2,
        max_train_steps=30,
        checkpointing_steps=1000,
        device_target="CPU",
    )
    values.update(overrides)
    return load_config(None, values)


def snapshot(cells):
    """{(cell index, path in the cell): value} of every weight."""
    return {(i, name): p.asnumpy().copy() for i, cell in enumerate(cells) for name, p in cell.parameters_and_names()}


@pytest.mark.parametrize("method", ["scedit", "lora", "vanilla"])
@pytest.mark.slow
def test_loss_falls_and_only_trainable_weights_change(method, tiny_model_dir, photos_dir, tmp_path):
    config = make_config(tiny_model_dir, photos_dir, tmp_path, method=method, learning_rate=LEARNING_RATES[method])
    trainer = Trainer(config).build()
    comps = trainer.components
    cells = (comps.unet, comps.vae, comps.text_encoder)
    before = snapshot(cells)
    trainable_ids = {id(p) for p in trainer.trainable}
    trainable = {name for name, p in comps.unet.parameters_and_names() if id(p) in trainable_ids}

    # One fixed batch and fixed noise: the loss must fall as the method fits it.
    rng = np.random.default_rng(0)
    pixels = ms.Tensor(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    ids = ms.Tensor(np.array([comps.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids] * 2, np.int32))
    randomness = trainer.draw_randomness(0, 2)
    lr = ms.Tensor(LEARNING_RATES[method], ms.float32)
    losses = [float(trainer.train_step(pixels, ids, *randomness, lr)[1].asnumpy()) for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses

    after = snapshot(cells)
    changed = {key for key in before if not np.array_equal(before[key], after[key])}
    assert changed and {cell for cell, _ in changed} == {0}  # VAE and text encoder bitwise unchanged
    assert {name for _, name in changed} <= trainable  # so is every frozen UNet weight

    # The saved weights are the trained ones, under the method's file layout.
    trainer.method.save_weights(comps.unet, str(tmp_path / "weights"))
    if method == "scedit":
        from mindscedit.tuners.sc_tuner import sc_tuner_named_parameters

        saved = load_file(str(tmp_path / "weights" / "adapter_model.safetensors"))
        assert len(saved) == len(trainable) == 24 and "up_blocks.1.resnets.2.scetuner_default.tuner_op.ln2.bias" in saved
        for key, p in sc_tuner_named_parameters(comps.unet).items():
            np.testing.assert_array_equal(saved[key], p.asnumpy())
        assert json.load(open(tmp_path / "weights" / "adapter_config.json"))["swift_type"] == "SCETuning"
    elif method == "lora":
        saved = load_file(str(tmp_path / "weights" / "pytorch_lora_weights.safetensors"))
        assert len(saved) == len(trainable)
        assert all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in saved)
    else:
        from mindone.diffusers import UNet2DConditionModel

        reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "weights" / "unet"))
        trained = {name: p.asnumpy() for name, p in comps.unet.parameters_and_names()}
        reloaded_weights = dict(reloaded.parameters_and_names())
        assert set(reloaded_weights) == set(trained)
        for name, p in reloaded_weights.items():
            np.testing.assert_array_equal(p.asnumpy(), trained[name])


@pytest.mark.smoke
@pytest.mark.slow
def test_resumed_run_reaches_the_same_weights(tiny_model_dir, photos_dir, tmp_path):
    common = dict(
        method="scedit",
        learning_rate=1e-3,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        max_train_steps=6,
        gradient_accumulation_steps=2,
        random_flip=True,
        checkpointing_steps=3,
    )
    full_dir = tmp_path / "full"
    result = Trainer(make_config(tiny_model_dir, photos_dir, full_dir, **common)).train()
    assert result.global_step == 6 and len(result.losses) == 6
    assert [os.path.basename(p) for p in list_checkpoints(str(full_dir))] == ["checkpoint-3", "checkpoint-6"]
    logs = [json.loads(line) for line in open(full_dir / "logs.jsonl")]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6] and all(r["s_per_step"] > 0 for r in logs)

    # The training state as the optimizer declares it; these are the keys checkpoints always had.
    state = load_file(str(full_dir / "checkpoint-3" / "training_state.safetensors"))
    assert {key.split("/")[0] for key in state} == {"param", "adam_m", "adam_v", "optimizer", "loss_scaler"}
    assert {"optimizer/global_step", "loss_scaler/scale_value", "loss_scaler/counter"} <= set(state)
    assert json.loads((full_dir / "checkpoint-3" / "state.json").read_text())["optimizer"] == "adamw"

    # A run that stopped after step 3 (only checkpoint-3 exists) resumes and continues, from a
    # checkpoint as written before the optimizer was a setting (no "optimizer" in state.json).
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full_dir / "checkpoint-3", resumed_dir / "checkpoint-3")
    old_state = json.loads((resumed_dir / "checkpoint-3" / "state.json").read_text())
    del old_state["optimizer"]
    (resumed_dir / "checkpoint-3" / "state.json").write_text(json.dumps(old_state))
    trainer = Trainer(make_config(tiny_model_dir, photos_dir, resumed_dir, resume_from_checkpoint="latest", **common))
    resumed = trainer.train()
    assert resumed.global_step == 6 and len(resumed.losses) == 3
    np.testing.assert_allclose(resumed.losses, result.losses[3:], rtol=1e-5)
    # Another optimizer's state is refused whole, naming both.
    other = tmp_path / "other"
    shutil.copytree(full_dir / "checkpoint-3", other)
    (other / "state.json").write_text(json.dumps(dict(old_state, optimizer="prodigy")))
    with pytest.raises(UserError, match=r"holds 'prodigy' optimizer state; this run uses 'adamw' "
                                        r"\(resume with --optimizer prodigy\)"):
        load_training_state(str(other), trainer.train_step, "scedit", "adamw")

    expected = load_file(str(full_dir / "adapter_model.safetensors"))
    # The accumulating step set the scheduled rates (a warm-up from 0): the zero-initialised ln2 moved.
    assert any(np.abs(value).max() > 0 for key, value in expected.items() if "ln2.weight" in key)
    got = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7)


def torch_adamw_step(weights, avg, avg_sq, grads, lr, step, betas, eps, decay):
    """torch.optim.AdamW's update number `step` of every weight, in float64, in place."""
    beta1, beta2 = betas
    for i, g in enumerate(grads):
        avg[i] = beta1 * avg[i] + (1 - beta1) * g
        avg_sq[i] = beta2 * avg_sq[i] + (1 - beta2) * g * g
        weights[i] = weights[i] * (1 - lr * decay) - lr / (1 - beta1 ** step) * avg[i] / (
            np.sqrt(avg_sq[i] / (1 - beta2 ** step)) + eps)


def test_gated_adamw_matches_torch_adamw_and_a_gated_off_step_changes_nothing():
    from mindscedit.training.optimizers import adamw as make_optimizer

    rng = np.random.default_rng(0)
    start = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((5,)).astype(np.float32)]
    params = [ms.Parameter(ms.Tensor(w), name=f"w{i}") for i, w in enumerate(start)]
    lrs, (beta1, beta2), eps, decay = [1e-2, 5e-3, 2e-3, 1e-3], (0.9, 0.999), 1e-8, 1e-2
    optimizer = make_optimizer(params, lrs[0], beta1, beta2, eps, decay)
    weights, avg, avg_sq = [w.astype(np.float64) for w in start], [0.0, 0.0], [0.0, 0.0]
    applied = 0
    for apply in (True, True, False, True):
        grads = [rng.standard_normal(w.shape).astype(np.float32) for w in start]
        if not apply:
            grads[0][0, 0] = np.nan  # what a skipped step looks like
        before = [p.asnumpy().copy() for p in params] + [m.asnumpy().copy() for m in optimizer.exp_avg]
        before += [v.asnumpy().copy() for v in optimizer.exp_avg_sq]
        optimizer.learning_rate.set_data(ms.Tensor(lrs[applied], ms.float32))  # as the step sets it
        optimizer(tuple(ms.Tensor(g) for g in grads), ms.Tensor(apply))
        if not apply:
            after = [p.asnumpy() for p in params] + [m.asnumpy() for m in optimizer.exp_avg]
            after += [v.asnumpy() for v in optimizer.exp_avg_sq]
            assert all(np.array_equal(a, b) for a, b in zip(before, after))
            assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == applied
            continue
        lr, applied = lrs[applied], applied + 1
        torch_adamw_step(weights, avg, avg_sq, grads, lr, applied, (beta1, beta2), eps, decay)
        for p, w in zip(params, weights):
            np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixed_precision, overflow_check", [
    ("no", "norm"), ("fp16", "norm"),  # fp16: gradients arrive loss-scaled by 2^16
    ("fp16", "status"),  # MindSpore's all_finite, the check used on Ascend
])
def test_branch_free_step_unscales_clips_and_skips_like_the_reference(mixed_precision, overflow_check,
                                                                     gradients_are_inputs):
    from mindscedit.training.optimizers import adamw as make_optimizer
    from mindscedit.training.step import BranchFreeTrainStep, build_train_step

    net = gradients_are_inputs
    lr, (beta1, beta2), eps, decay, max_norm = 1e-2, (0.9, 0.999), 1e-8, 1e-2, 1.0
    optimizer = make_optimizer([net.w, net.b], 0.0, beta1, beta2, eps, decay)  # the step sets the rate
    step = build_train_step(net, optimizer, mixed_precision, max_norm, 1, overflow_check=overflow_check)
    assert isinstance(step, BranchFreeTrainStep) and step.overflow_check == overflow_check
    # Every parameter the step reads or writes is in its cell tree, which is all that a graph
    # loaded from the compile cache binds.
    registered = {id(p) for _, p in step.parameters_and_names()}
    scaler = step.grad_scaler.loss_scaler
    assert {id(scaler.scale_value), id(step.grad_scaler.all_finite), id(optimizer.global_step)} <= registered
    assert mixed_precision != "fp16" or id(scaler.counter) in registered
    rng = np.random.default_rng(0)
    weights, avg, avg_sq, applied, skipped = [np.zeros(4), np.ones((2, 3))], [0.0, 0.0], [0.0, 0.0], 0, 0
    for scale in (10.0, 0.1, None, 3.0):  # global norm above, below the clip; a NaN step; above
        grads = [rng.standard_normal(4), rng.standard_normal((2, 3))]
        if scale is None:
            grads[1][0, 0] = np.nan
        else:
            norm = np.sqrt(sum((g ** 2).sum() for g in grads))
            grads = [g * scale / norm for g in grads]
        step(*(ms.Tensor(g.astype(np.float32)) for g in grads), ms.Tensor(lr, ms.float32))
        assert bool(step.grad_scaler.all_finite.asnumpy()) == (scale is not None)
        # The skip counters the loop reads every logging_steps: in all, and in a row.
        assert int(step.nonfinite_run.asnumpy()) == (scale is None)
        skipped += scale is None
        assert int(step.skipped_steps.asnumpy()) == skipped
        # fp16: the dynamic loss scale halves on the skipped step (no growth within its 2000-step window).
        expected_scale = 2.0 ** 16 / 2 ** skipped if mixed_precision == "fp16" else 1.0
        assert float(scaler.scale_value.asnumpy().reshape(())) == expected_scale
        if scale is not None:  # AdamW on clip_by_global_norm's gradients
            applied += 1
            clipped = [g * max_norm / max(scale, max_norm) for g in grads]
            torch_adamw_step(weights, avg, avg_sq, clipped, lr, applied, (beta1, beta2), eps, decay)
        for p, w in zip((net.w, net.b), weights):
            np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_resumed_with_more_steps_loads_the_compiled_step_and_trains_identically(
        tiny_model_dir, photos_dir, tmp_path):
    import subprocess
    import sys

    def run(name, *flags):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "mindscedit.cli", "train", "--pretrained_model_name_or_path", tiny_model_dir,
               "--train_data_dir", photos_dir, "--output_dir", str(out), "--resolution", "32",
               "--train_batch_size", "2", "--max_train_steps", "3", "--method", "scedit", "--learning_rate", "1e-3",
               "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",  # a rate that changes
               "--device_target", "CPU", "--compile_cache_dir", str(tmp_path / "cache"), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses = [json.loads(line)["loss"] for line in open(out / "logs.jsonl")]
        return proc.stdout, losses, load_file(str(out / "adapter_model.safetensors"))

    # The first launch compiles, saves and (on CPU) reloads its step; resumed with more steps it
    # loads that step (the learning rate is a step input, so the run's length is not in the
    # graph); a launch without the cache keeps the step it compiled. All train the same.
    first_out, first_losses, _ = run("first")
    resumed_out, resumed_losses, resumed_weights = run("first", "--max_train_steps", "5",
                                                       "--resume_from_checkpoint", "latest")
    assert "saved to the compile cache" in first_out and "from the compile cache" in resumed_out
    (entry,) = os.listdir(tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache" / entry / "rank_0" / "graph_cache")) == [
        "compile_cache_0.mindir", "compile_dependency.hash"]  # the reload's copy is gone
    uncached_out, uncached_losses, uncached_weights = run("uncached", "--compile_cache_dir", "",
                                                          "--max_train_steps", "5")
    assert "compile cache" not in uncached_out
    assert len(first_losses) == 3 and len(resumed_losses) == len(uncached_losses) == 5
    np.testing.assert_allclose(first_losses, uncached_losses[:3], rtol=1e-5)
    np.testing.assert_allclose(resumed_losses, uncached_losses, rtol=1e-5)
    assert resumed_weights.keys() == uncached_weights.keys()
    for name, value in uncached_weights.items():
        np.testing.assert_allclose(resumed_weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


class DeferredReadStep:
    """Stands in for the jitted step: counts its calls and records, for every loss it returned,
    how many steps had been queued when the loop read that loss back to the host."""

    def __init__(self):
        self.calls = 0
        self.read_at = {}  # step number -> calls made when its loss was read
        self.skipped_steps = ms.Parameter(ms.Tensor(0, ms.int32), name="skipped_steps", requires_grad=False)
        self.nonfinite_run = ms.Parameter(ms.Tensor(0, ms.int32), name="nonfinite_run", requires_grad=False)

    def __call__(self, *inputs):
        self.calls += 1
        step, owner = self.calls, self

        class Loss:  # a device tensor whose read the test can see
            def asnumpy(self):
                owner.read_at.setdefault(step, owner.calls)
                return np.float32(0.5)

        return None, Loss()


def test_the_loop_reads_the_device_only_every_logging_steps(tiny_model_dir, photos_dir, tmp_path):
    config = make_config(tiny_model_dir, photos_dir, tmp_path, max_train_steps=8, logging_steps=4)
    trainer = Trainer(config).build()
    trainer.train_step = DeferredReadStep()
    trainer.save_checkpoint = lambda *args: None  # the stand-in has no optimizer state
    trainer.save_final_weights = lambda: None
    result = trainer.train()
    # Step 1 is read at once (it times the compile); then steps 2-4 at step 4, 5-8 at step 8.
    assert trainer.train_step.read_at == {1: 1, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
    assert result.losses == [0.5] * 8
    logs = [json.loads(line) for line in open(tmp_path / "logs.jsonl")]
    assert [r["step"] for r in logs] == [4, 8] and all(r["skipped_steps"] == 0 for r in logs)
