"""`mindscedit` command line: train, make-tiny-model."""
import argparse
import logging
import os
import sys

from .errors import UserError

BUNDLED_PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "photos16")


def _setup_logging():
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's own log: errors only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_train(args, extra):
    from .config import check_unknown_flags, load_config

    check_unknown_flags(extra)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    config = load_config(args.config, overrides)
    from .training.trainer import Trainer

    result = Trainer(config).train()
    summary = [f"step {result.global_step}"]
    if result.losses:
        summary.append(f"final loss {result.losses[-1]:.4f}")
    if result.seconds_per_step:
        summary.append(f"{result.seconds_per_step:.3f} s/step")
        summary.append(f"{result.images_per_second:.2f} img/s")
    if result.compile_seconds:
        summary.append(f"first step (graph compile) {result.compile_seconds:.1f} s")
    print("done: " + ", ".join(summary) + f"; weights in {config.output_dir}")
    if result.stopped_early:
        print(f"stopped early: {result.stopped_early}; resume with --resume_from_checkpoint latest")


def cmd_make_tiny_model(args, extra):
    from .config import check_unknown_flags
    from .models import make_tiny_model

    check_unknown_flags(extra)
    make_tiny_model(args.output_dir, prediction_type=args.prediction_type, seed=args.seed)
    print(f"tiny {args.prediction_type} pipeline written to {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
    from .config import add_config_flags

    parser = argparse.ArgumentParser(prog="mindscedit", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with vanilla, LoRA or SCEdit", allow_abbrev=False)
    train.add_argument("--config", help="YAML file; flags override its keys")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random SD pipeline (diffusers format)",
                          allow_abbrev=False)
    tiny.add_argument("output_dir")
    tiny.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv=None) -> int:
    _setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        args.func(args, extra)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
