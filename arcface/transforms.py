"""Image decoding and the train / test pipelines of the reference recipe (sizes are parameters).

Images are decoded straight to uint8 tensors (torchvision.io) and transformed with
torchvision.transforms.v2 on those tensors: on one core this is about twice as fast as decoding
with PIL and resizing PIL images (bench/bench_data_pipeline.py measures both). PNG files are the
exception: they go through PIL, because torchvision's PNG decoder can crash on a corrupt file.

Recipe: resize 512 -> crop 448; the demo uses resize 72 -> crop 64.
"""
from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import PngImagePlugin
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from arcface.imageheader import MAX_IMAGE_PIXELS, HeaderError, read_header

# ImageNet statistics on the 0-255 scale, as the reference recipe states them (RGB order).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
# The resize interpolations the pipelines take, under the names timm's pretrained configurations
# use (every timm configuration says "bilinear" or "bicubic").
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}

# torchvision prefixes decoder errors with its C++ function and source location.
_SOURCE_LOCATION = re.compile(r"^[^,]*, \S+:\d+, ")


class ImageFileError(OSError):
    """An image file that is refused or cannot be decoded; the message is one line naming it."""


def check_max_pixels(max_pixels: int) -> None:
    """ValueError unless `max_pixels` is a positive integer (checked where it is given, not per image)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive integer, got {max_pixels!r}")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image file to RGB, uint8, shape (3, H, W); grey or RGBA files become RGB.

    The header is read first: a file claiming more than `max_pixels` pixels, an animation, or a
    format the decoder does not read raises ImageFileError before any decoding.
    """
    check_max_pixels(max_pixels)
    name = os.fspath(path)
    with open(path, "rb") as file:  # a missing file raises FileNotFoundError naming the path
        data = file.read()
    try:
        header = read_header(data)
    except HeaderError as error:
        raise ImageFileError(f"{name}: cannot decode this image: {error}") from None
    if header.pixels > max_pixels:
        raise ImageFileError(
            f"{name}: the {header.format} header claims {header.width} x {header.height} = "
            f"{header.pixels:,} pixels, more than the limit of {max_pixels:,}; if the image is genuine, "
            "raise the limit (max_pixels, the max_image_pixels setting)"
        )
    if header.frames > 1:
        raise ImageFileError(f"{name}: an animated GIF of {header.frames} frames; expected a single image")
    if header.format == "PNG":
        return _decode_png(data, name)
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        reason = _SOURCE_LOCATION.sub("", str(error)).strip().split("\n")[0]
        raise ImageFileError(f"{name}: cannot decode this image: {reason}") from None


def _decode_png(data: bytes, name: str) -> torch.Tensor:
    """PNG through PIL: torchvision's PNG decoder crashes the process on some corrupt files.

    PngImageFile directly, not Image.open, so that PIL's global pixel limit does not overrule
    `max_pixels`. The result has the decoder's channels-last layout, like decode_image's.
    """
    try:
        with PngImagePlugin.PngImageFile(io.BytesIO(data)) as image:
            if image.mode.startswith("I"):  # 16-bit grey: keep the high byte, as for 16-bit RGB
                grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                array = np.array(image.convert("RGB"))
    except Exception as error:  # PIL reports corrupt data with many types; any of them means the same
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageFileError(f"{name}: cannot decode this image: {reason}") from None
    return torch.from_numpy(array).permute(2, 0, 1)


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


@dataclass(frozen=True)
class Preprocessing:
    """The normalisation and resize interpolation a backbone's weights were trained with.

    mean and std are per RGB channel on the 0-1 scale (timm's and torchvision's convention);
    `mean_255` and `std_255` are the same statistics on the 0-255 scale NormalizeUint8 uses.
    `as_dict()` / `from_dict()` let a snapshot or an export record it as plain JSON values.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (isinstance(values, (str, bytes)) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise ValueError(f"preprocessing {name}: expected 3 numbers (R, G, B), got {values!r}")
            values = tuple(float(v) for v in values)
            if not all(math.isfinite(v) and (0 < v if name == "std" else 0 <= v) and v <= 1 for v in values):
                raise ValueError(
                    f"preprocessing {name}: expected values on the 0-1 scale"
                    f"{' (and > 0)' if name == 'std' else ''}, got {list(values)}"
                )
            object.__setattr__(self, name, values)  # lists (from JSON) become tuples: hashable, comparable
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocessing interpolation: expected {' or '.join(map(repr, INTERPOLATIONS))}, "
                f"got {self.interpolation!r}"
            )

    @property
    def mean_255(self) -> tuple[float, ...]:
        # Rounded so that ImageNet's 0.485 gives the recipe's 123.675 exactly, not 123.67499999999998.
        return tuple(round(255 * v, 10) for v in self.mean)

    @property
    def std_255(self) -> tuple[float, ...]:
        return tuple(round(255 * v, 10) for v in self.std)

    def transform_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of train_transform / test_transform that apply it."""
        return {"mean": self.mean_255, "std": self.std_255, "interpolation": self.interpolation}

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """The inverse of as_dict; keys it does not know (written by a later version) are left out."""
        if not isinstance(values, Mapping):
            raise ValueError(f"preprocessing: expected a mapping of mean, std and interpolation, got {values!r}")
        missing = [key for key in ("mean", "std", "interpolation") if key not in values]
        if missing:
            raise ValueError(f"preprocessing: missing {', '.join(missing)} in {dict(values)!r}")
        return cls(values["mean"], values["std"], values["interpolation"])


# What torchvision's weights (and the reference recipe) expect: ImageNet statistics, bilinear resize.
IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")


def check_sizes(resize: int, crop: int) -> None:
    """ValueError naming `crop` unless 0 < crop <= resize: the crop is cut out of the resized image."""
    if not 0 < crop <= resize:
        raise ValueError(f"crop: expected 0 < crop <= resize ({resize}), got {crop}")


def train_transform(
    resize: int, crop: int, *, mean: tuple[float, ...] = MEAN_RGB, std: tuple[float, ...] = STD_RGB,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Resize to (resize, resize) ignoring aspect ratio, random (crop, crop), flip p=0.5, normalise.

    mean and std are on the 0-255 scale (NormalizeUint8's); a backbone's own statistics and
    interpolation come from `Preprocessing.transform_kwargs()`.
    """
    check_sizes(resize, crop)
    return v2.Compose(
        [
            _resize(resize, interpolation),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(p=0.5),
            NormalizeUint8(mean, std),
        ]
    )


def test_transform(
    resize: int, crop: int, *, mean: tuple[float, ...] = MEAN_RGB, std: tuple[float, ...] = STD_RGB,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Resize to (resize, resize) ignoring aspect ratio, centre (crop, crop), normalise (as
    train_transform)."""
    check_sizes(resize, crop)
    return v2.Compose([_resize(resize, interpolation), v2.CenterCrop(crop), NormalizeUint8(mean, std)])


def _resize(size: int, interpolation: str) -> v2.Resize:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation: expected {' or '.join(map(repr, INTERPOLATIONS))}, got {interpolation!r}"
        )
    return v2.Resize((size, size), interpolation=INTERPOLATIONS[interpolation], antialias=True)


# The name starts with "test_": keep pytest from collecting it when a test module imports it.
test_transform.__test__ = False
