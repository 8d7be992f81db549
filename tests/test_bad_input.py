"""Bad input through the real command line: exit code 2 and one `error:` line naming the culprit,
before any model is loaded or any output written."""
import json
import os

import pytest

from mindscedit.cli import main

NOT_UTF8 = b"caf\xe9 au lait\n"  # Latin-1, not UTF-8


def _files(tmp_path):
    """The files and folders the cases refer to."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    data = tmp_path / "latin1"
    data.mkdir()
    (data / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "' +
                                          NOT_UTF8.strip() + b'"}\n')
    (tmp_path / "prompts.txt").write_bytes(b"a cat\n" + NOT_UTF8)
    (tmp_path / "photo.png").write_bytes(b"not really")
    (tmp_path / "latin1.yaml").write_bytes(b"learning_rate: 1.0e-4\n# " + NOT_UTF8)
    for run, state in (("damaged_run", "{garbage"), ("lora_run", '{"global_step": 2, "method": "lora"}')):
        (tmp_path / run / "checkpoint-2").mkdir(parents=True)
        (tmp_path / run / "checkpoint-2" / "state.json").write_text(state)
    return tmp_path


# (arguments, the part of the message that names the culprit); {t} is the test's folder.
CASES = {
    "train seed below 0": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--seed", "-5"],
                           "seed must be >= 0, got -5"),
    "train unknown optimizer": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                 "--optimizer", "sgd"], "optimizer: 'sgd' is not one of adamw"),
    "train output under a file": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                   "--output_dir", "{t}/a_file/run"], "output_dir {t}/a_file/run cannot be created: "
                                                                      "{t}/a_file is a file"),
    "train output is a file": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                "--output_dir", "{t}/a_file"], "output_dir {t}/a_file is a file, not a folder"),
    "train compile cache is a file": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                       "--output_dir", "{t}/out", "--compile_cache_dir", "{t}/a_file"],
                                      "compile_cache_dir {t}/a_file is a file, not a folder"),
    "train ema_decay 1": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--ema_decay",
                           "1"], "ema_decay must be < 1, got 1.0"),
    "train ema_min_decay above ema_decay": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                             "--ema_decay", "0.9", "--ema_min_decay", "0.95"],
                                            "ema_min_decay (0.95) is above ema_decay (0.9)"),
    "train validation_use_ema without use_ema": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir",
                                                  "d", "--validation_use_ema"], "validation_use_ema needs use_ema"),
    "train validation_loss_samples 0": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                         "--validation_loss_samples", "0"],
                                        "validation_loss_samples must be >= 1, got 0"),
    "train config not UTF-8": (["train", "--config", "{t}/latin1.yaml", "--output_dir", "{t}/out"],
                               "{t}/latin1.yaml: not UTF-8 text (byte 27: b'\\xe9')"),
    # The output folder's checkpoints are read before the model (here "m", which does not exist) loads.
    "train into a folder with a damaged checkpoint": (["train", "--pretrained_model_name_or_path", "m",
                                                       "--train_data_dir", "d", "--output_dir", "{t}/damaged_run"],
                                                      "checkpoint {t}/damaged_run/checkpoint-2: state.json is "
                                                      "unreadable"),
    "train into another method's folder": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                            "--output_dir", "{t}/lora_run", "--method", "scedit"],
                                           "output_dir {t}/lora_run holds checkpoints of a run with method 'lora'"),
    "train resume of another method's checkpoint": (["train", "--pretrained_model_name_or_path", "m",
                                                     "--train_data_dir", "d", "--output_dir", "{t}/lora_run",
                                                     "--method", "scedit", "--resume_from_checkpoint", "latest"],
                                                    "checkpoint {t}/lora_run/checkpoint-2 was saved by a 'lora' run"),
    "train resume of a missing checkpoint": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir",
                                              "d", "--output_dir", "{t}/out", "--resume_from_checkpoint",
                                              "checkpoint-9"],
                                             "resume_from_checkpoint: checkpoint-9 is not a complete checkpoint"),
    "sample seed below 0": (["sample", "--pretrained_model_name_or_path", "m", "--prompt", "a", "--seed", "-5",
                             "--output_dir", "{t}/out"], "--seed must be >= 0, got -5"),
    "sample output is a file": (["sample", "--pretrained_model_name_or_path", "m", "--prompt", "a",
                                 "--output_dir", "{t}/a_file"], "--output_dir {t}/a_file is a file, not a folder"),
    "sample prompt file not UTF-8": (["sample", "--pretrained_model_name_or_path", "m", "--prompt_file",
                                      "{t}/prompts.txt", "--output_dir", "{t}/out"],
                                     "{t}/prompts.txt line 2: not UTF-8 text"),
    "sample NaN strength": (["sample", "--pretrained_model_name_or_path", "m", "--prompt", "a", "--lora_scale",
                             "nan", "--output_dir", "{t}/out"], "--lora_scale must be a finite number, got nan"),
    "check-data metadata not UTF-8": (["check-data", "{t}/latin1"], "metadata.jsonl line 2: not UTF-8 text"),
    "convert resnets_per_block 0": (["convert", "--from", "scepter", "--to", "swift", "{t}/x.safetensors", "{t}/out",
                                     "--resnets_per_block", "0"], "--resnets_per_block must be >= 1, got 0"),
    "convert output under a file": (["convert", "--from", "scepter", "--to", "swift", "{t}/x.safetensors",
                                     "{t}/a_file/out"], "output {t}/a_file/out cannot be created: {t}/a_file is a file"),
    "annotate thresholds crossed": (["annotate", "--type", "canny", "--low_threshold", "300", "--high_threshold",
                                     "100", "{t}/photo.png", "{t}/edges.png"],
                                    "--low_threshold (300) is above --high_threshold (100)"),
    "annotate output is a folder": (["annotate", "--type", "canny", "{t}/photo.png", "{t}/full"],
                                    "output {t}/full is a folder; give a file name"),
    "annotate unreadable image": (["annotate", "--type", "canny", "{t}/photo.png", "{t}/edges.png"],
                                  "{t}/photo.png: cannot decode image"),
    "make-tiny-model into a non-empty folder": (["make-tiny-model", "{t}/full"],
                                                "output_dir {t}/full is not empty; give a new or empty folder"),
    "make-tiny-model output is a file": (["make-tiny-model", "{t}/a_file"], "output_dir {t}/a_file is a file"),
    # /proc refuses new folders even to root, whom os.access lets through everywhere.
    "train output unwritable": (["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                 "--output_dir", "/proc/mindscedit-run/out"],
                                "output_dir /proc/mindscedit-run/out cannot be written: /proc: "),
    "sample output unwritable": (["sample", "--pretrained_model_name_or_path", "m", "--prompt", "a",
                                  "--output_dir", "/proc/mindscedit-images"],
                                 "--output_dir /proc/mindscedit-images cannot be written: /proc: "),
    "make-tiny-model output unwritable": (["make-tiny-model", "/proc/mindscedit-tiny"],
                                          "output_dir /proc/mindscedit-tiny cannot be written: /proc: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_culprit_and_exit_2(case, tmp_path, capfd):
    t = _files(tmp_path)
    argv, culprit = CASES[case]
    before = sorted(os.listdir(t))
    assert main([a.format(t=t) for a in argv]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and culprit.format(t=t) in err[0], err
    assert sorted(os.listdir(t)) == before  # nothing written


@pytest.mark.parametrize("damage", ["state.json", "training_state.safetensors", "nan"])
def test_a_damaged_checkpoint_is_refused_before_anything_is_set(damage, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from mindscedit.errors import UserError
    from mindscedit.training.checkpoint import load_training_state

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"global_step": 4, "micro_step": 4, "method": "scedit"}))
    save_file({"param/w": np.ones(3, np.float32)}, str(folder / "training_state.safetensors"))
    if damage == "state.json":
        (folder / "state.json").write_text("{garbage")
        message = r"state.json is unreadable .*; resume from an earlier checkpoint"
    elif damage == "training_state.safetensors":
        data = (folder / "training_state.safetensors").read_bytes()
        (folder / "training_state.safetensors").write_bytes(data[: len(data) // 2])
        message = r"training_state.safetensors: not a readable safetensors file"
    else:
        save_file({"param/w": np.array([1, np.nan, 1], np.float32)}, str(folder / "training_state.safetensors"))
        message = r"'param/w' holds 1 non-finite value\(s\)"
    # The train step is never reached: the checkpoint is refused while it is being read.
    with pytest.raises(UserError, match=message):
        load_training_state(str(folder), train_step=None, method="scedit")


def test_a_model_whose_unet_config_does_not_fit_together_is_bad_input(tiny_model_dir, tmp_path, capfd):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["up_block_types"] = config["up_block_types"][:1]  # one up block for two down blocks
    (model / "unet" / "config.json").write_text(json.dumps(config))
    assert main(["sample", "--pretrained_model_name_or_path", str(model), "--prompt", "a", "--output_dir",
                 str(tmp_path / "out"), "--device_target", "CPU"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot load the model in {model}: "), err


def test_a_file_output_in_a_folder_not_yet_made_is_written_there(tmp_path, capfd):
    """annotate (as plot-logs, convert and merge-lora to a .safetensors, bench --json) makes the output's folder."""
    import mindscedit

    cat = os.path.join(os.path.dirname(mindscedit.__file__), "assets", "cat2", "cat.jpg")
    out = tmp_path / "new" / "sub" / "edges.png"
    assert main(["annotate", "--type", "canny", "--resolution", "64", cat, str(out)]) == 0
    assert out.is_file() and "canny condition written to" in capfd.readouterr().out
