"""Training never loses work: kills, signals, full disks, non-finite steps and bad flags.

One Trainer is built for the whole module and shared by the tests that need a built one; each of
them gets it with the config it was built with and derives its own from that. The resume test
builds its own Trainer, as loading a checkpoint into a step whose graph has already run does not
reach the graph. The two subprocess runs (SIGKILL during a save, SIGTERM) are the real CLI as a
user runs it. No test depends on another having run, or on the order they run in.
"""
import dataclasses
import errno
import glob
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

import mindscedit.training.checkpoint as checkpoint_module
import mindscedit.training.trainer as trainer_module
from mindscedit.cli import main
from mindscedit.training.config import load_config
from mindscedit.errors import UserError
from mindscedit.training.checkpoint import (
    PAUSE_IN_SAVE_ENV,
    CheckpointSaveError,
    list_checkpoints,
    load_training_state,
    remove_stale_temporaries,
)
from mindscedit.training.step import make_loss_scaler
from mindscedit.training.trainer import Trainer, TrainResult

PHOTOS16 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mindscedit", "assets", "photos16")
PHOTOS16_PARQUET = os.path.join(PHOTOS16, "data", "train-00000-of-00001.parquet")
MINDSCEDIT = os.path.join(os.path.dirname(sys.executable), "mindscedit")
SETTINGS = dict(
    method="scedit", learning_rate=5e-3, resolution=32, center_crop=True, train_batch_size=2,
    max_train_steps=8, checkpointing_steps=2, max_nonfinite_steps=2, device_target="CPU", seed=0,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """3 photos, one corrupt image (line 3) and one empty caption (line 5): 4 usable records, 2 steps an epoch."""
    folder = tmp_path_factory.mktemp("data")
    photos = [cell["bytes"] for cell in pq.read_table(PHOTOS16_PARQUET).column("image").to_pylist()[:3]]
    rows = []
    for i, data in enumerate(photos):
        (folder / f"{i}.jpg").write_bytes(data)
        rows.append({"file_name": f"{i}.jpg", "text": f"a photo number {i}"})
    (folder / "corrupt.jpg").write_bytes(photos[0][:300])
    rows.insert(2, {"file_name": "corrupt.jpg", "text": "corrupt"})
    rows.append({"file_name": "0.jpg", "text": ""})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def config_for(model_dir, data_dir, output_dir, **overrides):
    values = dict(SETTINGS, pretrained_model_name_or_path=model_dir, train_data_dir=data_dir, output_dir=str(output_dir))
    return load_config(None, dict(values, **overrides))


def cli_train(model_dir, data_dir, output_dir, **overrides):
    values = dict(SETTINGS, pretrained_model_name_or_path=model_dir, train_data_dir=data_dir, output_dir=str(output_dir))
    values.update(overrides)
    return [MINDSCEDIT, "train"] + [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def wait_for(condition, proc, what, timeout=600):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def logged_steps(output_dir):
    path = os.path.join(output_dir, "logs.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


@pytest.fixture(scope="module")
def killed_run(tiny_model_dir, data_dir, tmp_path_factory):
    """`mindscedit train` SIGKILLed inside the save of checkpoint-4, its files complete but not yet renamed."""
    root = tmp_path_factory.mktemp("killed")
    out, reference = root / "out", root / "reference-checkpoint-4"
    env = dict(os.environ, **{PAUSE_IN_SAVE_ENV: "checkpoint-4"})
    with open(root / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cli_train(tiny_model_dir, data_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            def save_complete():
                found = glob.glob(str(out / ".checkpoint-4.tmp-*" / "state.json"))
                try:
                    return found and json.load(open(found[0]))["global_step"] == 4
                except ValueError:  # still being written
                    return False

            wait_for(save_complete, proc, "the save of checkpoint-4")
            # What the uninterrupted run had at step 4, to compare the resumed run with.
            shutil.copytree(os.path.dirname(glob.glob(str(out / ".checkpoint-4.tmp-*" / "state.json"))[0]), reference)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return out, reference


@pytest.fixture(scope="module")
def shared_trainer(tiny_model_dir, data_dir, tmp_path_factory):
    """A Trainer built (its step compiled by the first test that trains it) once for the module, and
    the config it was built with. Tests that train it, or compare its weights, record the weights
    they compare within the test: an earlier test may have trained it (the nonfinite test does),
    and loading a checkpoint into it after its graph has run would not reach the graph."""
    # No test trains or saves into this folder: each sets an output_dir of its own.
    config = config_for(tiny_model_dir, data_dir, tmp_path_factory.mktemp("shared-trainer") / "unused")
    return Trainer(config).build(), config


@pytest.fixture
def trainer(shared_trainer):
    """The shared Trainer with the config it was built with, whatever earlier tests set (and reset
    after the test, even a failing one); a test derives its config from this one, as in
    `dataclasses.replace(trainer.config, ...)`."""
    built, config = shared_trainer
    built.config = config
    yield built
    built.config = config


def trainable_weights(trainer):
    ids = {id(p) for p in trainer.trainable}
    # Named by their path in the training network, as training_state.safetensors names them.
    return {name: p.asnumpy().copy() for name, p in trainer.train_step.model.parameters_and_names() if id(p) in ids}


def saved_params(checkpoint):
    state = load_file(os.path.join(checkpoint, "training_state.safetensors"))
    return {key[len("param/"):]: value for key, value in state.items() if key.startswith("param/")}


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(
    killed_run, tiny_model_dir, data_dir, tmp_path, caplog
):
    killed_out, reference = killed_run
    # Resumed in a copy, so the killed run's folder stays as the kill left it.
    out = tmp_path / "out"
    shutil.copytree(killed_out, out, symlinks=True)
    # A Trainer of its own whose graph has not run: parameters loaded after a Trainer's graph has
    # run do not reach the graph. Its config is the killed run's, plus --resume_from_checkpoint latest.
    trainer = Trainer(config_for(tiny_model_dir, data_dir, out, resume_from_checkpoint="latest")).build()
    # The kill left checkpoint-2 complete and checkpoint-4 only as a temporary folder.
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-2"]
    assert glob.glob(str(out / ".checkpoint-4.tmp-*")) and not (out / "checkpoint-4").exists()
    before_kill = logged_steps(out)
    assert [r["step"] for r in before_kill] == [1, 2, 3, 4]

    result = trainer.train()  # --resume_from_checkpoint latest
    assert result.global_step == 8 and len(result.losses) == 6  # steps 3..8: lost only steps 3-4
    assert not glob.glob(str(out / ".*.tmp-*"))  # the stale temporary is gone
    # The log was cut back to the checkpoint's step: every step is logged once, the re-run ones anew.
    assert [r["step"] for r in logged_steps(out)] == list(range(1, 9))
    # Same losses and the same step-4 state (weights, AdamW moments, loss scale) as the killed run had.
    np.testing.assert_allclose(result.losses[:2], [r["loss"] for r in before_kill[2:]], rtol=1e-5)
    expected = load_file(str(reference / "training_state.safetensors"))
    got = load_file(str(out / "checkpoint-4" / "training_state.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # The bad rows: the empty caption dropped at load, the corrupt image skipped once per epoch (3 epochs).
    assert result.skipped_samples == 4
    assert "4 bad samples were skipped" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["state.json", "truncated", "nan"])
def test_the_cli_refuses_to_resume_a_damaged_checkpoint_and_leaves_the_folder_alone(
    damage, killed_run, tiny_model_dir, data_dir, tmp_path, capfd
):
    """`train --resume_from_checkpoint latest` on a real run's folder whose checkpoint-2 is damaged:
    exit 2, one line naming the file, and the folder's config, log and checkpoints as they were."""
    from safetensors.numpy import save_file

    out = tmp_path / "out"
    shutil.copytree(killed_run[0], out, symlinks=True)
    checkpoint = out / "checkpoint-2"
    state_file = checkpoint / "training_state.safetensors"
    if damage == "state.json":
        (checkpoint / "state.json").write_text("{garbage")
        message = f"error: checkpoint {checkpoint}: state.json is unreadable"
    elif damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:1000])
        message = f"error: {state_file}: not a readable safetensors file"
    else:
        arrays = load_file(str(state_file))
        key = sorted(k for k in arrays if k.startswith("param/"))[0]
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = np.nan
        save_file(arrays, str(state_file))
        message = f"error: {state_file}: '{key}' holds 1 non-finite value(s)"
    before = {p: open(p, "rb").read() for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)}

    assert main(cli_train(tiny_model_dir, data_dir, out, resume_from_checkpoint="latest")[1:]) == 2
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert line.startswith(message), line
    after = {p: open(p, "rb").read() for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)}
    # train_config.json, logs.jsonl and the checkpoints untouched, nothing added (glob skips the hidden
    # temporary the kill left, which any start clears as stale).
    assert after == before


class NaNPixelsFrom:
    """Wraps the trainer's loader: NaN pixels from micro-step `first` on; weights recorded before each step."""

    def __init__(self, loader, first, trainer, weights):
        self.loader, self.first, self.trainer, self.weights = loader, first, trainer, weights

    def create_dict_iterator(self, **kwargs):
        for i, batch in enumerate(self.loader.create_dict_iterator(**kwargs)):
            self.weights.append(trainable_weights(self.trainer))
            if i >= self.first:
                batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan))
            yield batch


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_the_run_stops_with_the_last_good_weights(
    trainer, tmp_path, monkeypatch, caplog
):
    # Trains on from the trainer's current weights (as built, or as an earlier test left them: every
    # weight compared below is recorded during this run); a fresh run as far as the loop is concerned.
    trainer.config = dataclasses.replace(
        trainer.config, output_dir=str(tmp_path), resume_from_checkpoint=None, max_train_steps=6
    )
    weights = []  # weights[i]: before step i + 1
    real = trainer_module.create_dataloader
    monkeypatch.setattr(
        trainer_module, "create_dataloader", lambda *a, **k: NaNPixelsFrom(real(*a, **k), 1, trainer, weights)
    )
    result = trainer.train()  # step 1 fine, steps 2 and 3 non-finite, max_nonfinite_steps=2

    assert result.global_step == 3 and result.diverged
    assert result.stopped_early.startswith("2 consecutive non-finite steps") and "step 1" in result.stopped_early
    assert "stopped at step 3" in caplog.text
    assert [r["skipped"] for r in logged_steps(tmp_path)] == [False, True, True]
    changed = [k for k in weights[0] if not np.array_equal(weights[0][k], weights[1][k])]
    assert changed  # step 1 trained
    for key in weights[1]:  # steps 2 and 3 left every weight alone
        np.testing.assert_array_equal(weights[2][key], weights[1][key])
    last_good = trainable_weights(trainer)
    for key, value in saved_params(tmp_path / "checkpoint-3").items():
        np.testing.assert_array_equal(value, weights[1][key])
        np.testing.assert_array_equal(value, last_good[key])
    assert not (tmp_path / "adapter_model.safetensors").exists()  # a failed run writes no final weights


def test_fp16_loss_scale_is_lowered_on_a_nonfinite_step():
    import mindspore as ms

    scaler = make_loss_scaler("fp16", init_scale=1024.0)
    scaler.adjust(ms.Tensor(False))
    assert float(scaler.scale_value.asnumpy()) == 512.0


def test_cli_exit_code_of_a_diverged_run(monkeypatch, capsys):
    class Diverges:
        def __init__(self, config):
            pass

        def train(self):
            return TrainResult(global_step=5, losses=[1.0], diverged=True, stopped_early="2 consecutive non-finite steps")

    monkeypatch.setattr(trainer_module, "Trainer", Diverges)
    assert main(["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]) == 1
    assert "stopped early: 2 consecutive non-finite steps" in capsys.readouterr().out


def failing_save_file(arrays, path, *args, **kwargs):
    """A disk that fills up halfway through writing the training state."""
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_full_disk_during_save_keeps_the_previous_checkpoint(trainer, tmp_path, monkeypatch):
    trainer.config = dataclasses.replace(trainer.config, output_dir=str(tmp_path), checkpoints_total_limit=1)
    trainer.save_checkpoint(10, 20)
    saved = trainable_weights(trainer)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "save_file", failing_save_file)
        with pytest.raises(CheckpointSaveError, match=r"cannot save checkpoint-12 in .*: No space left on device") as info:
            trainer.save_checkpoint(12, 24)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == ["checkpoint-10"]  # no partial folder, the old one untouched and not pruned
    assert load_training_state(str(tmp_path / "checkpoint-10"), trainer.train_step, "scedit")["global_step"] == 10
    for key, value in saved_params(tmp_path / "checkpoint-10").items():
        np.testing.assert_array_equal(value, saved[key])

    trainer.save_checkpoint(14, 28)  # disk fine again: the limit keeps only the newest complete one
    assert os.listdir(tmp_path) == ["checkpoint-14"]


def test_kill_between_the_renames_of_a_replacing_save_restores_the_old_folder(tmp_path):
    (tmp_path / ".checkpoint-6.tmp-123.old").mkdir()  # checkpoint-6 moved aside, new one not yet in place
    (tmp_path / ".checkpoint-6.tmp-123.old" / "state.json").write_text("{}")
    (tmp_path / ".checkpoint-8.tmp-123").mkdir()  # an unfinished save
    remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6"]


def test_resume_from_a_checkpoint_of_another_method_is_refused_whole(
    trainer, tiny_model_dir, data_dir, tmp_path
):
    lora = Trainer(config_for(tiny_model_dir, data_dir, tmp_path / "lora", method="lora", learning_rate=1e-3)).build()
    lora.save_checkpoint(3, 3)
    lora_checkpoint = tmp_path / "lora" / "checkpoint-3"
    before = trainable_weights(trainer)

    trainer.config = dataclasses.replace(
        trainer.config, output_dir=str(tmp_path / "scedit"), resume_from_checkpoint=str(lora_checkpoint)
    )
    with pytest.raises(UserError, match=r"checkpoint-3 was saved by a 'lora' run; this run trains 'scedit'"):
        trainer.train()
    # Past the method check, the weights themselves do not fit: refused before anything is set.
    state = json.loads((lora_checkpoint / "state.json").read_text())
    (lora_checkpoint / "state.json").write_text(json.dumps(dict(state, method="scedit")))
    with pytest.raises(UserError, match=r"training_state.safetensors: missing 'param/.*tuner_op"):
        load_training_state(str(lora_checkpoint), trainer.train_step, "scedit")
    after = trainable_weights(trainer)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--learning_rte", "1e-4"], "unknown flag --learning_rte (did you mean 'learning_rate'?)"),
        (["--rank", "four"], "--rank: 'rank' must be an integer, got 'four'"),
        (["--learning_rate", "-1"], "learning_rate must be > 0, got -1.0"),
        (["--rank", "0"], "rank must be >= 1, got 0"),
        (["--resolution", "36"], "resolution must be a positive multiple of 8, got 36"),
        (["--jit_level", "O2"], "jit_level O2 needs an Ascend device; use O0 or O1 on CPU"),
        (["--mixed_precision", "bf16"], "mixed_precision bf16 needs an Ascend device (MindSpore's CPU has no bf16 "
                                        "MatMul kernel); check a bf16 step's types on CPU with: "
                                        "mindscedit bench --mixed_precision bf16 --compile_only"),
        (["--pretrained_model_name_or_path", "/nonexistent/sd"], "model folder not found: /nonexistent/sd"),
    ],
)
def test_cli_bad_input_is_one_error_line_before_any_model_loads(flags, message, tiny_model_dir, tmp_path, monkeypatch, capfd):
    if "/nonexistent/sd" not in flags:
        monkeypatch.setattr(trainer_module, "load_components", lambda *a: pytest.fail("a model was loaded"))
    args = ["train", "--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", str(PHOTOS16),
            "--output_dir", str(tmp_path / "out")] + flags
    assert main(args) == 2
    captured = capfd.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {message}"]


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_130(tiny_model_dir, tmp_path, monkeypatch, capfd):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "load_components", interrupted)
    out = tmp_path / "out"
    assert main(["train", "--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", str(PHOTOS16),
                 "--output_dir", str(out)]) == 130
    assert capfd.readouterr().err.strip().splitlines() == [
        "mindscedit train: interrupted (Ctrl-C); nothing more was written"]
    assert not out.exists() or not os.listdir(out)  # no config, log or checkpoint from a run that never started


def test_cli_model_folder_missing_a_subfolder(tiny_model_dir, tmp_path, capfd):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    args = ["train", "--pretrained_model_name_or_path", str(broken), "--train_data_dir", str(PHOTOS16),
            "--output_dir", str(tmp_path / "out"), "--device_target", "CPU"]
    assert main(args) == 2
    assert capfd.readouterr().err.strip().splitlines() == [f"error: model folder {broken} has no 'text_encoder/' subfolder"]


def test_the_first_stop_signal_names_the_stop():
    from mindscedit.training.trainer import StopRequest

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:  # a scheduler's SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
    with StopRequest() as stop:  # Ctrl-C, then the SIGTERM that dying loader workers can bring
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGINT"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_exits_0(tiny_model_dir, data_dir, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it (loader workers included)."""
    out = tmp_path / "out"
    cmd = cli_train(tiny_model_dir, data_dir, out, max_train_steps=1000, checkpointing_steps=1000)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        try:
            wait_for(lambda: len(logged_steps(out)) >= 2, proc, "two training steps")
            os.killpg(proc.pid, signal.SIGINT)
            stdout, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, open(tmp_path / "stderr.txt").read()[-3000:]
    last_step = logged_steps(out)[-1]["step"]
    # SIGINT, or SIGTERM when MindSpore's native handler caught the Ctrl-C first (seen under load,
    # see StopRequest): either way the step finishes, a checkpoint is saved and the exit is 0.
    assert re.search(r"stopped early: received SIG(INT|TERM); resume with the same command plus "
                     r"--resume_from_checkpoint latest", stdout), stdout
    assert f"stopped: step {last_step}," in stdout and f"checkpoint in {out / f'checkpoint-{last_step}'}" in stdout
    assert "done:" not in stdout and "weights in" not in stdout  # no final weights were written
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == [f"checkpoint-{last_step}"]


def test_a_second_run_into_a_folder_in_use_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch, capfd):
    import socket

    from mindscedit.training.run_lock import LOCK_FILE, OutputLock

    out = tmp_path / "busy"
    out.mkdir()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": running.pid, "host": socket.gethostname()}))
        monkeypatch.setattr(trainer_module, "load_components", lambda *a: pytest.fail("a model was loaded"))
        args = ["train", "--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", str(PHOTOS16),
                "--output_dir", str(out), "--device_target", "CPU"]
        assert main(args) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert err == [f"error: output_dir {out} is in use by a running training (pid {running.pid} on "
                       f"{socket.gethostname()}); use another output_dir, or stop that run first (if it is gone, "
                       f"delete {out / LOCK_FILE})"]
    finally:
        running.kill()
        running.wait()
    # Its process gone (as after SIGKILL), the lock is taken over; leaving releases it.
    with OutputLock(str(out)):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_a_fresh_run_into_another_methods_checkpoints_is_refused(tmp_path):
    from mindscedit.training.run_lock import check_checkpoints_fit

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "state.json").write_text(json.dumps({"global_step": 3, "method": "lora",
                                                                      "model": "/models/sd15"}))
    with pytest.raises(UserError, match=r"holds checkpoints of a run with method 'lora' \(this run: 'scedit'\); use "
                                        r"another output_dir, or resume them with --resume_from_checkpoint latest"):
        check_checkpoints_fit(str(tmp_path), "scedit", "/models/sd15", resuming=False)
    with pytest.raises(UserError, match=r"with model '/models/sd15' \(this run: '/models/sd21'\)"):
        check_checkpoints_fit(str(tmp_path), "lora", "/models/sd21", resuming=False)
    check_checkpoints_fit(str(tmp_path), "lora", "/models/sd15", resuming=False)  # the same run again: fine
    check_checkpoints_fit(str(tmp_path), "scedit", "/models/sd15", resuming=True)  # resume checks it whole itself
