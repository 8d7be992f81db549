"""Training end to end on the tiny pipeline and the bundled photos (CPU, graph mode)."""
import json
import os
import shutil

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.config import load_config
from mindscedit.training.checkpoint import list_checkpoints
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
    losses = [float(trainer.train_step(pixels, ids, *randomness)[1].asnumpy()) for _ in range(30)]
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

    # A run that stopped after step 3 (only checkpoint-3 exists) resumes and continues.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full_dir / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = Trainer(
        make_config(tiny_model_dir, photos_dir, resumed_dir, resume_from_checkpoint="latest", **common)
    ).train()
    assert resumed.global_step == 6 and len(resumed.losses) == 3
    np.testing.assert_allclose(resumed.losses, result.losses[3:], rtol=1e-5)

    expected = load_file(str(full_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed_dir / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7)
