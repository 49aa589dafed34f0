"""Images per second of one data-loader worker: PIL vs tensor decoding, train and test pipelines.

    python bench/bench_data_pipeline.py [--seconds 1.5] [--gpu_images_per_s 3000]

Decodes 256x256 JPEGs (the In-Shop size, drawn by the synthetic generator) with one thread and
runs the recipe pipeline (resize 512 -> crop 448) and the demo pipeline (72 -> 64), either with
PIL (decode to a PIL image, v2 transforms on PIL, then to tensor) or with torchvision.io
(decode to a uint8 tensor, v2 transforms on tensors; the project's default, arcface.transforms).
Prints a table, the loader workers one GPU needs at --gpu_images_per_s, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from arcface import transforms  # noqa: E402
from arcface.synthetic import generate_inshop  # noqa: E402

SIZES = ((512, 448), (72, 64))  # recipe, demo


def load_pil(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def pil_pipeline(train: bool, resize: int, crop: int) -> v2.Compose:
    """The same steps as arcface.transforms, applied to PIL images (PIL's own bilinear resize)."""
    tensor_steps = transforms.train_transform(resize, crop) if train else transforms.test_transform(resize, crop)
    spatial, normalise = tensor_steps.transforms[:-1], tensor_steps.transforms[-1]
    return v2.Compose([*spatial, v2.PILToTensor(), normalise])


def images_per_second(paths: list[str], load: Callable, pipeline: Callable, seconds: float) -> float:
    """Images per second of CPU time: what one worker does with a core to itself.

    CPU time rather than wall time, so that other processes on a shared machine do not skew
    the comparison (one thread, so CPU time is this worker's time on its core).
    """
    pipeline(load(paths[0]))  # warm-up: first-call allocations and lazy initialisation
    count = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        pipeline(load(paths[count % len(paths)]))
        count += 1
    return count / (time.process_time() - start)


def make_jpegs(folder: Path) -> list[str]:
    root = generate_inshop(folder / "synthetic", items=8, views=4, size=256, seed=0)
    return sorted(str(path) for path in (root / "Img").rglob("*.jpg"))


def pipelines() -> list[tuple[str, str, str, Callable, Callable]]:
    """(decoder, pipeline, size, load, transform) for every measured combination."""
    cases = [
        ("pil", "decode", "256", load_pil, _identity),
        ("tensor", "decode", "256", transforms.load_image, _identity),
    ]
    for resize, crop in SIZES:
        for split in ("train", "test"):
            make = transforms.train_transform if split == "train" else transforms.test_transform
            size = f"{resize}->{crop}"
            cases.append(("pil", split, size, load_pil, pil_pipeline(split == "train", resize, crop)))
            cases.append(("tensor", split, size, transforms.load_image, make(resize, crop)))
    return cases


def _identity(image):
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="CPU time per measurement (default 1.5)")
    parser.add_argument(
        "--gpu_images_per_s", type=float, default=3000.0, help="training images/s one GPU consumes (default 3000)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker = one core

    results = []
    print("images per second of CPU time, one thread (= one loader worker on its own core)")
    print(f"{'decode':<8}{'pipeline':<10}{'size':<10}{'images/s':>10}{'ms/image':>10}")
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(Path(folder))
        for decoder, split, size, load, pipeline in pipelines():
            rate = images_per_second(paths, load, pipeline, args.seconds)
            print(f"{decoder:<8}{split:<10}{size:<10}{rate:>10.0f}{1000 / rate:>10.2f}")
            results.append({"decode": decoder, "pipeline": split, "size": size, "images_per_s": round(rate, 1)})

    # Workers one GPU needs with the default (tensor) train pipeline.
    workers = {}
    for row in results:
        if row["decode"] == "tensor" and row["pipeline"] == "train":
            workers[row["size"]] = math.ceil(args.gpu_images_per_s / row["images_per_s"])
            print(
                f"train {row['size']}: {row['images_per_s']:.0f} images/s per worker -> {workers[row['size']]} "
                f"loader workers (cores) per GPU at {args.gpu_images_per_s:.0f} images/s"
            )
    summary = {"gpu_images_per_s": args.gpu_images_per_s, "results": results, "workers_per_gpu": workers}
    print(json.dumps({"bench": "data_pipeline", **summary}))


if __name__ == "__main__":
    main()
