"""Image decoding and the train / test pipelines of the reference recipe (sizes are parameters).

Images are decoded straight to uint8 tensors (torchvision.io) and transformed with
torchvision.transforms.v2 on those tensors: on one core this is about twice as fast as decoding
with PIL and resizing PIL images (bench/bench_data_pipeline.py measures both).

Recipe: resize 512 -> crop 448; the demo uses resize 72 -> crop 64.
"""
from __future__ import annotations

import os

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

# ImageNet statistics on the 0-255 scale, as the reference recipe states them (RGB order).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to RGB, uint8, shape (3, H, W); grey or RGBA files become RGB."""
    with open(path, "rb") as file:  # a missing file raises FileNotFoundError naming the path
        encoded = torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise OSError(f"cannot decode image {os.fspath(path)}: {error}") from error


class NormalizeUint8:
    """uint8 (3, H, W) image -> float32 (x - mean) / std, with mean and std on the 0-255 scale.

    One float conversion, one layout change and two in-place passes. The decoder returns
    channels-last memory (H, W, 3 viewed as 3, H, W), which keeps the uint8 resize fast but makes
    per-channel arithmetic slow; converting to float first, then to contiguous (3, H, W), then
    normalising in place is several times cheaper than ToDtype(scale=True) + Normalize on that
    layout (bench/bench_data_pipeline.py measures the pipelines).
    """

    def __init__(self, mean: tuple[float, ...] = MEAN_RGB, std: tuple[float, ...] = STD_RGB) -> None:
        self.mean = mean
        self.std = std
        self.scale = 1.0 / torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * self.scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor (as load_image returns), got {image.dtype}")
        return image.to(torch.float32).contiguous().mul_(self.scale).add_(self.shift)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _check_sizes(resize: int, crop: int) -> None:
    if not 0 < crop <= resize:
        raise ValueError(f"resize={resize}, crop={crop}: expected 0 < crop <= resize")


def train_transform(resize: int, crop: int) -> v2.Compose:
    """Resize to (resize, resize) ignoring aspect ratio, random (crop, crop), flip p=0.5, normalise."""
    _check_sizes(resize, crop)
    return v2.Compose(
        [
            v2.Resize((resize, resize), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(p=0.5),
            NormalizeUint8(),
        ]
    )


def test_transform(resize: int, crop: int) -> v2.Compose:
    """Resize to (resize, resize) ignoring aspect ratio, centre (crop, crop), normalise."""
    _check_sizes(resize, crop)
    return v2.Compose(
        [
            v2.Resize((resize, resize), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(crop),
            NormalizeUint8(),
        ]
    )


# The name starts with "test_": keep pytest from collecting it when a test module imports it.
test_transform.__test__ = False
