"""SDXL training on the tiny SDXL pipeline: every method trains through the added conditions
(pooled prompt and time ids), touches only its own weights and writes them; a run validates and
resumes exactly. Loading SDXL LoRA / SC-Tuner / CSC-Tuner files into the sampler is
test_sdxl.py's; fp16 SDXL runs are test_precision.py's (the shipped sdxl_* configs); two-card
runs test_distributed.py's."""
import dataclasses
import json
import os
import shutil

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.models.family import SDXL
from mindscedit.training.checkpoint import load_training_state
from mindscedit.training.config import load_config
from mindscedit.training.trainer import Trainer

LEARNING_RATES = {"vanilla": 3e-4, "lora": 5e-3, "scedit": 5e-3, "scedit_control": 5e-3}
WEIGHTS = {"vanilla": "unet", "lora": "pytorch_lora_weights.safetensors", "scedit": "adapter_model.safetensors",
           "scedit_control": "csc_tuner.safetensors"}


def make_config(model_dir, data_dir, output_dir, **overrides):
    values = dict(pretrained_model_name_or_path=model_dir, train_data_dir=data_dir, output_dir=str(output_dir),
                  resolution=32, center_crop=False, random_flip=True, train_batch_size=2, max_train_steps=30,
                  checkpointing_steps=1000, device_target="CPU", compile_cache_dir="")
    values.update(overrides)
    return load_config(None, values)


def snapshot(cells):
    return {(i, name): p.asnumpy().copy() for i, cell in enumerate(cells) for name, p in cell.parameters_and_names()}


def fixed_inputs(trainer, time_ids):
    """One batch of two samples with fixed pixels, prompt, noise and the given time ids [2, 6]."""
    rng = np.random.default_rng(0)
    pixels = ms.Tensor(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    ids = trainer.family.prompt_tokenizer(trainer.components)("a photo of a cat")
    inputs = (pixels, ms.Tensor(np.stack([ids, ids])), *trainer.draw_randomness(0, 2), ms.Tensor(time_ids))
    if trainer.method.takes_condition:
        inputs += (ms.Tensor(rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32)),)
    return inputs


# DoRA on the attention and feed-forward layers; the others with their defaults.
OPTIONS = {"dora": dict(method="lora", use_dora=True,
                        lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"])}


@pytest.mark.parametrize("method", ["scedit", "lora", "vanilla", "scedit_control", "dora"])
@pytest.mark.slow
def test_each_method_trains_sdxl_and_touches_only_its_weights(method, tiny_sdxl_model_dir, photos_dir, tmp_path):
    """Then, on the step compiled here, a 4-step run and its resume from checkpoint-2 match exactly."""
    options = OPTIONS.get(method, dict(method=method))
    method = options["method"]
    config = make_config(tiny_sdxl_model_dir, photos_dir, tmp_path, learning_rate=LEARNING_RATES[method],
                         control_type="canny", **options)
    trainer = Trainer(config).build()
    comps = trainer.components
    assert trainer.family is SDXL
    unet = trainer.train_step.model.denoise.unet
    cells = (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, unet)
    before = snapshot(cells)
    trainable_ids = {id(p) for p in trainer.trainable}
    time_ids = SDXL.add_time_ids([[40, 48], [64, 32]], [[4, 8], [0, 0]], (32, 32)).asnumpy()

    lr = ms.Tensor(LEARNING_RATES[method], ms.float32)
    inputs = fixed_inputs(trainer, time_ids)
    losses = [float(trainer.train_step(*inputs, lr)[1].asnumpy()) for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses

    after = snapshot(cells)
    changed = {key for key in before if not np.array_equal(before[key], after[key])}
    assert changed and {cell for cell, _ in changed} <= {0, 4}  # the VAE and both text encoders bitwise unchanged
    named = {(i, name): p for i, cell in enumerate(cells) for name, p in cell.parameters_and_names()}
    assert all(id(named[key]) in trainable_ids for key in changed)  # and so is every frozen UNet weight

    # The time ids reach the UNet: other sizes and crops give another loss on the same weights
    # (a step at learning rate 0 reports the loss and leaves the weights where they are).
    other = fixed_inputs(trainer, np.tile(SDXL.add_time_ids((32, 32), (0, 0), (32, 32)).asnumpy(), (2, 1)))
    zero = ms.Tensor(0.0, ms.float32)
    assert float(trainer.train_step(*inputs, zero)[1].asnumpy()) != float(trainer.train_step(*other, zero)[1].asnumpy())

    trainer.method.save_weights(comps.unet, str(tmp_path / "weights"))
    assert os.path.exists(tmp_path / "weights" / WEIGHTS[method])
    if "use_dora" in options:
        names = [name for name, _ in comps.unet.parameters_and_names() if id(_) in trainable_ids]
        assert any("ff.net.2" in n for n in names) and any("magnitude" in n for n in names), names[:5]

    # Exact resume, every method: the run's batches, time ids and noise again from checkpoint-2.
    run = dataclasses.replace(config, output_dir=str(tmp_path / "full"), max_train_steps=4, checkpointing_steps=2)
    trainer.config = run
    full = trainer.train()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    load_training_state(str(tmp_path / "full" / "checkpoint-2"), trainer.train_step, method)
    trainer.config = dataclasses.replace(run, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="latest")
    resumed = trainer.train()
    assert full.global_step == resumed.global_step == 4 and resumed.losses == full.losses[2:]
    first = load_file(str(tmp_path / "full" / "checkpoint-4" / "training_state.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "training_state.safetensors"))
    assert first.keys() == again.keys()  # every trained tensor and its optimizer state
    for key in first:
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)


@pytest.mark.slow
def test_an_sdxl_run_resumes_exactly_with_min_snr_noise_offset_v_prediction_and_ema(tiny_sdxl_model_dir, photos_dir,
                                                                                tmp_path):
    common = dict(method="lora", learning_rate=1e-3, lr_scheduler="linear", lr_warmup_steps=1, max_train_steps=4,
                  checkpointing_steps=2, snr_gamma=5.0, noise_offset=0.05, prediction_type="v_prediction",
                  validation_prompt=["a cat"], validation_steps=4, num_validation_images=1, validation_loss_samples=2,
                  use_ema=True, ema_decay=0.9)
    config = make_config(tiny_sdxl_model_dir, photos_dir, tmp_path / "full", **common)
    trainer = Trainer(config).build()
    full = trainer.train()
    assert full.global_step == 4 and np.isfinite(full.losses).all()
    final = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))  # the EMA weights
    raw = load_file(str(tmp_path / "full" / "raw" / "pytorch_lora_weights.safetensors"))
    assert any(not np.array_equal(final[k], raw[k]) for k in final)
    (image,) = (tmp_path / "full" / "validation" / "step_4").glob("*seed*.png")
    held_out = [r["validation_loss"] for r in map(json.loads, open(tmp_path / "full" / "logs.jsonl"))
                if "validation_loss" in r]
    assert held_out and np.isfinite(held_out).all()  # the held-out samples carry their time ids

    # Resume from step 2 on the step already compiled: the same batches, time ids and noise.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    load_training_state(str(tmp_path / "full" / "checkpoint-2"), trainer.train_step, "lora")
    trainer.config = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"),
                                         resume_from_checkpoint="latest")
    trainer.validator = None
    resumed = trainer.train()
    assert resumed.losses == full.losses[2:]
    again = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert again.keys() == final.keys()
    for key in final:
        np.testing.assert_array_equal(again[key], final[key], err_msg=key)
    logs = [json.loads(line) for line in open(tmp_path / "resumed" / "logs.jsonl")]
    assert [r["step"] for r in logs] == [3, 4]



def test_sdxl_parameter_counts():
    """Every method on the real SDXL base UNet config (built without allocating its weights)."""
    from mindone.diffusers import ControlNetModel
    from mindspore.nn.utils import no_init_parameters

    from mindscedit.models import build_unet, unet_preset
    from mindscedit.tuners.csc_tuner import CSCTunerConfig, build_csc_tuner
    from mindscedit.tuners.lora import LoRAConfig, inject_lora
    from mindscedit.tuners.sc_tuner import SCTunerConfig, inject_sc_tuners, sc_tuner_parameters

    def count(params):
        return sum(p.size for p in params)

    with no_init_parameters():
        unet = build_unet(unet_preset("sdxl"))
        assert count(unet.get_parameters()) == 2_567_463_684  # SDXL base's UNet
        csc = dict(build_csc_tuner(unet, CSCTunerConfig(dense_hint_kernel=3)).parameters_and_names())
        controlnet = count(ControlNetModel.from_unet(unet).get_parameters())
        inject_sc_tuners(unet, SCTunerConfig())
        lora = count(inject_lora(build_unet(unet_preset("sdxl")), LoRAConfig(rank=4, alpha=4)))
        dora = count(inject_lora(build_unet(unet_preset("sdxl")), LoRAConfig(rank=4, alpha=4, use_dora=True)))
    assert count(sc_tuner_parameters(unet)) == 9_841_920  # 9 tuners, dims 1280, 1280, 640 x3, 320 x4
    # scepter's SDXL depth settings: pre-hint 3 -> 320, dense-hint kernel 3, one SC adapter per skip.
    assert count(csc.values()) == 45_033_040
    assert count(p for n, p in csc.items() if n.startswith("pre_hint_blocks.")) == 348_880
    assert count(p for n, p in csc.items() if n.startswith("dense_hint_blocks.")) == 34_842_240
    assert count(p for n, p in csc.items() if n.startswith("lsc_tuner_blocks.")) == 9_841_920
    assert controlnet == 1_251_014_160 and 0.035 < 45_033_040 / controlnet < 0.037  # 3.6% of ControlNet-XL
    assert lora == 5_806_080  # rank 4 on to_q, to_k, to_v, to_out.0
    assert dora == lora + 665_600  # and a magnitude per output row of each of those projections


@pytest.mark.parametrize("method, folder", [("scedit_control", "tiny_sdxl_model_dir"),
                                            ("controlnet", "tiny_sdxl_model_dir"),
                                            ("scedit", "tiny_playground_model_dir")])
@pytest.mark.slow
def test_the_bench_times_sdxl_and_playground_folders(method, folder, request):
    """The condition image after the added conditions, into the CSC-Tuner and into ControlNet; a
    Playground folder's step trains EDM-style on its own scheduler."""
    from mindscedit.bench import BenchCase, run_case

    row = run_case(BenchCase(method=method, batch_size=2, model=request.getfixturevalue(folder), resolution=32,
                             device_target="CPU", steps=1, warmup=0))
    assert row["trainable_params"] > 0 and row["s_per_step"] > 0 and np.isfinite(row["loss"])
