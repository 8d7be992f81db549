"""Looking at a run: TensorBoard events while it trains, and loss.png from its logs.jsonl.

Both writers are optional dependencies, imported only when used, so the package (and training
without them) works where they are not installed: tensorboardX (`pip install
mindscedit[tensorboard]`, a maintained writer needing no deep-learning framework) and matplotlib
(`pip install mindscedit[plot]`).
"""
import glob
import importlib.util
import json
import logging
import math
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError

logger = logging.getLogger("mindscedit")

LOG_FILE = "logs.jsonl"
PLOT_FILE = "loss.png"
NEEDS_TENSORBOARDX = "report_to tensorboard needs tensorboardX: pip install tensorboardX (or mindscedit[tensorboard])"
NEEDS_MATPLOTLIB = "plotting the loss needs matplotlib: pip install matplotlib (or mindscedit[plot])"
# logs.jsonl key -> TensorBoard tag
SCALAR_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "s_per_step": "train/s_per_step",
    "img_per_s": "train/img_per_s",
    "loss_scale": "train/loss_scale",
    "skipped_steps": "train/skipped_steps",
    "validation_loss": "validation/loss",
}
# Keys under which a held-out (validation) loss may appear in a log row.
VALIDATION_LOSS_KEYS = ("validation_loss", "val_loss")
PLOT_SIZE = (8.0, 6.0)  # inches; at PLOT_DPI, an 800 x 600 PNG
PLOT_DPI = 100


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require_tensorboard() -> None:
    if not has_module("tensorboardX"):
        raise UserError(NEEDS_TENSORBOARDX)


class TensorBoardReporter:
    """Scalars and validation images as TensorBoard events in `logging_dir` (the main rank's only).

    A run that starts at `global_step` (a resume) marks its event file to purge the steps after
    it from earlier files, as the steps it repeats are logged again: TensorBoard shows each step
    once, like logs.jsonl after cut_log_back.
    """

    def __init__(self, logging_dir: str, global_step: int = 0):
        require_tensorboard()
        from tensorboardX import SummaryWriter

        os.makedirs(logging_dir, exist_ok=True)
        # File names carry the time to the second only; the suffix keeps two writers of one second apart
        # (and in order, as TensorBoard reads a folder's files in name order).
        self.writer = SummaryWriter(logdir=logging_dir, purge_step=global_step + 1, flush_secs=30,
                                    filename_suffix=f".{time.time_ns()}")

    def scalars(self, record: Dict) -> None:
        step = int(record["step"])
        for key, tag in SCALAR_TAGS.items():
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(tag, float(value), step)

    def images(self, folder: str, step: int) -> None:
        """The validation images a Validator wrote to `folder` (grids left out: TensorBoard shows the rest)."""
        from PIL import Image

        for path in sorted(glob.glob(os.path.join(folder, "*.png"))):
            name = os.path.splitext(os.path.basename(path))[0]
            if name.endswith("-grid"):
                continue
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"validation/{name}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- loss.png
def read_log(path: str) -> List[dict]:
    """The rows of a logs.jsonl (a torn last line, from a run killed while writing, is left out)."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: not a JSON row; left out", path, number)
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def smoothing_weight(num_points: int) -> float:
    """The EMA weight of the smoothed curve: about a tenth of the run, at most ~100 steps."""
    return min(0.99, max(0.0, 1.0 - 10.0 / max(num_points, 1)))


def smooth(values, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); non-finite values are passed over."""
    out = np.full(len(values), np.nan)
    average, norm = 0.0, 0.0
    for i, value in enumerate(values):
        if value is not None and math.isfinite(value):
            average = weight * average + (1.0 - weight) * value
            norm = weight * norm + (1.0 - weight)
        if norm:
            out[i] = average / norm
    return out


def _run_title(output_dir: str) -> str:
    config_path = os.path.join(output_dir, "train_config.json")
    title = os.path.basename(os.path.abspath(output_dir))
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError):
            return title
        model = os.path.basename(os.path.normpath(str(config.get("pretrained_model_name_or_path") or "?")))
        title = f"{config.get('method', '?')} on {model}: {title}"
    return title


def _series(rows: List[dict], keys) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding one of `keys` (the first present), as float arrays."""
    points = [(r["step"], next(r[k] for k in keys if r.get(k) is not None)) for r in rows
              if any(r.get(k) is not None for k in keys)]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def log_curves(rows: List[dict]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The curves of loss.png by name, each (steps, values), from logs.jsonl rows in step order."""
    rows = sorted(rows, key=lambda r: r["step"])
    steps = np.asarray([r["step"] for r in rows], dtype=float)
    loss = np.asarray([np.nan if r.get("loss") is None else r["loss"] for r in rows], dtype=float)
    return {
        "loss": (steps, loss),
        "loss (smoothed)": (steps, smooth(loss, smoothing_weight(len(loss)))),
        "validation loss": _series(rows, VALIDATION_LOSS_KEYS),
        "learning rate": _series(rows, ("lr",)),
    }


def _draw(curves, title: str, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    loss_axes.plot(*curves["loss"], color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    loss_axes.plot(*curves["loss (smoothed)"], color="tab:blue", linewidth=1.6, label="loss (smoothed)")
    if len(curves["validation loss"][0]):
        loss_axes.plot(*curves["validation loss"], "o-", color="tab:orange", markersize=3, label="validation loss")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper right", fontsize="small")
    lr_axes.plot(*curves["learning rate"], color="tab:green", linewidth=1.2)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for axes in (loss_axes, lr_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)


def plot_logs(output_dir: str, output: Optional[str] = None) -> str:
    """Write `output` (default output_dir/loss.png): loss raw and smoothed, validation loss where the log
    has it, and the learning rate, against the step. Returns the path written."""
    log_path = os.path.join(output_dir, LOG_FILE)
    if not os.path.isfile(log_path):
        raise UserError(f"no {LOG_FILE} in {output_dir}: is it a training output_dir?")
    rows = read_log(log_path)
    if not rows:
        raise UserError(f"{log_path} has no rows to plot yet")
    if not has_module("matplotlib"):
        raise UserError(NEEDS_MATPLOTLIB)
    path = output or os.path.join(output_dir, PLOT_FILE)
    _draw(log_curves(rows), _run_title(output_dir), path)
    return path


def plot_after_training(output_dir: str) -> Optional[str]:
    """loss.png at the end of a run when matplotlib is installed; never fails the run."""
    if not has_module("matplotlib"):
        logger.info("no loss.png: matplotlib is not installed (pip install matplotlib; then mindscedit plot-logs %s)",
                    output_dir)
        return None
    try:
        path = plot_logs(output_dir)
    except Exception as err:  # noqa: BLE001: a plot is a courtesy; the run's weights are what matter
        logger.warning("could not plot the loss: %s", err)
        return None
    logger.info("loss curve in %s", path)
    return path
