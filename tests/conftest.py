"""Shared fixtures: MindSpore on CPU in graph mode, a tiny diffusers-format pipeline, the photos."""
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")  # before MindSpore loads oneDNN
os.environ.setdefault("GLOG_v", "3")
if "MINDSCEDIT_COMPILE_CACHE" not in os.environ:  # tests (and their subprocesses) keep compiled steps out of ~
    import tempfile

    os.environ["MINDSCEDIT_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="mindscedit-compile-cache-")

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

PHOTOS16 = Path(__file__).resolve().parent.parent / "mindscedit" / "assets" / "photos16"


class GradientsAreInputs(ms.nn.Cell):
    """loss = sum(cw * w) + sum(cb * b): a step's gradients are its inputs (w starts at 0, b at 1)."""

    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.zeros(4, np.float32)), name="w")
        self.b = ms.Parameter(ms.Tensor(np.ones((2, 3), np.float32)), name="b")

    def construct(self, cw, cb):
        return (self.w * cw).sum() + (self.b * cb).sum()


@pytest.fixture
def gradients_are_inputs():
    return GradientsAreInputs()


class RecordingStep:
    """Stands in for a trainer's jitted step: records its inputs, returns a finite loss."""

    def __init__(self):
        self.calls = []
        self.grad_scaler = SimpleNamespace(all_finite=ms.Tensor(True))

    def __call__(self, *inputs):
        self.calls.append([x.asnumpy() for x in inputs])
        return None, ms.Tensor(0.5, ms.float32)


@pytest.fixture
def record_steps():
    """record_steps(trainer, keep_files=True): the trainer's step replaced by a RecordingStep (returned);
    with keep_files, saving is switched off too (the stub has no optimizer state to checkpoint)."""

    def stub(trainer, keep_files=True):
        trainer.train_step = RecordingStep()
        if keep_files:
            trainer.save_checkpoint = lambda *args: None
            trainer.save_final_weights = lambda: None
        return trainer.train_step
    return stub


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true",
                     help="run the selected tests in reverse order (tests must not depend on their order)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


def pytest_terminal_summary(terminalreporter):
    """This process's peak memory: scripts/run_tests.sh runs one file per process and the largest peak says how
    many files can run side by side."""
    import resource

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    terminalreporter.write_line(f"peak RSS {peak_gb:.1f} GB")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from mindscedit.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory):
    from mindscedit.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def photos_dir():
    return str(PHOTOS16)


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory):
    from mindscedit.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"), family="sdxl")


@pytest.fixture(scope="session")
def tiny_playground_model_dir(tmp_path_factory):
    """SDXL's layout with an EDM scheduler and a VAE with latents_mean / latents_std (Playground v2.5)."""
    from mindscedit.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-playground"), family="playground")
