"""Data-parallel training: 2 CPU workers under msrun against one process on the same global batch.
The runs are one epoch long (num_train_epochs, the step count derived from it per card) and report
to TensorBoard, which only rank 0 writes."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindscedit.training.config import load_config
from mindscedit.errors import UserError
from mindscedit.runtime import Runtime, init_runtime
from mindscedit.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "run_train_distributed.sh")
STEPS = 4  # one epoch: 16 photos // (2 per card x 2 cards), or // 4 in one process


def run_args(model_dir, data_dir, output_dir, batch_size):
    return dict(
        method="scedit",
        pretrained_model_name_or_path=model_dir,
        train_data_dir=data_dir,
        output_dir=str(output_dir),
        resolution=32,
        center_crop=True,
        random_flip=True,
        train_batch_size=batch_size,
        num_train_epochs=1,
        report_to="tensorboard",
        learning_rate=1e-3,
        checkpointing_steps=2,
        seed=3,
        device_target="CPU",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, args: dict, name: str):
    """scripts/run_train_distributed.sh --cpu (2 workers); returns the process and its log dir."""
    log_dir = tmp_path / f"{name}-logs"
    flags = [f"--{k}={v}" for k, v in args.items()]
    env = dict(os.environ, MINDSCEDIT_DUMP_RANK_WEIGHTS=str(tmp_path / f"{name}-dump"))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.run(
        ["bash", SCRIPT, "--cpu", "--port", str(free_port()), "--log_dir", str(log_dir), "--", *flags],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
    )
    return proc, log_dir


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir, photos_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("msrun")
    proc, log_dir = launch(tmp_path, run_args(tiny_model_dir, photos_dir, tmp_path / "out", 2), "ok")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SimpleNamespace(out=tmp_path / "out", dump=tmp_path / "ok-dump", logs=log_dir, stdout=proc.stdout)


@pytest.mark.slow
def test_ranks_end_with_identical_weights_on_disjoint_shards(two_workers):
    rank0, rank1 = (np.load(two_workers.dump / f"rank{k}.npz") for k in (0, 1))
    assert sorted(rank0.files) == sorted(rank1.files) and len(rank0.files) == 24
    for key in rank0.files:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    assert any(np.abs(rank0[k]).max() > 0 for k in rank0.files if k.endswith("ln2.weight"))  # it trained
    for k in (0, 1):
        log = (two_workers.logs / f"worker_{k}.log").read_text()
        assert f"rank {k} of 2: data shard {k}, 2 samples per card, global batch 4" in log
        assert f"done: step {STEPS}" in log
    assert "all 2 workers finished" in two_workers.stdout


@pytest.mark.slow
def test_only_rank0_writes_and_img_per_s_counts_all_cards(two_workers):
    out = two_workers.out
    plotted = ["loss.png"] if importlib.util.find_spec("matplotlib") else []  # drawn at the end, with matplotlib
    assert sorted(os.listdir(out)) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "checkpoint-2", "checkpoint-4", "logs", "logs.jsonl",
         "train_config.json"] + plotted
    )
    logs = [json.loads(line) for line in open(out / "logs.jsonl")]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]  # a second writer would append its own lines
    # TensorBoard: one writer (rank 0), every step once.
    assert len(os.listdir(out / "logs")) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], [r["loss"] for r in logs], rtol=1e-6)
    # The run's length in epochs counts each card's batches (16 samples // (2 x 2 cards)), said once.
    plan = "16 samples: 4 batches of 2 per card per epoch x 2 cards, 4 optimizer steps per epoch"
    said = [(two_workers.logs / f"worker_{k}.log").read_text() for k in (0, 1)]
    derived = "num_train_epochs 1 x 4 steps per epoch: max_train_steps 4 (1.00 epochs)"
    assert [plan in log for log in said] == [True, False] and [derived in log for log in said] == [True, False]
    for record in logs:
        assert record["img_per_s"] * record["s_per_step"] == pytest.approx(4.0)  # 2 per card x 2 cards
    saved = load_file(str(out / "adapter_model.safetensors"))
    rank0 = np.load(two_workers.dump / "rank0.npz")
    assert len(saved) == len(rank0.files)
    for key, value in saved.items():  # up_blocks.i.resnets.j.scetuner_default.X <- denoise.unet.up_blocks.i.tuners.j.X
        dumped = "denoise.unet." + key.replace(".resnets.", ".tuners.").replace(".scetuner_default", "")
        np.testing.assert_array_equal(value, rank0[dumped])


@pytest.mark.slow
def test_two_cards_match_one_process_on_the_global_batch(two_workers, tiny_model_dir, photos_dir, tmp_path):
    trainer = Trainer(load_config(None, run_args(tiny_model_dir, photos_dir, tmp_path / "single", 4)))
    assert trainer.train().global_step == STEPS
    single = np.load(trainer.dump_trainable(str(tmp_path / "single-dump")))
    rank0 = np.load(two_workers.dump / "rank0.npz")
    for key in single.files:
        # Adam moves each weight by ~lr per step; a different batch, noise or init differs by that much.
        np.testing.assert_allclose(rank0[key], single[key], rtol=1e-3, atol=5e-5, err_msg=key)


@pytest.mark.slow
def test_sdxl_trains_on_two_workers(tiny_sdxl_model_dir, photos_dir, tmp_path):
    """The SDXL step (pooled prompt, time ids) under msrun: the ranks' CSC-Tuner and SC weights stay
    identical through the all-reduce, and they trained."""
    args = dict(run_args(tiny_sdxl_model_dir, photos_dir, tmp_path / "out", 2), method="scedit_control",
                control_type="canny", num_train_epochs=None, max_train_steps=2, report_to="none")
    proc, log_dir = launch(tmp_path, {k: v for k, v in args.items() if v is not None}, "sdxl")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (np.load(tmp_path / "sdxl-dump" / f"rank{k}.npz") for k in (0, 1))
    assert sorted(rank0.files) == sorted(rank1.files) and rank0.files
    for key in rank0.files:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    # zero-initialised output projections of the adapters moved: the step trained
    assert any(np.abs(rank0[k]).max() > 0 for k in rank0.files if k.endswith("ln2.weight"))
    assert (tmp_path / "out" / "csc_tuner.safetensors").is_file()
    assert "done: step 2" in (log_dir / "worker_1.log").read_text()


@pytest.mark.slow
def test_a_failing_worker_fails_the_launcher_and_names_its_log(tiny_model_dir, photos_dir, tmp_path):
    args = run_args(tiny_model_dir, photos_dir, tmp_path / "out", 2)
    args["pretrained_model_name_or_path"] = str(tmp_path / "no-such-model")
    proc, log_dir = launch(tmp_path, args, "bad")
    assert proc.returncode != 0
    assert f"worker failed, see {log_dir}/worker_" in proc.stderr
    assert "model folder not found" in proc.stderr
    assert not (tmp_path / "out").exists()


def fed_inputs(record_steps, model_dir, data_dir, output_dir, batch_size, runtime, keep_files=True):
    trainer = Trainer(load_config(None, run_args(model_dir, data_dir, output_dir, batch_size)), runtime=runtime).build()
    step = record_steps(trainer, keep_files)
    assert trainer.train().global_step == STEPS
    return step.calls


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_each_rank_gets_its_slice_of_the_global_batch_and_noise(family, request, record_steps, photos_dir, tmp_path):
    """Pixels, captions, noise and timesteps (and SDXL's time ids) of rank 0 and rank 1 (2 each)
    concatenate to one process's 4; the learning rate is the same."""
    tiny_model_dir = request.getfixturevalue("tiny_sdxl_model_dir" if family == "sdxl" else "tiny_model_dir")
    single = fed_inputs(record_steps, tiny_model_dir, photos_dir, tmp_path / "single", 4, Runtime("CPU"))
    rank0 = fed_inputs(record_steps, tiny_model_dir, photos_dir, tmp_path / "rank0", 2, Runtime("CPU", rank=0, world_size=2))
    rank1_out = tmp_path / "rank1"
    # Rank 1 runs the real saving code: it must write nothing at all.
    rank1 = fed_inputs(record_steps, tiny_model_dir, photos_dir, rank1_out, 2, Runtime("CPU", rank=1, world_size=2), False)
    assert not rank1_out.exists()
    assert len(single) == len(rank0) == len(rank1) == STEPS
    assert len(single[0]) == (7 if family == "sdxl" else 6)  # pixels, ids, 3 x randomness, (time ids,) lr
    for whole, first, second in zip(single, rank0, rank1):
        assert whole[-1] == first[-1] == second[-1]  # the step's learning rate: the same on every card
        for w, a, b in zip(whole[:-1], first[:-1], second[:-1]):
            np.testing.assert_array_equal(w, np.concatenate([a, b]))
    first_pixels = [call[0] for call in rank0]
    second_pixels = [call[0] for call in rank1]
    assert not any(np.array_equal(a, b) for a in first_pixels for b in second_pixels)


def test_distributed_flag_without_a_launcher_is_one_line_error(monkeypatch):
    for name in ("MS_ROLE", "MS_WORKER_NUM", "RANK_TABLE_FILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="msrun"):
        init_runtime("CPU", distributed=True)


def test_msrun_environment_is_detected(monkeypatch):
    from mindscedit.runtime import launched_by_msrun

    for name in ("MS_ROLE", "MS_WORKER_NUM", "RANK_TABLE_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK_SIZE", "8")  # left over in a shell: not a launch by itself
    assert not launched_by_msrun()
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    for role in ("MS_WORKER", "MS_SCHED"):  # msrun runs the same command as its scheduler too
        monkeypatch.setenv("MS_ROLE", role)
        assert launched_by_msrun()
