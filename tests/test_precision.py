"""Every method in the precision users train in on Ascend, run on CPU as far as MindSpore allows.

fp16 runs on CPU: every shipped config's own training step (method, precision, jit level,
recompute) is built and run on the tiny pipeline, and checkpoints saved in fp16 resume exactly.
bf16 has no CPU MatMul kernel, so each method's bf16 step is compiled through the front end only
(parse and type inference), which is where a dtype mismatch shows. These run the graph Ascend
runs: the CPU kernel workarounds off (MINDSCEDIT_CPU_REWRITES=0). The bench test at the end runs
fp16 steps with them on, as a CPU user gets them.
"""
import json
import os
import subprocess
import sys

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn
from PIL import Image

from mindscedit.bench import BenchCase, run_case
from mindscedit.training.config import load_config, read_config_file
from mindscedit.training.checkpoint import TRAINING_STATE_FILE, _named_state_parameters, load_training_state
from mindscedit.training.step import compile_front_end
from mindscedit.training.trainer import Trainer
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.listdir(os.path.join(REPO, "configs")))
# One fp16 resume per method (each costs another compile).
RESUMED = {"sd15_vanilla.yaml", "sd15_lora.yaml", "sd15_scedit.yaml", "sd15_scedit_canny.yaml"}
STEPS = 3
VALIDATED = {"sd15_vanilla.yaml", "sd15_scedit_canny.yaml"}


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
    if shipped.get("conditioning_image_column"):
        values["conditioning_image_column"] = "image"  # the bundled photos have no depth maps: the photo stands in
    values.update(overrides)
    return load_config(None, values), shipped


@pytest.fixture
def ascend_graph(monkeypatch):
    """The layers Ascend runs: mindone's and MindSpore's own, no CPU rewrites."""
    monkeypatch.setenv("MINDSCEDIT_CPU_REWRITES", "0")


def trainable_arrays(trainer):
    keep = {id(p) for p in trainer.trainable}
    return {n: p.asnumpy().copy() for n, p in trainer.train_step.model.parameters_and_names() if id(p) in keep}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS + ["tiny_lora.yaml+dora+fp16"])
def test_each_shipped_config_trains_in_its_own_precision(name, tiny_model_dir, photos_dir, tmp_path, ascend_graph):
    file, _, variant = name.partition("+")
    extra = dict(use_dora=True, mixed_precision="fp16") if variant else {}
    if file in VALIDATED:  # validation images in the run's precision (vanilla: AMP; canny: under a condition)
        extra.update(validation_prompt=["a photo"], validation_steps=STEPS, num_validation_images=1)
        if "canny" in file:
            condition = tmp_path / "edges.png"
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(condition)
            extra["validation_image"] = [str(condition)]
    config, shipped = shipped_config(file, tiny_model_dir, photos_dir, tmp_path / "run", **extra)
    trainer = Trainer(config).build()
    before = trainable_arrays(trainer)
    result = trainer.train()

    assert result.global_step == STEPS and len(result.losses) == STEPS and np.isfinite(result.losses).all()
    after = trainable_arrays(trainer)
    assert all(p.dtype == ms.float32 for p in trainer.trainable)  # fp32 master weights
    assert any(not np.array_equal(before[k], after[k]) for k in before), "no trainable weight moved"
    if config.mixed_precision == "fp16" and config.method != "vanilla":
        # The frozen UNet computes in fp16 (vanilla: AMP O2 casts in the graph, weights stay fp32).
        frozen = [p for p in trainer.components.unet.get_parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == ms.float16 for p in frozen)
    assert os.path.isfile(tmp_path / "run" / f"checkpoint-{STEPS}" / "state.json")
    if file in VALIDATED:
        (image,) = (tmp_path / "run" / "validation" / f"step_{STEPS}").glob("*seed*.png")
        assert np.asarray(Image.open(image)).std() > 0

    if file in RESUMED:  # a checkpoint saved in this precision resumes where the run was
        checkpoint = tmp_path / "run" / "checkpoint-1"
        resumed, _ = shipped_config(file, tiny_model_dir, photos_dir, tmp_path / "run",
                                    resume_from_checkpoint=str(checkpoint))
        again = Trainer(resumed).build()
        load_training_state(str(checkpoint), again.train_step, config.method)  # as train() starts
        saved = load_file(str(checkpoint / TRAINING_STATE_FILE))
        for key, param in _named_state_parameters(again.train_step).items():
            np.testing.assert_array_equal(param.asnumpy(), saved[key], err_msg=key)  # weights, moments, loss scale
        assert all(p.dtype == ms.float32 for p in again.trainable)
        rerun = again.train()
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


@pytest.mark.slow
def test_bench_runs_every_method_in_fp16_on_cpu(tmp_path):
    """fp16 steps with the CPU workarounds on, each method (and the ControlNet baseline) in its own process."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "mindscedit.cli", "bench", "--model_config", "tiny", "--methods",
         "vanilla,lora,scedit,scedit_control,controlnet", "--batch_sizes", "1", "--resolution", "64", "--steps", "2",
         "--warmup", "0", "--mixed_precision", "fp16", "--device_target", "CPU", "--json", str(out)],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "mixed_precision fp16 on CPU: for checking the Ascend dtype path" in proc.stderr
    rows = [json.loads(line) for line in open(out)]
    assert [r["method"] for r in rows] == ["vanilla", "lora", "scedit", "scedit_control", "controlnet"]
    assert all(r["mixed_precision"] == "fp16" and np.isfinite(r["loss"]) for r in rows)


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
