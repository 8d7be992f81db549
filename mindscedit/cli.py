"""`mindscedit` command line: train, plot-logs, sample, annotate, make-tiny-model, check-data, bench, convert,
merge-lora.

Exit codes: 0 done (train also after SIGINT/SIGTERM, which save a checkpoint first); 1 a run
stopped by max_nonfinite_steps, check-data found problems, or a bench case crashed; 2 bad input
(one line `error: ...` naming the file, row, key or flag); 3 an unexpected failure (one line;
`mindscedit --debug <command> ...` shows the traceback); 130 Ctrl-C before train's own stop handler
is in place (while loading) or in any other command.
"""
import argparse
import logging
import os
import sys

from .errors import UserError
from .output_paths import check_output_path


def _setup_logging():
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's own log: errors only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mindone").setLevel(logging.WARNING)  # its import-time notices ("Flash attention is available")


def config_overrides(args) -> dict:
    """The config keys given as train flags."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "subparser", "debug")}


def cmd_train(args):
    from .training.config import load_config

    config = load_config(args.config, config_overrides(args))
    check_output_path(config.output_dir, "output_dir")
    if config.report_to == "tensorboard":
        check_output_path(config.tensorboard_dir, "logging_dir")
    if config.compile_cache_dir:  # a cache that cannot be written would be switched off without a word
        check_output_path(os.path.expanduser(config.compile_cache_dir), "compile_cache_dir")
    from .training.compile_cache import allow_in_this_process
    from .training.trainer import Trainer

    allow_in_this_process()  # nothing is compiled yet in this process
    result = Trainer(config).train()
    summary = [f"step {result.global_step}"]
    if result.losses:
        summary.append(f"final loss {result.losses[-1]:.4f}")
    if result.seconds_per_step:
        summary.append(f"{result.seconds_per_step:.3f} s/step")
        summary.append(f"{result.images_per_second:.2f} img/s")
    if result.compile_seconds:
        cache = {"hit": ", from the compile cache", "miss": ", saved to the compile cache"}.get(result.compile_cache, "")
        summary.append(f"first step (graph compile{cache}) {result.compile_seconds:.1f} s")
    if result.skipped_samples:
        summary.append(f"{result.skipped_samples} bad samples skipped")
    if result.stopped_early:
        checkpoint = os.path.join(config.output_dir, f"checkpoint-{result.global_step}")
        print("stopped: " + ", ".join(summary) + f"; checkpoint in {checkpoint}")
        print(f"stopped early: {result.stopped_early}; resume with the same command plus "
              "--resume_from_checkpoint latest")
    else:
        print("done: " + ", ".join(summary) + f"; weights in {config.output_dir}")
    return 1 if result.diverged else 0


def cmd_plot_logs(args):
    from .training.reporting import plot_logs

    if not os.path.isdir(args.output_dir):
        raise UserError(f"{args.output_dir} is not a folder")
    if args.output:
        check_output_path(args.output, "--output", folder=False)
    print(f"loss curve written to {plot_logs(args.output_dir, args.output)}")


def cmd_check_data(args):
    from .data.check import check_dataset

    if args.resolution is not None and args.resolution <= 0:
        raise UserError(f"--resolution must be positive, got {args.resolution}")
    report = check_dataset(args.path, args.image_column, args.caption_column, args.resolution)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 1 if report.problems else 0


def cmd_annotate(args):
    """Preview a built-in condition: the image as the CSC-Tuner will see it."""
    import numpy as np
    from PIL import Image

    from .data.conditions import annotate
    from .data.transforms import decode_image, to_rgb

    if args.low_threshold > args.high_threshold:
        raise UserError(f"--low_threshold ({args.low_threshold}) is above --high_threshold ({args.high_threshold})")
    check_output_path(args.output, "output", folder=False)
    image = to_rgb(decode_image(args.input, args.input))
    if args.resolution:
        scale = args.resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    options = {"low_threshold": args.low_threshold, "high_threshold": args.high_threshold} if args.type == "canny" else {}
    condition = annotate(args.type, np.asarray(image), np.random.default_rng(args.seed), **options)
    Image.fromarray(condition).save(args.output)
    print(f"{args.type} condition written to {args.output}")


def cmd_make_tiny_model(args):
    from .models import make_tiny_model

    check_output_path(args.output_dir, "output_dir")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        raise UserError(f"output_dir {args.output_dir} is not empty; give a new or empty folder")
    make_tiny_model(args.output_dir, prediction_type=args.prediction_type, seed=args.seed, family=args.family)
    print(f"tiny {args.family} {args.prediction_type} pipeline written to {args.output_dir}")


def cmd_sample(args):
    from .sampling.command import run_sample

    check_output_path(args.output_dir, "--output_dir")
    written = run_sample(args)
    print(f"wrote {len(written['images'])} images and {len(written['grids'])} grids to {args.output_dir}")


def cmd_bench(args):
    from .bench import run_bench

    rows = run_bench(args)
    return 1 if any("error" in row for row in rows) else 0  # a case that crashed (e.g. out of memory)


def cmd_convert(args):
    from .convert import convert

    if args.resnets_per_block < 1:
        raise UserError(f"--resnets_per_block must be >= 1, got {args.resnets_per_block}")
    check_output_path(args.output, "output", folder=not args.output.endswith(".safetensors"))
    written = convert(args.src_format, args.dst_format, args.input, args.output, args.resnets_per_block,
                      args.family)
    print(f"{args.src_format} -> {args.dst_format}: wrote {written}")


# merge-lora's combinations (mindscedit.tuners.lora.merge.COMBINATIONS; listed here so that building
# the parser does not import MindSpore)
MERGE_COMBINATIONS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd", "ties_svd",
                      "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MERGE_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def cmd_merge_lora(args):
    combination = args.combination
    weights = args.weights if args.weights is not None else [1.0] * len(args.inputs)
    if len(args.inputs) < 2:
        raise UserError(f"merge-lora needs at least two LoRA files, got {len(args.inputs)}")
    if len(weights) != len(args.inputs):
        raise UserError(f"--weights has {len(weights)} values for {len(args.inputs)} LoRA files")
    base = combination[: -len("_svd")] if combination.endswith("_svd") else combination
    if base in MERGE_PRUNING and args.density is None:
        raise UserError(f"--combination {combination} needs --density (the fraction of entries kept, in [0, 1])")
    if base not in MERGE_PRUNING and args.density is not None:
        raise UserError(f"--density does nothing with --combination {combination}")
    if not combination.endswith("svd") and (args.rank is not None or args.svd_clamp is not None):
        flag = "--rank" if args.rank is not None else "--svd_clamp"
        raise UserError(f"{flag} is for the svd combinations, not --combination {combination}")
    check_output_path(args.out, "--out", folder=not args.out.endswith(".safetensors"))
    from .tuners.lora.io import merge_lora_files, read_lora_file

    written = merge_lora_files(args.inputs, weights, args.out, combination, args.layout,
                               density=1.0 if args.density is None else args.density,
                               majority_sign_method=args.majority_sign_method, rank=args.rank,
                               svd_clamp=args.svd_clamp, seed=args.seed)
    ranks = sorted({m.rank for m in read_lora_file(written)[0].values()})
    print(f"merged {len(args.inputs)} LoRAs ({combination}, rank {'/'.join(map(str, ranks))}): wrote {written}")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as every other bad input: one `error:` line naming the flag, exit 2 (argparse
    would print the whole usage block first). Subcommand parsers are made of the same class."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .training.config import add_config_flags

    parser = OneLineParser(prog="mindscedit", allow_abbrev=False)
    debug_help = "on an unexpected failure, show the full traceback"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune the UNet (vanilla), LoRA/DoRA, SC-Tuners or a CSC-Tuner", allow_abbrev=False)
    train.add_argument("--config", help="YAML file; flags override its keys")
    add_config_flags(train)
    train.set_defaults(func=cmd_train, subparser=train)

    plot = sub.add_parser("plot-logs", help="draw a run's loss and learning rate (from logs.jsonl) as loss.png; "
                          "needs matplotlib", allow_abbrev=False)
    plot.add_argument("output_dir", help="a training output_dir (holding logs.jsonl)")
    plot.add_argument("--output", help="PNG file to write (default: OUTPUT_DIR/loss.png)")
    plot.set_defaults(func=cmd_plot_logs, subparser=plot)

    from .data.conditions import ANNOTATORS

    annotate = sub.add_parser("annotate", help="compute a built-in condition image (canny, color, ...)",
                              allow_abbrev=False)
    annotate.add_argument("--type", required=True, choices=sorted(ANNOTATORS))
    annotate.add_argument("input")
    annotate.add_argument("output")
    annotate.add_argument("--resolution", type=int, help="resize the shorter side first")
    annotate.add_argument("--low_threshold", type=int, default=100, help="canny")
    annotate.add_argument("--high_threshold", type=int, default=200, help="canny")
    annotate.add_argument("--seed", type=int, default=0, help="inpainting mask")
    annotate.set_defaults(func=cmd_annotate, subparser=annotate)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random SD, SDXL or Playground-style pipeline "
                                                  "(diffusers format)", allow_abbrev=False)
    tiny.add_argument("output_dir")
    tiny.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--family", default="sd", choices=["sd", "sdxl", "playground"],
                      help="sd: an SD1.x-like pipeline; sdxl: two text encoders and a text_time UNet; playground: "
                           "SDXL's with an EDM scheduler and a VAE with latents_mean/latents_std (Playground v2.5)")
    tiny.set_defaults(func=cmd_make_tiny_model, subparser=tiny)

    check = sub.add_parser("check-data", help="report every problem in a dataset without training",
                           allow_abbrev=False)
    check.add_argument("path", help="dataset folder or file, as for --train_data_dir")
    check.add_argument("--image_column", default="image")
    check.add_argument("--caption_column", default="text")
    check.add_argument("--resolution", type=int, help="also flag images smaller than this")
    check.set_defaults(func=cmd_check_data, subparser=check)

    from .sampling.command import add_sample_arguments

    sample = sub.add_parser("sample", help="text-to-image with a model folder and trained weights", allow_abbrev=False)
    add_sample_arguments(sample)
    sample.set_defaults(func=cmd_sample, subparser=sample)

    from .bench import add_bench_arguments

    bench = sub.add_parser("bench", help="time and measure the UNet training step of each method",
                           allow_abbrev=False)
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench, subparser=bench)

    from .convert import FAMILIES, FORMATS

    conv = sub.add_parser("convert", help="rewrite SC-Tuner (swift, scepter) or LoRA (diffusers, kohya) weights "
                          "in another layout", allow_abbrev=False)
    conv.add_argument("--from", dest="src_format", required=True, metavar="{" + ",".join(FORMATS) + "}")
    conv.add_argument("--to", dest="dst_format", required=True, metavar="{" + ",".join(FORMATS) + "}")
    conv.add_argument("input", help="weights file or folder")
    conv.add_argument("output", help="folder (or .safetensors file) to write")
    conv.add_argument("--resnets_per_block", type=int, default=3,
                      help="scepter -> swift: resnets per UNet up block (3 for SD1.x/2.x/SDXL)")
    conv.add_argument("--family", choices=FAMILIES, default=None,
                      help="--to kohya: kohya's naming of SD1.x/2.x (diffusers-style paths, lora_te_) or of SDXL "
                      "(LDM input_blocks/middle_block/output_blocks, lora_te1_/lora_te2_); default: SDXL when the "
                      "file's modules show it (text_encoder_2, add_embedding, transformer depth > 1)")
    conv.set_defaults(func=cmd_convert, subparser=conv)
    merge = sub.add_parser("merge-lora", help="merge LoRA files into one (peft's add_weighted_adapter: cat, linear, "
                           "svd, ties, dare, magnitude_prune)", allow_abbrev=False)
    merge.add_argument("inputs", nargs="+", metavar="LORA", help="LoRA files or folders (diffusers or kohya layout)")
    merge.add_argument("--out", required=True, help="folder (or .safetensors file) to write")
    merge.add_argument("--weights", nargs="+", type=float, help="one weight per LoRA (default 1 each)")
    merge.add_argument("--combination", default="cat", choices=MERGE_COMBINATIONS,
                       help="cat: exact sum, rank = sum of ranks; linear/ties/dare_*/magnitude_prune: on A and B "
                            "separately, equal ranks; *svd: on the full updates, then a truncated SVD")
    merge.add_argument("--density", type=float, help="fraction of entries kept by ties, dare_*, magnitude_prune")
    merge.add_argument("--majority_sign_method", default="total", choices=["total", "frequency"],
                       help="ties / dare_ties sign election")
    merge.add_argument("--rank", type=int, help="svd combinations: rank of the result (default: the largest input rank)")
    merge.add_argument("--svd_clamp", type=float, help="svd combinations: clamp B and A at this quantile of their entries")
    merge.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random drop")
    merge.add_argument("--layout", default="diffusers", choices=["diffusers", "kohya"])
    merge.set_defaults(func=cmd_merge_lora, subparser=merge)
    for command in sub.choices.values():  # also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def reject_unknown_arguments(extra, subparser) -> None:
    """One line for the first argument the command does not take, with the closest flag it does."""
    import difflib

    known = [option[2:] for action in subparser._actions for option in action.option_strings
             if option.startswith("--")]
    for arg in extra:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            raise UserError(f"unknown flag --{key}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UserError(f"unexpected argument '{arg}'")


EXIT_BAD_INPUT = 2  # one `error:` line naming the file, row, key or flag
EXIT_UNEXPECTED = 3  # a failure that is not the input's fault (exit 1: a diverged run, or problems check-data found)
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT-ended command


def main(argv=None) -> int:
    _setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        reject_unknown_arguments(extra, args.subparser)
        return args.func(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # before train's own handler is in place (loading, compiling) or in another command
        print(f"mindscedit {args.command}: interrupted (Ctrl-C); nothing more was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001: the guard turns any crash into a short message and its own code
        if args.debug:
            raise
        reason = " ".join(str(err).split())[:300] or "no message"
        print(f"error: mindscedit {args.command} failed unexpectedly: {type(err).__name__}: {reason} "
              f"(rerun with --debug for the full traceback)", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
