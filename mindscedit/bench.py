"""`mindscedit bench`: the UNet training step of each method, measured one (method, batch) at a time.

What is timed: the jitted training step of the UNet alone, fed random latents and text embeddings
(no VAE, no text encoder, no data loading), as the PyTorch reference measurement does: noise added
with the SD schedule, the UNet, the epsilon MSE, backward over the method's trainable weights,
global-norm clipping and AdamW. It is the trainer's own step code (training.methods,
training.step), assembled by training.builder as the trainer assembles it, on the UNet alone.

Each case runs in its own Python process, so one case's memory (and compiled graphs) cannot
inflate the next one's. Peak memory is the worker's peak RSS on CPU (graph compilation included),
and the device memory pool's peak on Ascend. The first step is reported as the graph compile
time; s/step is the median over the timed steps that follow the warm-up steps. With
--compile_cache_dir the step is compiled through the trainer's compile cache, so a second bench
of the same cases measures what a repeated launch costs. With --compile_profile each row also
gets the first compile's phases as MindSpore's compile profile times them (`compile_phases_s`).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

from .errors import UserError
from .output_paths import check_output_path

ROW_MARKER = "BENCH_ROW "
# Bench flags that set a method's option -> that option (config field); a row gives each for the
# methods that read it.
METHOD_ROW_FIELDS = {"lora_rank": "rank", "lora_targets": "lora_target_modules", "dense_hint_kernel": "dense_hint_kernel"}


@dataclass
class BenchCase:
    method: str
    batch_size: int
    model: str  # a preset name (sd15, sd21, sdxl, mid, tiny) or a diffusers folder
    resolution: int = 512
    steps: int = 5
    warmup: int = 1
    lora_rank: int = 16
    lora_targets: str = "attn+ff"
    dense_hint_kernel: int = 3
    jit_level: str = "O0"
    mixed_precision: str = "no"
    device_target: str = "auto"
    seed: int = 0
    compile_cache_dir: Optional[str] = None
    compile_profile: bool = False
    compile_only: bool = False  # front end only: the step's types, for precisions the device cannot run


# ----------------------------------------------------------------------------- worker side
def build_model(model: str):
    """(UNet, noise scheduler, VAE downscale factor, model family) of a preset with random
    weights, or of a folder."""
    from .models import build_unet, unet_preset
    from .models.family import detect_family, family_of_unet
    from .models.loading import load_noise_scheduler, load_unet
    from .models.presets import SD_SCHEDULER, TINY_VAE

    if os.path.isdir(model):
        family = detect_family(model)
        unet = load_unet(model)
        noise_scheduler = load_noise_scheduler(model, family)  # an EDM folder's own: its step trains EDM-style
        with open(os.path.join(model, "vae", "config.json")) as f:
            vae_factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        return unet, noise_scheduler, vae_factor, family
    from mindone.diffusers import DDPMScheduler

    unet = build_unet(unet_preset(model))
    noise_scheduler = DDPMScheduler(**SD_SCHEDULER)  # SDXL's betas are SD's
    # The real configs sit behind SD's 8x VAE, the tiny one behind the tiny pipeline's VAE.
    vae_factor = 2 ** (len(TINY_VAE["block_out_channels"]) - 1) if model == "tiny" else 8
    return unet, noise_scheduler, vae_factor, family_of_unet(unet.config)


def peak_memory_mib(device_target: str):
    """(peak MiB, what was measured)."""
    if device_target == "Ascend":
        import mindspore as ms

        return ms.runtime.max_memory_allocated() / 2**20, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host RSS"  # ru_maxrss is KiB on Linux


def resident_mib() -> Optional[float]:
    """This process's RSS now (Linux), to split the peak into framework + models, compile and steps."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):
        return None


def bench_config(case: BenchCase):
    """The training config of a case: the trainer's settings for what the bench varies."""
    from .training.config import TrainConfig
    from .tuners.lora.config import LORA_TARGET_PRESETS

    return TrainConfig(method=case.method, seed=case.seed, rank=case.lora_rank,
                       lora_target_modules=list(LORA_TARGET_PRESETS[case.lora_targets]),
                       dense_hint_kernel=case.dense_hint_kernel, mixed_precision=case.mixed_precision,
                       jit_level=case.jit_level, learning_rate=1e-4, max_grad_norm=1.0,
                       max_train_steps=1 + case.warmup + case.steps)


def method_fields(case: BenchCase, method) -> dict:
    """The row's method settings: a case's value where the method reads it, None elsewhere."""
    return {row_key: getattr(case, row_key) if option in method.options else None
            for row_key, option in METHOD_ROW_FIELDS.items()}


def run_case(case: BenchCase) -> dict:
    """Build, compile and time one (method, batch) in this process."""
    import numpy as np
    import mindspore as ms

    from .losses import training_loss
    from .runtime import init_runtime
    from .training.builder import build_step
    from .training.compile_cache import compile_train_step
    from .training.methods import get_method
    from .training.step import compile_front_end

    runtime = init_runtime(case.device_target)
    ms.set_seed(case.seed)  # the same random UNet in every run
    unet, noise_scheduler, vae_factor, family = build_model(case.model)
    total = sum(p.size for p in unet.get_parameters())
    config = bench_config(case)
    method = get_method(config)
    diffusion_loss = training_loss(noise_scheduler, "epsilon")
    built = build_step(config, method, unet, diffusion_loss, config.learning_rate,
                       family=family)
    learning_rate = ms.Tensor(config.learning_rate, ms.float32)
    train_step, num_trainable = built.train_step, sum(p.size for p in built.trainable)

    rng = np.random.default_rng(case.seed)
    size = case.resolution // vae_factor
    b, channels = case.batch_size, unet.config.in_channels
    inputs = [
        ms.Tensor(rng.standard_normal((b, channels, size, size), dtype=np.float32)),  # latents
        ms.Tensor(rng.standard_normal((b, family.prompt_length, unet.config.cross_attention_dim), dtype=np.float32)),
        ms.Tensor(rng.standard_normal((b, channels, size, size), dtype=np.float32)),  # noise
    ]
    # The family's added conditions (SDXL: pooled prompt, time ids), then a condition image at full resolution.
    extra = tuple(ms.Tensor(v) for v in family.stand_in_added_values(unet.config, b, case.resolution, rng))
    if method.takes_condition:
        extra += (ms.Tensor(rng.uniform(0, 1, (b, 3, case.resolution, case.resolution)).astype(np.float32)),)
    row = dict(  # what every row says of its case, measured or not
        method=case.method, batch_size=b, model=case.model, resolution=case.resolution, latent_size=size,
        device=runtime.device_target, jit_level=case.jit_level, mixed_precision=case.mixed_precision,
        trainable_params=int(num_trainable), unet_params=int(total), trainable_pct=100.0 * num_trainable / total,
    )
    if case.compile_only:
        timesteps = ms.Tensor(rng.integers(0, diffusion_loss.num_train_timesteps, (b,), dtype=np.int32))
        start = time.perf_counter()
        compile_front_end(train_step, (*inputs, timesteps, *extra, learning_rate))
        return dict(row, compile_only=True, types="ok", front_end_s=round(time.perf_counter() - start, 3))
    times, cache, rss_phases = [], None, {}
    for _ in range(config.max_train_steps):
        timesteps = ms.Tensor(rng.integers(0, diffusion_loss.num_train_timesteps, (b,), dtype=np.int32))
        start = time.perf_counter()
        step_inputs = (*inputs, timesteps, *extra, learning_rate)
        if cache is None:  # the first step's time includes this compile, as in training
            rss_phases["rss_before_compile_mib"] = resident_mib()
            cache = compile_train_step(train_step, step_inputs, case.compile_cache_dir)
            rss_phases["rss_after_compile_mib"] = resident_mib()
            graph_seconds = time.perf_counter() - start  # compiled or loaded; the first run follows
        loss = float(train_step(*step_inputs)[1].asnumpy())  # asnumpy waits for the step to finish
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1 + case.warmup:])
    memory, memory_kind = peak_memory_mib(runtime.device_target)
    return dict(
        row,
        **method_fields(case, method),
        peak_memory_mib=round(memory, 1),
        memory_kind=memory_kind,
        **rss_phases,  # host RSS before and after compiling (the rest of the peak is the steps')
        compile_s=round(times[0], 3),
        graph_s=round(graph_seconds, 3),
        compile_cache=cache,
        s_per_step=seconds,
        img_per_s=b / seconds,
        timed_steps=case.steps,
        loss=loss,
    )


def worker_main(argv: List[str]) -> int:
    from .training.compile_cache import allow_in_this_process

    case = BenchCase(**json.loads(argv[0]))
    if case.compile_profile:  # MindSpore then prints each compile's phase times to stdout. Set
        try:  # first: later in the process it is ignored
            from .compat import compile_config
        except ImportError:  # a private module: the row then comes without phases
            print("bench: this MindSpore has no compile profile switch; no compile phases", file=sys.stderr)
        else:
            compile_config.COMPILE_PROFILE = "1"
    allow_in_this_process()  # a fresh process: the step is its first graph
    row = run_case(case)
    print(ROW_MARKER + json.dumps(row), flush=True)
    return 0


# ----------------------------------------------------------------------------- launcher side
def compile_phases(profile_output: str) -> dict:
    """Seconds per phase of the first compile in MindSpore's compile profile: the pipeline's
    top-level actions ("type_inference", "optimize", "task_emit", ...) and optimize's passes
    ("optimize.opt_a", ...), those of 0.05 s and more, plus "total"."""
    phases, in_profile, parent = {}, False, None
    for line in profile_output.splitlines():
        if line.startswith("TotalTime = "):
            if in_profile:
                break  # a later compile (the reload of a saved step)
            in_profile = True
            phases["total"] = round(float(line.split("=")[1].split(",")[0]), 3)
            continue
        if not in_profile:
            continue
        if line.startswith("Sums"):
            break
        indent = len(line) - len(line.lstrip(" "))
        name, _, rest = line.strip().partition("]: ")
        if not name.startswith("[") or indent not in (0, 4):
            continue
        try:
            seconds = float(rest.split(",")[0])
        except ValueError:
            continue
        name = name[1:]
        parent = name if indent == 0 else parent
        if seconds >= 0.05:
            phases[name if indent == 0 else f"{parent}.{name}"] = round(seconds, 3)
    return phases


def run_in_subprocess(case: BenchCase, timeout: Optional[float] = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "mindscedit.bench", json.dumps(asdict(case))],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3")),
    )
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_MARKER):
            row = json.loads(line[len(ROW_MARKER):])
            if case.compile_profile:
                row["compile_phases_s"] = compile_phases(proc.stdout)
            return row
    # The worker died (often out of memory: killed without a traceback).
    lines = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
    reason = lines[-1] if lines else f"exit status {proc.returncode}"
    return dict(method=case.method, batch_size=case.batch_size, model=case.model, resolution=case.resolution,
                error=f"exit status {proc.returncode}: {reason}")


def markdown_table(rows: List[dict]) -> str:
    lines = [
        "| method | batch | trainable params | peak memory (MiB) | compile (s) | s/step | img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch_size']} | failed: {r['error']} | | | | |")
            continue
        if r.get("compile_only"):
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['trainable_params'] / 1e6:.2f}M "
                         f"({r['trainable_pct']:.2f}%) | types ok (front end only) | {r['front_end_s']:.1f} | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['trainable_params'] / 1e6:.2f}M ({r['trainable_pct']:.2f}%) "
            f"| {r['peak_memory_mib']:.0f} ({r['memory_kind']}) "
            f"| {r['compile_s']:.1f}{' (cached)' if r.get('compile_cache') == 'hit' else ''} | {r['s_per_step']:.3f} "
            f"| {r['img_per_s']:.2f} |"
        )
    return "\n".join(lines)


def _int_list(flag: str, value: str) -> List[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{flag} must be a comma list of integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise UserError(f"--{flag} must list integers >= 1, got {value!r}")
    return numbers


def cases_from_args(args) -> List[BenchCase]:
    from .models import UNET_PRESETS
    from .models.loading import check_model_folder
    from .runtime import BF16_ON_CPU, FP16_ON_CPU, detect_device

    if bool(args.pretrained_model_name_or_path) == bool(args.model_config):
        raise UserError("give one of --pretrained_model_name_or_path or --model_config")
    if args.model_config and args.model_config not in UNET_PRESETS:
        raise UserError(f"--model_config: '{args.model_config}' is not one of {', '.join(UNET_PRESETS)}")
    if args.pretrained_model_name_or_path:
        check_model_folder(args.pretrained_model_name_or_path, ("unet", "scheduler", "vae"))
    from .training.methods import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: '{m}' is not one of {', '.join(METHODS)}")
    if args.resolution < 8 or args.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.steps < 1 or args.warmup < 0 or args.lora_rank < 1:
        raise UserError("--steps and --lora_rank must be >= 1 and --warmup >= 0")
    device = detect_device(args.device_target)
    if device == "CPU":
        if args.jit_level == "O2":
            raise UserError("jit_level O2 needs an Ascend device; use O0 or O1 on CPU")
        if args.mixed_precision == "bf16" and not args.compile_only:
            raise UserError(BF16_ON_CPU)
        if args.mixed_precision == "fp16" and not args.compile_only:
            print(f"bench: {FP16_ON_CPU}", file=sys.stderr)
    common = dict(
        model=args.pretrained_model_name_or_path or args.model_config, resolution=args.resolution,
        steps=args.steps, warmup=args.warmup, lora_rank=args.lora_rank, lora_targets=args.lora_targets,
        dense_hint_kernel=args.dense_hint_kernel,
        jit_level=args.jit_level, mixed_precision=args.mixed_precision, device_target=device,
        compile_cache_dir=args.compile_cache_dir or None, compile_profile=args.compile_profile,
        compile_only=args.compile_only,
    )
    return [BenchCase(method=m, batch_size=b, **common) for m in methods
            for b in _int_list("batch_sizes", args.batch_sizes)]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--pretrained_model_name_or_path", help="a diffusers folder (its unet/ and scheduler/)")
    model.add_argument("--model_config", help="a UNet config with random weights: sd15, sd21, sdxl, mid or tiny")
    parser.add_argument("--methods", default="vanilla,lora,scedit",
                        help="comma list of vanilla, lora, scedit, scedit_control, controlnet (the ControlNet baseline)")
    parser.add_argument("--batch_sizes", default="1")
    parser.add_argument("--resolution", type=int, default=512, help="image side; latents are 1/8 of it")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compile) step")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_targets", default="attn+ff", choices=["attn", "attn+ff"],
                        help="attention projections, or those and the feed-forward layers")
    parser.add_argument("--dense_hint_kernel", type=int, default=3, choices=[1, 3], help="scedit_control")
    parser.add_argument("--jit_level", default="O0", choices=["O0", "O1", "O2"])
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--device_target", default="auto", choices=["auto", "CPU", "Ascend"])
    parser.add_argument("--compile_cache_dir", default="",
                        help="compile through this compile cache (a second bench then measures a warm launch)")
    parser.add_argument("--compile_profile", action="store_true",
                        help="time the phases of each first compile (MindSpore's compile profile)")
    parser.add_argument("--compile_only", action="store_true",
                        help="compile each step's front end only (parse, type inference) and time nothing: checks "
                             "a precision the device has no kernels for, e.g. bf16 on CPU")
    parser.add_argument("--json", help="write one JSON line per (method, batch) here")


def run_bench(args) -> List[dict]:
    """Every (method, batch) in its own process; prints the table, writes the JSON lines."""
    cases = cases_from_args(args)
    if args.json:
        check_output_path(args.json, "--json", folder=False)
        open(args.json, "w").close()
    rows = []
    for case in cases:
        print(f"bench: {case.method}, batch {case.batch_size} ...", file=sys.stderr, flush=True)
        row = run_in_subprocess(case)
        rows.append(row)
        if args.json:  # row by row, so the finished cases survive a later crash
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    first = cases[0]
    what = "front-end compile (types only)" if first.compile_only else "UNet training step"
    print(f"\n{what}, {first.model}, {first.resolution}x{first.resolution} "
          f"({rows[0].get('latent_size', '?')}^2 latents), {first.device_target}, jit {first.jit_level}, "
          f"precision {first.mixed_precision}, median of {first.steps} steps")
    print(markdown_table(rows))
    for r in rows:
        if r.get("compile_phases_s"):
            phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in r["compile_phases_s"].items()
                               if name == "total" or seconds >= 0.5)  # the JSON line holds them all
            print(f"compile phases (s), {r['method']} batch {r['batch_size']}: {phases}")
    return rows


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
