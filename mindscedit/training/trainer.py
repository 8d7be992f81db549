"""The training loop: build everything from a TrainConfig, run the jitted step, log, checkpoint."""
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import mindspore as ms
from tqdm.auto import tqdm

from ..data import create_dataloader, iterate_batches, load_instance_records, load_records
from ..errors import UserError
from ..losses import training_loss
from ..models.family import trains_edm_style
from ..models.loading import load_components
from ..runtime import DTYPES, FP16_ON_CPU, Runtime, init_runtime
from ..tuners.textual_inversion import NewTokens, embeddings_file_name, new_rows_of, save_embeddings
from .builder import TEXT_GROUP, Encoders, build_step, text_lr_ratio
from .compile_cache import compile_train_step
from .config import TrainConfig, to_dict, validate
from .ema import ema_decay_from_config
from .held_out import HELD_OUT_STREAM, HeldOutLoss, split_held_out
from .checkpoint import (
    atomic_folder,
    load_training_state,
    prune_checkpoints,
    read_checkpoint_state,
    remove_stale_temporaries,
    resolve_resume,
    save_training_state,
)
from .methods import get_method
from .model_card import write_model_card
from .prior import generate_class_images, paired_batches
from .plan import plan_run, resolve_max_train_steps, select_samples
from .reporting import TensorBoardReporter, plot_after_training, require_tensorboard
from .run_lock import OutputLock, check_checkpoints_fit, check_output_dir_free
from .step import lr_schedule

logger = logging.getLogger("mindscedit")

RAW_WEIGHTS_FOLDER = "raw"  # with use_ema: output_dir holds the averaged weights, output_dir/raw the trained ones


@dataclass
class TrainResult:
    global_step: int
    losses: List[float] = field(default_factory=list)  # one per optimizer step of this run
    seconds_per_step: Optional[float] = None  # median, compile step excluded
    images_per_second: Optional[float] = None
    compile_seconds: Optional[float] = None
    compile_cache: Optional[str] = None  # "hit", "miss" or "off"
    stopped_early: Optional[str] = None
    diverged: bool = False  # stopped by max_nonfinite_steps: a failed run (the CLI exits 1)
    skipped_samples: int = 0  # bad rows dropped when loading + bad samples skipped by the loader


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the current step, save, and exit cleanly.

    MindSpore's runtime puts a native SIGINT handler of its own in place whenever it compiles a
    graph (Python still reports ours), and a Ctrl-C it catches reaches the process as a SIGTERM.
    The loop calls `reclaim()` after each step and each validation, which narrows that window but
    does not close it under load; the first signal names the stop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name = None

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def reclaim(self):
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


@dataclass
class Window:
    """What the steps since the last read did, as host values."""
    losses: List[float]  # one per optimizer step (the mean over its micro-steps)
    seconds: float  # wall time of those steps
    skipped: int  # how many of them were skipped (non-finite gradients)
    nonfinite_run: int  # non-finite steps in a row, up to the last one


class DeviceReadings:
    """Loss and skip counts of the steps run since the last read, fetched from the device in one go.

    The branch-free step counts skipped steps on the device; reading a Tensor makes the host wait
    for the device, so the loop reads only every logging_steps (and where it must: checkpoints,
    validation, a stop). A step without those counters (gradient accumulation, stand-ins) is
    asked for its finiteness flag after every optimizer step instead.
    """

    def __init__(self, train_step):
        self.train_step = train_step
        self.counted_on_device = isinstance(getattr(train_step, "skipped_steps", None), ms.Parameter)
        self.skipped_before = int(train_step.skipped_steps.asnumpy()) if self.counted_on_device else 0
        self.host_run = 0
        self.host_skipped = 0
        self.pending = []  # per optimizer step: its micro-steps' loss tensors
        self.restart_clock()

    def restart_clock(self):
        self.start = time.perf_counter()

    def add_step(self, loss_tensors) -> None:
        self.pending.append(loss_tensors)
        if not self.counted_on_device:
            finite = bool(self.train_step.grad_scaler.all_finite.asnumpy())
            finite = finite and all(np.isfinite(float(t.asnumpy())) for t in loss_tensors)
            self.host_run = 0 if finite else self.host_run + 1
            self.host_skipped += 0 if finite else 1

    def read(self) -> Window:
        losses = [float(np.mean([float(t.asnumpy()) for t in step])) for step in self.pending]
        if self.counted_on_device:
            total = int(self.train_step.skipped_steps.asnumpy())
            skipped, run = total - self.skipped_before, int(self.train_step.nonfinite_run.asnumpy())
            self.skipped_before = total
        else:
            skipped, run = self.host_skipped, self.host_run
            self.host_skipped = 0
        # A step whose loss is not finite counts as skipped even where the gradients looked finite.
        trailing = 0
        for loss in reversed(losses):
            if np.isfinite(loss):
                break
            trailing += 1
        window = Window(losses, time.perf_counter() - self.start, skipped, max(run, trailing))
        self.pending = []
        self.start = time.perf_counter()
        return window


def cut_log_back(path: str, step: int) -> None:
    """Drop the records after `step` from a log: the steps a resumed run repeats are logged once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def count_parameters(unet, trainable) -> str:
    total = sum(p.size for p in unet.get_parameters())
    n = sum(p.size for p in trainable)
    return f"trainable parameters: {n:,} ({n / 1e6:.2f}M, {100.0 * n / total:.3f}% of the UNet's {total / 1e6:.1f}M)"


class Trainer:
    def __init__(self, config: TrainConfig, runtime: Optional[Runtime] = None):
        self.config = config
        self.runtime = runtime or init_runtime(config.device_target, config.distributed)
        validate(config, self.runtime.device_target)
        if self.runtime.device_target == "CPU" and config.mixed_precision == "fp16" and self.runtime.is_main:
            logger.warning(FP16_ON_CPU)
        self.method = get_method(config)
        if self.runtime.is_main:  # before minutes of loading: what the folder holds may refuse the run
            check_output_dir_free(config.output_dir)
            check_checkpoints_fit(config.output_dir, config.method, self.model_id,
                                  resuming=bool(config.resume_from_checkpoint))
            resume_path = resolve_resume(config.output_dir, config.resume_from_checkpoint)
            if resume_path:  # its tensors are checked whole once the step exists to receive them
                read_checkpoint_state(resume_path, config.method, config.optimizer)
            if config.report_to == "tensorboard":
                require_tensorboard()

    @property
    def model_id(self) -> str:
        return os.path.abspath(self.config.pretrained_model_name_or_path)

    # ----------------------------------------------------------------- setup
    def build(self):
        c = self.config
        # Data first: a bad dataset path fails before minutes of model loading.
        self.num_bad_rows = 0
        self.records = self._read_records()
        self.held_out_records = []
        if c.validation_loss_samples:  # set aside first: neither the subset nor any card draws from them
            self.held_out_records, self.records = split_held_out(self.records, c.validation_loss_samples, c.seed)
            self._info("validation_loss_samples %d: %d samples held out with seed %d, never trained on",
                       c.validation_loss_samples, len(self.held_out_records), c.seed)
        if c.max_train_samples is not None and c.max_train_samples < len(self.records):
            self.records = select_samples(self.records, c.max_train_samples, c.seed)
            self._info("max_train_samples %d: training on %d samples chosen with seed %d (before splitting "
                       "between cards)", c.max_train_samples, len(self.records), c.seed)
        if c.repeats > 1:  # after the held-out split: no copy of a held-out sample is trained on
            self.records = self.records * c.repeats
            self._info("repeats %d: %d samples per epoch", c.repeats, len(self.records))
        self.plan = plan_run(c, len(self.records), self.runtime.world_size)
        for message in self.plan.messages:
            self._info("%s", message)
        # Before class images are generated: refusing snr_gamma must not cost minutes of sampling.
        folder_is_edm = trains_edm_style(c.pretrained_model_name_or_path)
        if folder_is_edm and c.snr_gamma is not None:
            raise UserError(f"snr_gamma: Min-SNR weighting is not defined for EDM-style training, which "
                            f"{c.pretrained_model_name_or_path} (an EDM scheduler) always uses; leave snr_gamma unset")
        self.new_tokens = self._new_tokens() if c.train_text_encoder_ti else None
        self.class_records = self._class_records() if c.with_prior_preservation else None
        self.components = comps = load_components(c.pretrained_model_name_or_path)
        self.family = comps.family
        prediction_type = c.prediction_type or comps.prediction_type
        prior_split = (c.train_batch_size, c.prior_loss_weight) if c.with_prior_preservation else None
        loss = training_loss(comps.noise_scheduler, prediction_type, c.snr_gamma, c.do_edm_style_training,
                             prior_split)
        if folder_is_edm or c.do_edm_style_training:
            self._info("EDM-style training on %s", "the folder's EDM sigmas and preconditioning" if folder_is_edm
                       else "the schedule's sigmas with Euler's preconditioning, loss weight sigma^-2")
        self.num_train_timesteps = loss.num_train_timesteps
        self.lrs = lr_schedule(self.plan.learning_rate, c.lr_scheduler, c.lr_warmup_steps, self.max_train_steps)
        text_trainable = self._prepare_text_side(comps)
        encoders = Encoders(comps.vae, self.family.prompt_encoder(comps), self.family.latent_scaling(comps.vae),
                            frozen=[comps.vae, *comps.text_encoders], trainable=text_trainable)
        built = build_step(c, self.method, comps.unet, loss, self.lrs[0], encoders, on_prepared=self._report_parameters,
                           family=self.family)
        self.train_step, self.trainable = built.train_step, built.trainable
        self.latent_channels = comps.unet.config.in_channels
        self.latent_size = c.resolution // comps.vae_scale_factor
        self.held_out_loss = self._build_held_out_loss() if self.held_out_records and self.runtime.is_main else None
        self.validator = None
        if c.validation_prompt and self.runtime.is_main:
            from ..sampling import Validator

            self.validator = Validator(comps, c.validation_prompt, c.output_dir, c.resolution,
                                       c.num_validation_images, c.seed, **self.method.validation_inputs(c.resolution))
        return self

    def _read_records(self):
        """The dataset's records, or DreamBooth's instance images captioned with the instance prompt."""
        c = self.config
        options = dict(on_bad_record=self._skip_bad_row if c.on_bad_sample == "skip" else None,
                       condition_column=c.conditioning_image_column if self.method.takes_condition else None)
        if c.instance_data_dir:
            return load_instance_records(c.instance_data_dir, c.instance_prompt, c.image_column, c.caption_column,
                                         **options)
        return load_records(c.data_source, c.image_column, c.caption_column, **options)

    def _new_tokens(self) -> NewTokens:
        """Pivotal tuning's tokens; a run whose prompts never use them would train nothing there."""
        c = self.config
        new_tokens = NewTokens.for_abstractions(c.token_abstraction, c.num_new_tokens_per_abstraction)
        prompts = [caption for r in self.records
                   for caption in ([r.caption] if isinstance(r.caption, str) else r.caption)]
        if not any(new_tokens.mentioned_in(prompt) for prompt in prompts):
            where = "instance_prompt" if c.instance_data_dir else "the captions"
            raise UserError(f"train_text_encoder_ti: {where} never use token_abstraction '{c.token_abstraction}' "
                            f"(e.g. instance_prompt 'a photo of {c.token_abstraction.split(',')[0]} dog')")
        self._info("pivotal tuning: %s; their embeddings train for the first %d of %d steps",
                   ", ".join(f"{word} -> {''.join(tokens)}" for word, tokens in new_tokens.abstractions),
                   self.pivot_step, self.max_train_steps)
        return new_tokens

    def _prepare_text_side(self, comps) -> list:
        """What trains in the text encoders: pivotal tuning's new token rows, or the method's text-encoder LoRA."""
        c = self.config
        if self.new_tokens is not None:
            return comps.add_new_tokens(self.new_tokens, seed=c.seed)
        if not c.train_text_encoder:
            return []
        ms.set_seed(c.seed)  # the adapters' initialisation, the same on every rank
        params = self.method.prepare_text_encoders(dict(zip(self.family.text_encoders, comps.text_encoders)))
        self._info("train_text_encoder: LoRA on %s, %s trainable parameters, for the first %d of %d steps",
                   " and ".join(self.family.text_encoders), f"{sum(p.size for p in params):,}", self.pivot_step,
                   self.max_train_steps)
        return params

    @property
    def trains_text(self) -> bool:
        return self.config.train_text_encoder_ti or self.config.train_text_encoder

    @property
    def pivot_step(self) -> int:
        """Steps before it train the text side (new embeddings, text-encoder LoRA); from it on only the UNet's
        weights train."""
        c = self.config
        fraction = c.train_text_encoder_ti_frac if c.train_text_encoder_ti else c.train_text_encoder_frac
        return int(fraction * self.max_train_steps)

    def _set_text_training(self, global_step: int) -> None:
        """The text side's learning-rate multiple for the step after `global_step`: 0 from the pivot on (set on the
        host each step, so a resumed run is on the right side of the pivot without saving it)."""
        if not self.trains_text:
            return
        c = self.config
        training = global_step < self.pivot_step
        optimizer = self.train_step.optimizer
        if not training and optimizer.host_lr_scales[TEXT_GROUP] != 0.0:
            self._info("step %d: pivot; %s stop training, the %s weights go on", global_step,
                       "the new tokens' embeddings" if c.train_text_encoder_ti else "the text-encoder LoRA", c.method)
        optimizer.set_group_lr_scale(TEXT_GROUP, text_lr_ratio(c) if training else 0.0)

    def _save_weights(self, folder: str) -> None:
        """The method's weights, and pivotal tuning's embeddings as <output name>_emb.safetensors."""
        self.method.save_weights(self.components.unet, folder)
        if self.new_tokens is not None:
            save_embeddings(os.path.join(folder, embeddings_file_name(self.config.output_dir)),
                            new_rows_of(self.components.text_encoders), self.new_tokens)

    def _class_records(self):
        """Prior preservation's class images, generated from the base model where missing (prior.py)."""
        c, rt = self.config, self.runtime
        made = generate_class_images(c.pretrained_model_name_or_path, c.class_data_dir, c.class_prompt,
                                     c.num_class_images, c.sample_batch_size, c.resolution, c.seed,
                                     DTYPES[c.mixed_precision], rt.rank, rt.world_size)
        records = load_instance_records(c.class_data_dir, c.class_prompt)
        self._info("prior preservation: %d class images in %s (%d generated by this run), prior_loss_weight %g",
                   len(records), c.class_data_dir, made, c.prior_loss_weight)
        return records

    def _build_held_out_loss(self) -> HeldOutLoss:
        """The held-out samples loaded as training loads them (no flip), with fixed randomness."""
        from ..data.dataset import ImageTransform, TextImageDataset, encode_sample_key

        c, records = self.config, self.held_out_records
        dataset = TextImageDataset(records, ImageTransform(c.resolution, c.center_crop, False),
                                   self.family.prompt_tokenizer(self.components), c.seed, c.on_bad_sample,
                                   self.method.condition_spec, self.family)
        samples = [dataset[encode_sample_key(0, k, len(records))] for k in range(len(records))]
        # The dataset gives (pixels, ids[, condition], *size conditions); the step takes the size
        # conditions before the condition image.
        end = 3 if self.method.takes_condition else 2
        samples = [sample[:2] + sample[end:] + sample[2:end] for sample in samples]

        def draw(k):
            return self._draw_sample(np.random.default_rng([c.seed, HELD_OUT_STREAM, k]))

        return HeldOutLoss(self.train_step.model, samples, draw)

    def _info(self, *args):
        if self.runtime.is_main:
            logger.info(*args)

    def _report_parameters(self, trainable):
        if self.runtime.is_main:
            logger.info("%s: %s", self.config.method, count_parameters(self.components.unet, trainable))

    def _skip_bad_row(self, error):
        self.num_bad_rows += 1
        logger.warning("skipping bad row: %s", error)

    # ----------------------------------------------------------------- randomness
    def draw_randomness(self, micro_step: int, batch_size: int):
        """This rank's noise and timesteps of one micro-step.

        Sample k of the global batch (rank r holds samples r*b .. r*b+b-1, as the sampler gives
        it the r-th block of the global batch) draws from its own generator keyed by
        (seed, micro_step, k), so each rank draws only its own samples, and N cards x b samples
        see exactly what one process with N*b samples sees.
        """
        c, rt = self.config, self.runtime
        draws = [self._draw_sample(np.random.default_rng([c.seed, micro_step, k]))
                 for k in range(rt.rank * batch_size, (rt.rank + 1) * batch_size)]
        latent_eps, noise, timesteps = zip(*draws)
        return tuple(ms.Tensor(a) for a in (np.stack(latent_eps), np.stack(noise), np.array(timesteps, np.int32)))

    def _draw_sample(self, rng):
        """One sample's VAE posterior noise, diffusion noise (with the noise offset) and timestep."""
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        latent_eps = rng.standard_normal(shape, dtype=np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if self.config.noise_offset:
            noise += self.config.noise_offset * rng.standard_normal(shape[:1] + (1, 1), dtype=np.float32)
        return latent_eps, noise, rng.integers(0, self.num_train_timesteps, dtype=np.int32)

    # ----------------------------------------------------------------- saving
    def save_checkpoint(self, global_step: int, micro_step: int) -> Optional[str]:
        if not self.runtime.is_main:
            return None
        c = self.config
        path = os.path.join(c.output_dir, f"checkpoint-{global_step}")
        with atomic_folder(path) as tmp:
            self._save_weights(tmp)
            save_training_state(
                tmp, self.train_step,
                {"global_step": global_step, "micro_step": micro_step, "method": c.method, "optimizer": c.optimizer,
                 "model": self.model_id, "seed": c.seed},
            )
        prune_checkpoints(c.output_dir, c.checkpoints_total_limit)
        return path

    @property
    def ema(self):
        """The step's EMA of the trained weights (EMAWeights), or None."""
        return getattr(self.train_step, "ema", None)

    def validation_weights(self):
        """A context in which the trained weights are those validation uses (the EMA's with validation_use_ema)."""
        if self.config.validation_use_ema and self.ema is not None:
            return self.ema.swapped_in(self.train_step.parameters)
        return contextlib.nullcontext()

    def evaluate_held_out(self) -> float:
        with self.validation_weights():
            return self.held_out_loss.evaluate()

    def save_final_weights(self) -> None:
        """The method's weights at the top of output_dir, each file replaced in one rename. With an EMA those
        are the averaged weights, and the trained ones go to output_dir/raw in the same layout."""
        if not self.runtime.is_main:
            return
        out = self.config.output_dir
        with atomic_folder(os.path.join(out, ".final")) as tmp:
            if self.ema is None:
                self._save_weights(tmp)
            else:
                os.makedirs(os.path.join(tmp, RAW_WEIGHTS_FOLDER))
                self._save_weights(os.path.join(tmp, RAW_WEIGHTS_FOLDER))
                with self.ema.swapped_in(self.train_step.parameters):
                    self._save_weights(tmp)
            if self.config.instance_data_dir:  # a DreamBooth run: how to use it, with its trigger words
                write_model_card(tmp, self.config, self.method, self.family, self.max_train_steps,
                                 self.plan.learning_rate, self.new_tokens)
        final = os.path.join(out, ".final")
        for name in os.listdir(final):
            target = os.path.join(out, name)
            if os.path.isdir(target) and not os.path.islink(target):
                os.rename(target, target + ".old")
                os.rename(os.path.join(final, name), target)
                shutil.rmtree(target + ".old", ignore_errors=True)
            else:
                os.replace(os.path.join(final, name), target)
        os.rmdir(final)

    def dump_trainable(self, folder: str) -> str:
        """This rank's trainable weights as `folder/rank<K>.npz`, keyed by their path in the training
        network as checkpoints key them (so CSC-Tuner weights, outside the UNet, are included)."""
        os.makedirs(folder, exist_ok=True)
        keep = {id(p) for p in self.trainable}
        weights = {n: p.asnumpy() for n, p in self.train_step.model.parameters_and_names() if id(p) in keep}
        path = os.path.join(folder, f"rank{self.runtime.rank}.npz")
        np.savez(path, **weights)
        return path

    @property
    def max_train_steps(self) -> int:
        """The run's optimizer steps, from the current config (tests swap it between runs) and the data."""
        return resolve_max_train_steps(self.config.max_train_steps, self.config.num_train_epochs,
                                       self.plan.update_steps_per_epoch)

    def _loss_scale(self) -> Optional[float]:
        scaler = getattr(getattr(self.train_step, "grad_scaler", None), "loss_scaler", None)
        value = getattr(scaler, "scale_value", None)
        return float(value.asnumpy()) if value is not None else None

    # ----------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Train to max_train_steps (or a stop), holding output_dir's lock on the main rank."""
        if not hasattr(self, "train_step"):
            self.build()
        if not self.runtime.is_main:
            return self._train()
        os.makedirs(self.config.output_dir, exist_ok=True)
        with OutputLock(self.config.output_dir):
            return self._train()

    def _train(self) -> TrainResult:
        c, rt = self.config, self.runtime
        accum = c.gradient_accumulation_steps
        if rt.is_main:
            remove_stale_temporaries(c.output_dir)
            check_checkpoints_fit(c.output_dir, c.method, self.model_id, resuming=bool(c.resume_from_checkpoint))

        global_step = micro_step = 0
        resume_path = resolve_resume(c.output_dir, c.resume_from_checkpoint)
        if resume_path:
            state = load_training_state(resume_path, self.train_step, c.method, c.optimizer)
            global_step, micro_step = state["global_step"], state["micro_step"]
            logger.info("resumed from %s at step %d", resume_path, global_step)
        elif c.resume_from_checkpoint:
            logger.info("resume_from_checkpoint latest: no checkpoint in %s yet; starting from step 0", c.output_dir)
        if rt.is_main:  # only once the resume (if any) succeeded: a refused one leaves the folder as it was
            with open(os.path.join(c.output_dir, "train_config.json"), "w") as f:
                json.dump(to_dict(c), f, indent=2)
            cut_log_back(os.path.join(c.output_dir, "logs.jsonl"), global_step)
        result = TrainResult(global_step=global_step, skipped_samples=self.num_bad_rows)
        if global_step >= self.max_train_steps:
            return result

        loader = create_dataloader(
            self.records, self.family.prompt_tokenizer(self.components), c.resolution, c.train_batch_size,
            center_crop=c.center_crop, random_flip=c.random_flip, shuffle=True, seed=c.seed,
            num_shards=rt.world_size, shard_id=rt.rank, start_step=micro_step,
            num_workers=c.dataloader_num_workers, on_bad_sample=c.on_bad_sample,
            condition=self.method.condition_spec, family=self.family,  # the family's size conditions, if any
        )
        batches = iterate_batches(loader)
        samples_per_batch = c.train_batch_size
        if self.class_records is not None:  # each batch: the instance samples, then as many class images
            class_loader = create_dataloader(
                self.class_records, self.family.prompt_tokenizer(self.components), c.resolution, c.train_batch_size,
                center_crop=c.center_crop, random_flip=c.random_flip, shuffle=True, seed=c.seed + 1,
                num_shards=rt.world_size, shard_id=rt.rank, start_step=micro_step,
                num_workers=c.dataloader_num_workers, on_bad_sample=c.on_bad_sample, family=self.family)
            batches = paired_batches(batches, iterate_batches(class_loader))
            samples_per_batch *= 2
        images_per_step = samples_per_batch * accum * rt.world_size
        if rt.world_size > 1:
            logger.info(
                "rank %d of %d: data shard %d, %d samples per card, global batch %d (x%d accumulation)",
                rt.rank, rt.world_size, rt.rank, c.train_batch_size, c.train_batch_size * rt.world_size, accum,
            )
        log_file = open(os.path.join(c.output_dir, "logs.jsonl"), "a") if rt.is_main else None
        reporter = None
        if rt.is_main and c.report_to == "tensorboard":
            reporter = TensorBoardReporter(c.tensorboard_dir, global_step)
            logger.info("TensorBoard events in %s (tensorboard --logdir %s)", c.tensorboard_dir, c.tensorboard_dir)
        # A progress bar on a terminal; in a log file plain lines every logging_steps instead of redraws.
        interactive = sys.stderr.isatty()
        progress = tqdm(total=self.max_train_steps, initial=global_step, disable=not (rt.is_main and interactive),
                        desc="train")
        readings = DeviceReadings(self.train_step)
        step_times = []  # seconds per optimizer step, averaged over each read window
        window_losses = []  # loss tensors of the current optimizer step's micro-steps
        try:
            with StopRequest() as stop:
                for batch in batches:
                    randomness = self.draw_randomness(micro_step, samples_per_batch)
                    condition = (ms.Tensor(batch["condition"]),) if "condition" in batch else ()
                    size_values = tuple(ms.Tensor(batch[name]) for name in self.family.size_conditions)
                    learning_rate = ms.Tensor(self.lrs[global_step], ms.float32)  # of the step under way
                    self._set_text_training(global_step)
                    ema_decay = (ms.Tensor(ema_decay_from_config(c, global_step + 1), ms.float32),) if c.use_ema else ()
                    inputs = (ms.Tensor(batch["pixel_values"]), ms.Tensor(batch["input_ids"]), *randomness,
                              *size_values, *condition, *ema_decay, learning_rate)
                    if result.compile_cache is None:
                        result.compile_cache = compile_train_step(
                            self.train_step, inputs, c.compile_cache_dir, rt.rank, rt.world_size)
                    _, loss = self.train_step(*inputs)
                    stop.reclaim()
                    micro_step += 1
                    result.skipped_samples += int(batch["num_skipped"].sum())
                    window_losses.append(loss)
                    if micro_step % accum:
                        continue

                    global_step += 1
                    readings.add_step(window_losses)
                    window_losses = []
                    progress.update(1)
                    log_now = global_step % c.logging_steps == 0 or global_step == self.max_train_steps
                    # Decided from the config, the same on every rank (only the main one validates): the
                    # device is read, and an early stop seen, at the same steps on all ranks.
                    validation_step = bool(c.validation_prompt) and global_step % c.validation_steps == 0
                    held_out_step = bool(c.validation_loss_samples) and (
                        global_step % c.validation_steps == 0 or global_step >= self.max_train_steps)
                    validate_now = self.validator is not None and validation_step
                    held_out_now = self.held_out_loss is not None and held_out_step
                    log_now = log_now or held_out_step  # the held-out loss goes into that step's log row
                    checkpoint_now = global_step % c.checkpointing_steps == 0 or global_step >= self.max_train_steps
                    # Device values reach the host only here, so between reads the host prepares
                    # the next steps while the device runs the queued ones.
                    if log_now or validation_step or checkpoint_now or stop.signal_name or result.compile_seconds is None:
                        window = readings.read()
                        result.losses.extend(window.losses)
                        if result.compile_seconds is None:
                            result.compile_seconds = window.seconds
                        else:
                            step_times.extend([window.seconds / len(window.losses)] * len(window.losses))
                        if log_now and rt.is_main:
                            record = {
                                "step": global_step,
                                "loss": window.losses[-1],
                                "lr": float(self.lrs[global_step - 1]),
                                "s_per_step": window.seconds / len(window.losses),
                                "img_per_s": images_per_step * len(window.losses) / window.seconds,
                                "skipped": window.nonfinite_run > 0,
                                "skipped_steps": window.skipped,
                                "loss_scale": self._loss_scale(),
                            }
                            if held_out_now:
                                record["validation_loss"] = self.evaluate_held_out()
                                stop.reclaim()
                                readings.restart_clock()  # evaluating is not training step time
                                logger.info("step %d: validation loss %.4f (%d held-out samples)", global_step,
                                            record["validation_loss"], len(self.held_out_loss))
                            log_file.write(json.dumps(record) + "\n")
                            log_file.flush()
                            if reporter:
                                reporter.scalars(record)
                            progress.set_postfix(loss=f"{window.losses[-1]:.4f}", s_step=f"{record['s_per_step']:.3f}")
                            if not interactive:
                                logger.info("step %d/%d: loss %.4f, lr %.3g, %.3f s/step, %.2f img/s", global_step,
                                            self.max_train_steps, record["loss"], record["lr"], record["s_per_step"],
                                            record["img_per_s"])
                        if window.nonfinite_run >= c.max_nonfinite_steps:
                            # The skipped steps left the weights alone: the checkpoint holds the last good ones.
                            result.stopped_early = (
                                f"{window.nonfinite_run} consecutive non-finite steps (max_nonfinite_steps); "
                                f"the weights are those of step {global_step - window.nonfinite_run}"
                            )
                            result.diverged = True
                        elif stop.signal_name:
                            result.stopped_early = f"received {stop.signal_name}"
                    done = global_step >= self.max_train_steps or result.stopped_early
                    if done or global_step % c.checkpointing_steps == 0:
                        self.save_checkpoint(global_step, micro_step)
                        readings.restart_clock()  # saving time is not training step time
                    if validate_now:
                        with self.validation_weights():
                            folder = self.validator(global_step)
                        stop.reclaim()
                        if reporter and folder:
                            reporter.images(folder, global_step)
                        readings.restart_clock()  # nor is sampling time
                    if done:
                        break
        finally:
            progress.close()
            if log_file:
                log_file.close()
            if reporter:
                reporter.close()

        if result.skipped_samples:
            logger.warning("%d bad samples were skipped (each named in a warning above)", result.skipped_samples)
        if result.stopped_early:
            logger.warning("stopped at step %d: %s; checkpoint saved", global_step, result.stopped_early)
        else:
            self.save_final_weights()
        if rt.is_main:
            plot_after_training(c.output_dir)
        dump_dir = os.environ.get("MINDSCEDIT_DUMP_RANK_WEIGHTS")
        if dump_dir:  # debugging aid: every rank's trainable weights, to check that ranks stay in sync
            self.dump_trainable(dump_dir)
        result.global_step = global_step
        if step_times:
            result.seconds_per_step = statistics.median(step_times)
            result.images_per_second = images_per_step / result.seconds_per_step
        return result
