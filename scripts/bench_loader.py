"""CPU cost of one training sample in the input pipeline, and how many loader workers feed a card.

    python scripts/bench_loader.py                       # photos16 at 512, center crop + flip, + canny
    python scripts/bench_loader.py --data DIR --passes 7 --condition none
    python scripts/bench_loader.py --loader_workers 1,2  # also the whole MindSpore loader, end to end

What is timed: ``TextImageDataset[key]`` exactly as a loader worker runs it (decode, RGB, resize
shorter side, crop, flip, normalise to float32 CHW, and the CSC-Tuner condition when asked for), in
this process, one sample at a time. Tokenization is left out: SD's CLIP tokenizer is not bundled,
and a stand-in tokenizer returns fixed ids (``--tokenizer DIR`` times a real one instead). A
first pass over the dataset warms up imports and caches and is not counted; each counted pass
draws new flips (a new epoch), and the table gives the median over passes of the mean per sample.

"workers for X img/s" is the fewest loader worker processes whose summed throughput reaches X, a
card's training speed (the defaults are the Ascend 910* figures mindone publishes for SD1.5 at
512x512: vanilla 11.86 img/s, LoRA 15.27 img/s). It is a floor: the host's cores may be slower
than this machine's and real datasets hold larger images than photos16's 256x256 ones
(``--source_size`` re-encodes the photos larger to see what that costs).

``--loader_workers`` also runs ``create_dataloader`` (batch 1) with each worker count and reports
the samples/s that reach the training loop, i.e. including MindSpore's pipeline and the transfer
from worker processes; on a machine with few cores, more workers than cores shows nothing.
"""
import argparse
import io
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mindscedit.data import ImageTransform, TextImageDataset, load_records  # noqa: E402
from mindscedit.data.conditions import ConditionSpec  # noqa: E402
from mindscedit.data.sources import Record  # noqa: E402

PHOTOS16 = Path(__file__).resolve().parent.parent / "mindscedit" / "assets" / "photos16"
# Ascend 910* training speed of SD1.5 at 512x512 per mindone's published benchmark.
DEFAULT_RATES = "vanilla=11.86,lora=15.27"
# The thresholds configs/sd15_scedit_canny.yaml trains with.
CANNY_OPTIONS = {"low_threshold": 100, "high_threshold": 200}


class FixedIdsTokenizer:
    """Stands in for the CLIP tokenizer so the timing is the image work alone (picklable for workers)."""

    model_max_length = 77

    def __call__(self, text, **kwargs):
        return {"input_ids": [0] * self.model_max_length}


def parse_rates(text: str):
    rates = []
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not value:
            name, value = "", name
        rates.append((name.strip(), float(value)))
    return rates


def reencode(records, size: int):
    """The records with each image resized to size x size and saved again as JPEG (quality 95)."""
    from PIL import Image

    from mindscedit.data import decode_image, to_rgb

    resized = []
    for record in records:
        image = to_rgb(decode_image(record.image, record.origin)).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        resized.append(Record(buffer.getvalue(), record.caption, record.origin, record.condition))
    return resized


def time_dataset(dataset: TextImageDataset, passes: int) -> float:
    """Median over passes of the mean milliseconds per sample (after one uncounted pass)."""
    n = len(dataset)
    for index in range(n):
        dataset[index]
    pass_means = []
    for epoch in range(1, passes + 1):
        start = time.perf_counter()
        for index in range(n):
            dataset[epoch * n + index]  # a sample key of a new epoch: new flip draws
        pass_means.append((time.perf_counter() - start) * 1000.0 / n)
    return statistics.median(pass_means)


def time_loader(records, tokenizer, args, condition, num_workers: int) -> float:
    """Samples/s that come out of create_dataloader (batch 1) with num_workers workers."""
    from mindscedit.data import create_dataloader, iterate_batches

    loader = create_dataloader(
        records, tokenizer, args.resolution, batch_size=1, center_crop=True, random_flip=True,
        seed=0, num_workers=num_workers, condition=condition,
    )
    warmup, count = 2 * len(records), args.loader_samples
    seen, start = 0, None
    for _ in iterate_batches(loader):
        seen += 1
        if seen == warmup:
            start = time.perf_counter()
        elif seen == warmup + count:
            return count / (time.perf_counter() - start)
    raise RuntimeError("the loader ended early")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(PHOTOS16), help="a dataset load_records reads (default: photos16)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--passes", type=int, default=5, help="counted passes over the dataset")
    parser.add_argument("--condition", default="canny", choices=["canny", "color", "grayscale", "inpainting", "none"],
                        help="also time this CSC-Tuner condition (none: image only)")
    parser.add_argument("--rates", default=DEFAULT_RATES,
                        help="name=img/s,... training speeds of one card to feed (default: %(default)s)")
    parser.add_argument("--source_size", type=int, default=0,
                        help="re-encode the images at this size first (emulates a dataset of larger photos)")
    parser.add_argument("--tokenizer", default=None, help="a CLIP tokenizer folder: include tokenization")
    parser.add_argument("--loader_workers", default="", help="e.g. 1,2: also time create_dataloader end to end")
    parser.add_argument("--loader_samples", type=int, default=64, help="samples timed per loader run")
    args = parser.parse_args(argv)

    # The dataset warns once per image smaller than the resolution (photos16 is 256x256): not news here.
    logging.getLogger("mindscedit.data").setLevel(logging.ERROR)
    records = load_records(args.data)
    if args.source_size:
        records = reencode(records, args.source_size)
    if args.tokenizer:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = FixedIdsTokenizer()
    rates = parse_rates(args.rates)

    from PIL import Image

    image = records[0].image
    first = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    print(f"data: {args.data} ({len(records)} images, first {first.size[0]}x{first.size[1]} {first.format}); "
          f"resolution {args.resolution}, center crop + random flip; tokenization "
          f"{'included' if args.tokenizer else 'excluded'}; median of {args.passes} passes; "
          f"{os.cpu_count()} CPUs here, load average {os.getloadavg()[0]:.1f}")  # busy cores slow every row

    transform = ImageTransform(args.resolution, center_crop=True, random_flip=True)
    cases = [("decode + transform", None)]
    if args.condition != "none":
        options = CANNY_OPTIONS if args.condition == "canny" else {}
        cases.append((f"decode + transform + {args.condition}", ConditionSpec(args.condition, options)))

    header = ["pipeline", "ms/sample", "samples/s per worker"]
    header += [f"workers for {v:g} img/s" + (f" ({n})" if n else "") for n, v in rates]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for name, condition in cases:
        dataset = TextImageDataset(records, transform, tokenizer, seed=0, condition=condition)
        ms_per_sample = time_dataset(dataset, args.passes)
        per_worker = 1000.0 / ms_per_sample
        needed = [str(max(1, math.ceil(rate / per_worker))) for _, rate in rates]
        print(f"| {name} | {ms_per_sample:.2f} | {per_worker:.0f} | " + " | ".join(needed) + " |", flush=True)

    if args.loader_workers:
        print("\ncreate_dataloader end to end (batch 1):")
        print("| pipeline | workers | samples/s |")
        print("|---|---:|---:|")
        for name, condition in cases:
            for workers in (int(w) for w in args.loader_workers.split(",")):
                rate = time_loader(records, tokenizer, args, condition, workers)
                print(f"| {name} | {workers} | {rate:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
