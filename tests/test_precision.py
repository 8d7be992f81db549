"""Every method in the precision users train in on Ascend, run on CPU as far as MindSpore allows.

fp16 runs on CPU: every shipped fp16 config's own training step (method, precision, jit level,
recompute) is built and run on the tiny pipeline (once per distinct step: configs that differ only
in their data, such as the condition types, share one), and checkpoints saved in fp16 resume exactly.
bf16 has no CPU MatMul kernel, so each method's bf16 step is compiled through the front end only
(parse and type inference), which is where a dtype mismatch shows. These run the graph Ascend
runs: the CPU kernel workarounds off (MINDSCEDIT_CPU_REWRITES=0). test_bench.py runs every
method's fp16 step with them on, as a CPU user gets them.
"""
import dataclasses
import os

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn
from PIL import Image

from mindscedit.bench import BenchCase, run_case
from mindscedit.training.config import load_config, read_config_file
from mindscedit.training.compile_cache import graph_key
from mindscedit.training.checkpoint import TRAINING_STATE_FILE, _named_state_parameters, load_training_state
from mindscedit.training.step import compile_front_end
from mindscedit.training.trainer import Trainer
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def low_precision(name):
    return read_config_file(os.path.join(REPO, "configs", name)).get("mixed_precision", "no") != "no"


# The configs that train in fp16 or bf16 (the CPU demo configs, in fp32, are trained through the
# command line by test_smoke.py).
CONFIGS = sorted(name for name in os.listdir(os.path.join(REPO, "configs")) if low_precision(name))
# One per method, and SDXL's LoRA.
RESUMED = {"sd15_vanilla.yaml", "sd15_lora.yaml", "sd15_scedit.yaml", "sd15_scedit_canny.yaml", "sdxl_lora.yaml"}
STEPS = 3
VALIDATED = {"sd15_vanilla.yaml", "sd15_scedit_canny.yaml", "sdxl_scedit.yaml"}
STEPS_RUN = {}  # graph key -> the config whose run in this module compiled and ran that step


class SameStepAsRun(Exception):
    """The config's training step is one that an earlier config in this module compiled and ran."""


def shipped_config(name, model_dir, photos_dir, output_dir, **overrides):
    """The shipped YAML on the tiny pipeline and the bundled photos, everything else as shipped,
    except: jit_level O2 (refused by MindSpore's CPU) runs as O0, the resolution is the tiny
    model's, and runs are a few steps with a checkpoint after each."""
    shipped = read_config_file(os.path.join(REPO, "configs", name))  # sections flattened to their keys
    values = dict(shipped, pretrained_model_name_or_path=model_dir, train_data_dir=photos_dir,
                  output_dir=str(output_dir), resolution=32, max_train_steps=STEPS, checkpointing_steps=1,
                  checkpoints_total_limit=None, validation_prompt=[], device_target="CPU", compile_cache_dir="",
                  dataloader_num_workers=1)
    if shipped.get("jit_level") == "O2":
        values["jit_level"] = "O0"  # CPU refuses O2; the rest of the setting is as shipped
    if shipped.get("instance_data_dir"):  # DreamBooth: the demo's two cat photos, two class images made here
        values.update(train_data_dir=None, instance_data_dir=os.path.join(REPO, "mindscedit", "assets", "cat2"),
                      class_data_dir=str(output_dir) + "-class", num_class_images=2)
    if shipped.get("conditioning_image_column"):
        values["conditioning_image_column"] = "image"  # the bundled photos have no depth maps: the photo stands in
    values.update(overrides)
    return load_config(None, values), shipped


@pytest.fixture
def ascend_graph(monkeypatch):
    """The layers Ascend runs: mindone's and MindSpore's own, no CPU rewrites."""
    monkeypatch.setenv("MINDSCEDIT_CPU_REWRITES", "0")


@pytest.fixture
def once_per_step(monkeypatch):
    """`arm(name)`: the config's run stops before compiling (SameStepAsRun) if its step is the one
    an earlier config ran. The step is compared by its compile-cache key, which covers every
    parameter, cell constant, input shape and jit setting the graph is built from; by then the
    config's data pipeline has made its first batch (conditions included) and its model is built."""
    from mindscedit.training import trainer as trainer_module

    real = trainer_module.compile_train_step

    def arm(name):
        def compile_unless_run(train_step, inputs, cache_root, rank=0, world_size=1):
            key = graph_key(train_step, inputs, world_size)
            if key in STEPS_RUN:
                raise SameStepAsRun(STEPS_RUN[key])
            STEPS_RUN[key] = name
            return real(train_step, inputs, cache_root, rank, world_size)

        monkeypatch.setattr(trainer_module, "compile_train_step", compile_unless_run)
    return arm


def trainable_arrays(trainer):
    keep = {id(p) for p in trainer.trainable}
    return {n: p.asnumpy().copy() for n, p in trainer.train_step.model.parameters_and_names() if id(p) in keep}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS + ["tiny_lora.yaml+dora+fp16"])
def test_each_shipped_config_trains_in_its_own_precision(name, tiny_model_dir, tiny_sdxl_model_dir, photos_dir, tmp_path,
                                                        ascend_graph, once_per_step):
    file, _, variant = name.partition("+")
    extra = dict(use_dora=True, mixed_precision="fp16") if variant else {}
    if file in VALIDATED:  # validation images in the run's precision (vanilla: AMP; canny: under a condition)
        extra.update(validation_prompt=["a photo"], validation_steps=STEPS, num_validation_images=1)
        if "canny" in file:
            condition = tmp_path / "edges.png"
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(condition)
            extra["validation_image"] = [str(condition)]
    model_dir = tiny_sdxl_model_dir if file.startswith("sdxl") else tiny_model_dir
    config, shipped = shipped_config(file, model_dir, photos_dir, tmp_path / "run", **extra)
    trainer = Trainer(config).build()
    before = trainable_arrays(trainer)
    once_per_step(name)
    try:
        result = trainer.train()
    except SameStepAsRun as same:  # e.g. the condition types: one CSC-Tuner step, other annotators
        assert file not in RESUMED | VALIDATED, f"{name} has the step of {same}, which ran: list that one instead"
        return

    assert result.global_step == STEPS and len(result.losses) == STEPS and np.isfinite(result.losses).all()
    after = trainable_arrays(trainer)
    assert all(p.dtype == ms.float32 for p in trainer.trainable)  # fp32 master weights
    assert any(not np.array_equal(before[k], after[k]) for k in before), "no trainable weight moved"
    if config.mixed_precision == "fp16" and config.method != "vanilla":
        # The frozen UNet computes in fp16 (vanilla: AMP O2 casts in the graph, weights stay fp32).
        frozen = [p for p in trainer.components.unet.get_parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == ms.float16 for p in frozen)
    if config.mixed_precision == "fp16":  # SDXL's VAE says force_upcast: fp32, as in its pipeline
        assert trainer.components.vae.dtype == (ms.float32 if file.startswith("sdxl") else ms.float16)
    assert os.path.isfile(tmp_path / "run" / f"checkpoint-{STEPS}" / "state.json")
    if file in VALIDATED:
        (image,) = (tmp_path / "run" / "validation" / f"step_{STEPS}").glob("*seed*.png")
        assert np.asarray(Image.open(image)).std() > 0

    if file in RESUMED:  # a checkpoint saved in this precision resumes where the run was
        # On the step already compiled (a new Trainer would compile it again); loading the state
        # is the same code either way. Resuming in a fresh process is test_training.py's.
        checkpoint = tmp_path / "run" / "checkpoint-1"
        load_training_state(str(checkpoint), trainer.train_step, config.method)
        saved = load_file(str(checkpoint / TRAINING_STATE_FILE))
        for key, param in _named_state_parameters(trainer.train_step).items():
            np.testing.assert_array_equal(param.asnumpy(), saved[key], err_msg=key)  # weights, moments, loss scale
        assert all(p.dtype == ms.float32 for p in trainer.trainable)
        trainer.config = dataclasses.replace(config, resume_from_checkpoint=str(checkpoint))
        trainer.validator = None
        rerun = trainer.train()
        assert rerun.global_step == STEPS
        # The same batches and noise on the same weights. Not compared bit for bit: CPU kernels
        # under load are not always deterministic in fp16, and Adam turns the rounding of LoRA's
        # near-zero first gradients into lr-sized moves.
        np.testing.assert_allclose(rerun.losses, result.losses[1:], rtol=2e-3)


BF16_METHODS = ["vanilla", "lora", "scedit", "scedit_control", "controlnet"]


@pytest.mark.parametrize("method", BF16_METHODS)
@pytest.mark.slow
def test_bf16_step_passes_type_inference(method, ascend_graph):
    row = run_case(BenchCase(method=method, batch_size=1, model="tiny", resolution=64, mixed_precision="bf16",
                             device_target="CPU", compile_only=True))
    assert row["types"] == "ok" and row["trainable_params"] > 0


class Mismatched(nn.Cell):
    """bf16 activations into an fp32 Dense: what LoRA did before its casts."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 4)

    def construct(self, x):
        return self.dense(x.astype(ms.bfloat16))


def test_the_front_end_compile_catches_a_dtype_mismatch():
    """The bf16 check above can fail: a dtype mismatch is refused at type inference."""
    with pytest.raises(TypeError, match="MatMul"):
        compile_front_end(Mismatched(), (ms.Tensor(np.ones((2, 4), np.float32)),))


def test_flash_attention_switch_for_910a(monkeypatch):
    """MINDSCEDIT_FLASH_ATTENTION=0 turns mindone's FlashAttentionScore off in every attention layer."""
    from mindone.diffusers.models.attention_processor import Attention

    from mindscedit.errors import UserError
    from mindscedit.models import build_unet, unet_preset

    def flash_flags():
        return [cell._enable_flash_sdp for _, cell in build_unet(unet_preset("tiny")).cells_and_names()
                if isinstance(cell, Attention)]

    assert flash_flags() and all(flash_flags())  # mindone's default: on wherever the device has it
    monkeypatch.setenv("MINDSCEDIT_FLASH_ATTENTION", "0")
    assert not any(flash_flags())
    monkeypatch.setenv("MINDSCEDIT_FLASH_ATTENTION", "off")
    with pytest.raises(UserError, match="MINDSCEDIT_FLASH_ATTENTION='off': expected 1"):
        flash_flags()


@pytest.mark.parametrize("text_side", ["train_text_encoder_ti", "train_text_encoder"])
@pytest.mark.slow
def test_bf16_sdxl_step_with_the_text_side_passes_type_inference(text_side, tiny_sdxl_model_dir, tmp_path,
                                                                 ascend_graph):
    """Pivotal tuning's rows and text-encoder LoRA train through bf16 text encoders (both of SDXL's, the
    pooled prompt included): the whole training step, as an Ascend run builds it, through the front end."""
    from mindscedit.runtime import Runtime

    config = load_config(None, dict(
        pretrained_model_name_or_path=tiny_sdxl_model_dir, method="lora", output_dir=str(tmp_path / "run"),
        instance_data_dir=os.path.join(REPO, "mindscedit", "assets", "cat2"), instance_prompt="a photo of TOK cat",
        resolution=32, max_train_steps=2, mixed_precision="bf16", device_target="Ascend", **{text_side: True}))
    trainer = Trainer(config, runtime=Runtime("Ascend")).build()
    assert trainer.components.text_encoder_2.dtype == ms.bfloat16
    assert all(p.dtype == ms.float32 for p in trainer.trainable)
    ids = trainer.family.prompt_tokenizer(trainer.components)(config.instance_prompt)[None]
    size = (32, 32)
    time_ids = trainer.family.add_time_ids(size, (0, 0), size)
    inputs = (ms.Tensor(np.zeros((1, 3, 32, 32), np.float32)), ms.Tensor(ids), *trainer.draw_randomness(0, 1),
              time_ids, ms.Tensor(1e-4, ms.float32))
    compile_front_end(trainer.train_step, inputs)
