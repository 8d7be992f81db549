"""What differs between MindSpore versions: where compat.py finds MindSpore's internals, and
each training method through the compile cache, as `mindscedit train` runs it.

The cache serves only a process's first train step, so each method gets its own process: the
installed console script on the shipped CPU config of that method (the configs that train in
fp32; test_precision.py trains the fp16 ones), with flags overriding the model, data and length.
A fresh cache folder means the step is compiled, saved and, on CPU, dropped and loaded back from
the cache: every MindSpore internal that compat.py locates is used.
"""
import inspect
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn
from safetensors.numpy import load_file

from mindscedit.training.config import read_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shipped configs that train in fp32: the CPU demo configs, one per method.
FP32_CONFIGS = sorted(name for name in os.listdir(os.path.join(REPO, "configs"))
                      if read_config_file(os.path.join(REPO, "configs", name)).get("mixed_precision", "no") == "no")
# The final weights each method writes at the top of output_dir.
WEIGHTS = {
    "vanilla": os.path.join("unet", "diffusion_pytorch_model.safetensors"),
    "lora": "pytorch_lora_weights.safetensors",
    "scedit": "adapter_model.safetensors",
    "scedit_control": "csc_tuner.safetensors",
}


@pytest.mark.smoke
def test_compat_finds_the_modules_that_mindspore_itself_reads():
    import mindspore.nn.cell

    from mindscedit.compat import cell_graph_executor, compile_config, graph_api

    # Not a copy under an old name (from 2.9 the old modules copy the new ones' attributes):
    # the module whose own source assigns the setting, so that setting it reaches MindSpore.
    for module, name in ((graph_api, "entry_script_path"), (compile_config, "COMPILE_PROFILE")):
        assert re.search(rf"^{name} = ", inspect.getsource(module), re.MULTILINE), (module.__name__, name)
    assert cell_graph_executor is mindspore.nn.cell._cell_graph_executor  # the one Cells compile with


@pytest.mark.smoke
def test_a_mindspore_without_the_graph_module_trains_without_the_cache(monkeypatch, caplog, tmp_path):
    from mindscedit import compat
    from mindscedit.training import compile_cache

    monkeypatch.setitem(compat._MODULES, "graph_api", ("_cell_graph_executor", ("mindspore.no_such_module",)))
    monkeypatch.setattr(compat, "_found", {})
    with pytest.raises(ImportError, match=r"MindSpore .* has no graph_api module .*mindspore\.no_such_module"):
        from mindscedit.compat import graph_api  # noqa: F401

    class Double(nn.Cell):
        branch_free = True  # a step the cache would otherwise take

        def construct(self, x):
            return x * 2

    monkeypatch.setitem(compile_cache._process, "allowed", True)
    monkeypatch.setitem(compile_cache._process, "used", False)
    with caplog.at_level(logging.WARNING):
        cached = compile_cache.compile_train_step(Double(), (ms.Tensor(np.ones(3, np.float32)),), str(tmp_path))
    assert cached == "off" and not os.listdir(tmp_path)
    assert [r.getMessage() for r in caplog.records if "compile cache" in r.getMessage()] == [
        f"compile cache off: MindSpore {ms.__version__} has no graph_api module "
        "(looked for _cell_graph_executor in mindspore.no_such_module)"]


def trained_params(checkpoint):
    state = load_file(os.path.join(checkpoint, "training_state.safetensors"))
    return {key: value for key, value in state.items() if key.startswith("param/")}


def test_every_method_has_a_shipped_cpu_config():
    sd_configs = [name for name in FP32_CONFIGS if "sdxl" not in name and "dreambooth" not in name]
    methods = [read_config_file(os.path.join(REPO, "configs", name))["method"] for name in sd_configs]
    assert sorted(methods) == sorted(WEIGHTS)
    assert {"tiny_sdxl_scedit.yaml", "tiny_dreambooth_lora.yaml"} <= set(FP32_CONFIGS)


@pytest.mark.smoke
@pytest.mark.parametrize("config_name", FP32_CONFIGS)
@pytest.mark.slow
def test_each_method_trains_through_the_compile_cache(config_name, tiny_model_dir, tiny_sdxl_model_dir, photos_dir,
                                                     tmp_path):
    method = read_config_file(os.path.join(REPO, "configs", config_name))["method"]
    model_dir = tiny_sdxl_model_dir if "sdxl" in config_name else tiny_model_dir
    # The DreamBooth config trains on its own instance photos; its class images are made under tmp_path.
    data = (["--instance_data_dir", os.path.join(REPO, "mindscedit", "assets", "cat2"),
             "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "2"] if "dreambooth" in config_name
            else ["--train_data_dir", photos_dir])
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [os.path.join(os.path.dirname(sys.executable), "mindscedit"), "train",
           "--config", os.path.join(REPO, "configs", config_name),
           "--pretrained_model_name_or_path", model_dir, *data,
           "--output_dir", str(out), "--resolution", "32", "--max_train_steps", "2", "--checkpointing_steps", "1",
           "--logging_steps", "1",
           "--device_target", "CPU", "--compile_cache_dir", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{method}: trainable parameters:" in proc.stderr

    # The trainer compiled its step through the cache (result.compile_cache == "miss", which the
    # summary line reports), and MindSpore wrote the graph where the cache looks for it.
    summary = [line for line in proc.stdout.splitlines() if line.startswith("done: ")]
    assert len(summary) == 1 and re.match(r"done: step 2, final loss \d+\.\d+, [\d.]+ s/step, [\d.]+ img/s", summary[0])
    assert "(graph compile, saved to the compile cache)" in summary[0], proc.stdout
    (entry,) = os.listdir(cache)
    assert os.path.isfile(cache / entry / "rank_0" / "graph_cache" / "compile_cache_0.mindir")

    losses = [json.loads(line)["loss"] for line in open(out / "logs.jsonl")]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), losses
    # Output to a pipe: plain progress lines, no progress-bar redraws, no library banners.
    assert "step 2/2: loss " in proc.stderr and "\r" not in proc.stderr
    assert "Get New FA API" not in proc.stdout and "None of PyTorch" not in proc.stderr
    assert "Flash attention is available" not in proc.stderr
    # The step that ran after the reload from the cache still trains: step 2 moved the weights.
    first, second = trained_params(out / "checkpoint-1"), trained_params(out / "checkpoint-2")
    assert first.keys() == second.keys() and first
    assert any(not np.array_equal(first[key], second[key]) for key in first)
    weights = load_file(str(out / WEIGHTS[method]))
    assert weights and all(np.all(np.isfinite(value)) for value in weights.values())
