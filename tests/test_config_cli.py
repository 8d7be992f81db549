"""Config, flags and model-folder checks: one clear line naming the culprit, before any model loads."""
import os
import shutil

import pytest

from mindscedit.cli import main
from mindscedit.training.config import load_config, validate
from mindscedit.errors import ModelFolderError, UserError
from mindscedit.models import check_model_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(pretrained_model_name_or_path="m", train_data_dir="d")


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nrank: 8\nlearning_rate: 1.0e-4\ncenter_crop: true\n")
    config = load_config(str(path), dict(BASE, rank="16", random_flip="true", lora_target_modules="to_q,to_v"))
    assert (config.method, config.rank, config.learning_rate) == ("lora", 16, 1e-4)
    assert config.center_crop and config.random_flip and config.lora_target_modules == ["to_q", "to_v"]


def test_method_and_optimizer_options_may_be_grouped_in_yaml_sections(tmp_path):
    grouped, flat = tmp_path / "grouped.yaml", tmp_path / "flat.yaml"
    grouped.write_text("method: lora\nlora:\n  rank: 8\n  alpha: 16\n  target_modules: [to_q, to_v]\n"
                       "  use_dora: true\nscedit:\n  down_ratio: 0.5\ncontrol:\n  type: color\n"
                       "  dense_hint_kernel: 1\nadamw:\n  beta2: 0.99\n  weight_decay: 0.0\n")
    flat.write_text("method: lora\nrank: 8\nlora_alpha: 16\nlora_target_modules: [to_q, to_v]\nuse_dora: true\n"
                    "down_ratio: 0.5\ncontrol_type: color\ndense_hint_kernel: 1\nadam_beta2: 0.99\n"
                    "adam_weight_decay: 0.0\n")
    assert load_config(str(grouped), BASE) == load_config(str(flat), BASE)
    assert load_config(str(grouped), dict(BASE, rank="4")).rank == 4  # a flag still overrides a section key


@pytest.mark.parametrize(
    "yaml_text,overrides,message",
    [
        ("lora:\n  rnk: 8\n", {}, r"unknown key 'rnk' in section 'lora' \(known: rank, alpha, target_modules, "
                                   r"use_dora\) \(did you mean 'rank'\?\)"),
        ("rank: 4\nlora:\n  rank: 8\n", {}, r"'lora.rank' and 'rank' both set"),
        ("lora:\n  rank: 8\nrank: 4\n", {}, r"'rank' set both in a section and at the top"),
        ("lora:\n  alpha: big\n", {}, r"lora: 'lora_alpha' must be a number, got 'big'"),
        ("", {"optimizer": "sgd"}, r"optimizer: 'sgd' is not one of adamw"),
        ("", {"seed": "-5"}, r"seed must be >= 0, got -5"),
        ("method: scedit_control\n", {"canny_low_threshold": "250"},
         r"canny_low_threshold \(250\) is above canny_high_threshold \(200\)"),
        ("lerning_rate: 1.0e-4\n", {}, r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"),
        ("", {"max_train_step": "5"}, r"unknown flag --max_train_step \(did you mean 'max_train_steps'\?\)"),
        ("rank: four\n", {}, r"'rank' must be an integer, got 'four'"),
        ("", {"learning_rate": "-1"}, r"learning_rate must be > 0"),
        ("", {"rank": "0"}, r"rank must be >= 1"),
        ("adamw:\n  beta2: 1.0\n", {}, r"adam_beta2 must be < 1, got 1.0"),
        ("", {"learning_rate": "inf"}, r"learning_rate must be a finite number, got inf"),
        ("", {"adam_weight_decay": "nan"}, r"adam_weight_decay must be >= 0, got nan"),
        ("", {"resolution": "500"}, r"resolution must be a positive multiple of 8, got 500"),
        ("", {"method": "dora"}, r"method: 'dora' is not one of vanilla, lora, scedit"),
        ("- a\n- b\n", {}, r"expected a mapping"),
    ],
)
def test_bad_config_names_the_culprit(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError, match=message) as info:
        load_config(str(path), dict(BASE, **overrides))
    assert "\n" not in str(info.value)


def test_a_value_flag_given_without_its_value_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--output_dir"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [  # one line, no usage block, as every other bad input
        "error: mindscedit train: argument --output_dir: expected one argument (see mindscedit train --help)"]


@pytest.mark.parametrize("argv, message", [
    ([], "mindscedit: the following arguments are required: command"),
    (["annotate", "--type", "edges", "a.png", "b.png"], "mindscedit annotate: argument --type: invalid choice"),
    (["merge-lora", "a.safetensors", "--weights", "x", "--out", "m"], "argument --weights: invalid float value"),
])
def test_argument_errors_of_every_command_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and message in line


def test_ascend_only_settings_are_refused_on_cpu():
    with pytest.raises(UserError, match="jit_level O2 needs an Ascend device"):
        validate(load_config(None, dict(BASE, jit_level="O2")), device_target="CPU")
    with pytest.raises(UserError, match="mixed_precision bf16 needs an Ascend device .* --compile_only"):
        validate(load_config(None, dict(BASE, mixed_precision="bf16")), device_target="CPU")
    validate(load_config(None, dict(BASE, mixed_precision="fp16")), device_target="CPU")  # the Ascend dtype path
    validate(load_config(None, dict(BASE, jit_level="O2", mixed_precision="bf16")), device_target="Ascend")


def test_model_folder_errors_name_the_missing_piece(tiny_model_dir, tmp_path):
    check_model_folder(tiny_model_dir)
    with pytest.raises(ModelFolderError, match="model folder not found: /nonexistent"):
        check_model_folder("/nonexistent")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    os.remove(broken / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFolderError, match=r"no diffusion_pytorch_model.safetensors in .*broken/unet"):
        check_model_folder(str(broken))
    shutil.rmtree(broken)
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelFolderError, match=r"has no 'vae/' subfolder"):
        check_model_folder(str(broken))


def test_cli_reports_a_bad_flag_in_one_line(capsys):
    assert main(["train", "--learning_rte", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown flag --learning_rte (did you mean 'learning_rate'?)"


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_shipped_configs_are_valid(name):
    config = load_config(os.path.join(REPO, "configs", name))
    assert config.method in ("vanilla", "lora", "scedit", "scedit_control")
    if name.startswith("tiny"):
        validate(config, device_target="CPU")  # the CPU demo configs must run here


# scepter's SDXL recipes (sdxl_1024_sce_t2i.yaml, sdxl_1024_sce_ctr_depth.yaml): AdamW lr 1e-4, weight
# decay 1e-2, 1024², batch 1, 2000 steps, fp16; the depth tuner with 3x3 dense hints.
SDXL_RECIPE = dict(optimizer="adamw", learning_rate=1e-4, adam_weight_decay=1e-2, resolution=1024,
                   train_batch_size=1, max_train_steps=2000, mixed_precision="fp16")


@pytest.mark.parametrize("name, method, extra", [
    ("sdxl_scedit.yaml", "scedit", {}),
    ("sdxl_scedit_depth.yaml", "scedit_control", dict(control_type="depth", dense_hint_kernel=3)),
    ("sdxl_lora.yaml", "lora", dict(rank=4, lora_alpha=4)),
])
def test_the_sdxl_configs_follow_scepters_recipe(name, method, extra):
    config = load_config(os.path.join(REPO, "configs", name))
    assert config.method == method
    for key, value in dict(SDXL_RECIPE, **extra).items():
        assert getattr(config, key) == value, key


def test_an_unexpected_failure_is_one_line_with_its_own_exit_code(monkeypatch, capsys):
    import mindscedit.convert as convert_module

    def crash(*args):
        raise RuntimeError("the device went away\nsecond line")

    monkeypatch.setattr(convert_module, "convert", crash)
    argv = ["convert", "--from", "swift", "--to", "scepter", "in", "out"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err == ("error: mindscedit convert failed unexpectedly: RuntimeError: the device went away second line "
                   "(rerun with --debug for the full traceback)")
    for debug in (["--debug"] + argv, argv + ["--debug"]):  # before or after the command
        with pytest.raises(RuntimeError, match="the device went away"):
            main(debug)
