"""Image decoding and the train / test pipelines."""
import ast
import io
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from arcface import transforms

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def normalised_float64(image_uint8: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel on the 0-255 scale, computed independently in float64."""
    x = image_uint8.double()
    return (x - torch.from_numpy(MEAN).view(3, 1, 1)) / torch.from_numpy(STD).view(3, 1, 1)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("make", [transforms.train_transform, transforms.test_transform])
def test_output_shape_and_dtype_ignore_aspect_ratio(make):
    out = make(72, 64)(random_image(50, 90))
    assert out.shape == (3, 64, 64)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("make", [transforms.train_transform, transforms.test_transform])
def test_constant_image_normalises_to_closed_form(make):
    rgb = (200, 17, 90)
    image = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 30).contiguous()
    out = make(36, 32)(image)
    expected = (np.array(rgb) - MEAN) / STD  # e.g. red: (200 - 123.675) / 58.395
    for channel in range(3):
        constant = torch.full((32, 32), expected[channel], dtype=torch.float64)
        assert torch.allclose(out[channel].double(), constant, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_test_pipeline_is_a_centre_crop_of_the_normalised_image(channels_last: bool):
    # Resizing to the image's own size must change nothing, so the output is an exact centre crop.
    image = random_image(40, 40, seed=1)
    if channels_last:  # the memory layout the decoder returns: (H, W, 3) viewed as (3, H, W)
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    out = transforms.test_transform(40, 32)(image)
    expected = normalised_float64(image)[:, 4:36, 4:36]
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert out.is_contiguous()


def test_test_pipeline_is_deterministic():
    image = random_image(60, 45, seed=2)
    pipeline = transforms.test_transform(72, 64)
    torch.manual_seed(0)
    first = pipeline(image)
    torch.manual_seed(1)
    assert torch.equal(first, pipeline(image))


def test_train_flip_happens_sometimes_and_only_flips():
    torch.manual_seed(0)
    image = random_image(32, 32, seed=3)
    pipeline = transforms.train_transform(32, 32)  # crop == resize: the flip is the only randomness
    plain = normalised_float64(image)
    flipped = plain.flip(-1)
    seen = {"plain": 0, "flipped": 0}
    for _ in range(60):
        out = pipeline(image).double()
        is_plain = torch.allclose(out, plain, atol=1e-5)
        is_flipped = torch.allclose(out, flipped, atol=1e-5)
        assert is_plain != is_flipped
        seen["plain" if is_plain else "flipped"] += 1
    # p = 0.5 over 60 draws: a count outside [10, 50] has probability below 1e-6.
    assert 10 <= seen["flipped"] <= 50


def test_train_crop_is_a_random_window_of_the_resized_image():
    torch.manual_seed(0)
    image = random_image(40, 40, seed=4)
    plain = normalised_float64(image)
    windows = set()
    for _ in range(30):
        out = transforms.train_transform(40, 36)(image).double()
        matches = [
            (top, left, flip)
            for top in range(5)
            for left in range(5)
            for flip in (False, True)
            if torch.allclose(out, (plain.flip(-1) if flip else plain)[:, top : top + 36, left : left + 36], atol=1e-5)
        ]
        assert len(matches) == 1
        windows.add(matches[0][:2])
    assert len(windows) > 5


@pytest.mark.parametrize("resize, crop", [(64, 72), (64, 0)])
def test_invalid_sizes_are_rejected(resize, crop):
    for make in (transforms.train_transform, transforms.test_transform):
        with pytest.raises(ValueError, match=rf"^crop: expected 0 < crop <= resize \({resize}\), got {crop}$"):
            make(resize, crop)


def test_the_config_checks_crop_and_resize_with_the_transforms_rule():
    from support.config import Config, ConfigError

    with pytest.raises(ValueError) as rule:
        transforms.check_sizes(64, 72)
    with pytest.raises(ConfigError) as refused:
        Config(resize=64, crop=72)
    assert str(refused.value) == str(rule.value)


def test_load_image_decodes_jpeg_like_pil(tmp_path: Path):
    array = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(array).save(path, quality=95)
    loaded = transforms.load_image(path)
    assert loaded.dtype == torch.uint8
    assert loaded.shape == (3, 24, 40)
    with Image.open(path) as reference:
        reference_chw = torch.from_numpy(np.array(reference.convert("RGB"))).permute(2, 0, 1)
    # Both use libjpeg; the inverse DCT may differ by a grey level or two.
    assert (loaded.int() - reference_chw.int()).abs().max() <= 3


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_load_image_returns_rgb_for_grey_and_alpha_files(tmp_path: Path, mode: str):
    path = tmp_path / "image.png"
    Image.new(mode, (7, 5), color=120 if mode == "L" else (10, 20, 30, 255)).save(path)
    loaded = transforms.load_image(path)
    assert loaded.shape == (3, 5, 7)
    expected = (120, 120, 120) if mode == "L" else (10, 20, 30)
    assert loaded[:, 0, 0].tolist() == list(expected)


def test_load_image_names_a_corrupt_file(tmp_path: Path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a complete jpeg" * 4)
    with pytest.raises(OSError, match="broken.jpg"):
        transforms.load_image(path)


def test_load_image_names_a_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        transforms.load_image(tmp_path / "absent.jpg")


def test_normalisation_refuses_float_input():
    # A float image in [0, 1] normalised with 0-255 statistics would be silently wrong.
    with pytest.raises(TypeError, match="uint8"):
        transforms.test_transform(32, 32)(torch.rand(3, 32, 32))


# ---- refusing before decoding: sizes claimed by headers, corrupt files ----


def encoded(fmt: str, width: int = 50, height: int = 40, **options) -> bytes:
    array = np.random.default_rng(5).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def claim_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """The same file with the dimensions in its header overwritten (the image data is untouched)."""
    patched = bytearray(data)
    if fmt == "JPEG":
        frame = patched.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
        struct.pack_into(">HH", patched, frame + 5, height, width)
    elif fmt == "PNG":
        struct.pack_into(">II", patched, 16, width, height)  # IHDR, right after the signature
    elif fmt == "GIF":
        struct.pack_into("<HH", patched, 6, width, height)  # the logical screen
    elif fmt == "WEBP":
        assert patched[12:16] == b"VP8 " and width < 2**14 and height < 2**14
        struct.pack_into("<HH", patched, 26, width, height)  # 14-bit sizes of a lossy frame
    return bytes(patched)


@pytest.mark.parametrize("fmt, width, height", [
    ("JPEG", 20000, 20000), ("PNG", 20000, 20000), ("GIF", 20000, 20000), ("WEBP", 16383, 16383),
])
def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(tmp_path: Path, fmt, width, height):
    path = tmp_path / f"bomb.{fmt.lower()}"
    path.write_bytes(claim_size(encoded(fmt), fmt, width, height))
    assert path.stat().st_size < 20_000
    start = time.perf_counter()
    with pytest.raises(OSError) as caught:
        transforms.load_image(path)
    # Decoding would take seconds and gigabytes; reading a header takes microseconds.
    assert time.perf_counter() - start < 0.5
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert f"{width} x {height}" in message
    assert f"{transforms.MAX_IMAGE_PIXELS:,}" in message
    assert "max_image_pixels" in message


def test_the_pixel_limit_is_a_parameter_that_pil_s_own_limit_does_not_override(tmp_path: Path, monkeypatch):
    # PIL's global limit set below the image: only load_image's max_pixels decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        path = tmp_path / f"image.{fmt.lower()}"
        path.write_bytes(encoded(fmt))  # 50 x 40 = 2000 pixels
        with pytest.raises(OSError, match=r"50 x 40 = 2,000 pixels, more than the limit of 1,999"):
            transforms.load_image(path, max_pixels=1999)
        # At the limit the image decodes exactly as before.
        expected = decode_image(str(path), mode=ImageReadMode.RGB)
        assert torch.equal(transforms.load_image(path, max_pixels=2000), expected)
    with pytest.raises(ValueError, match="max_pixels"):
        transforms.load_image(path, max_pixels=0)


def test_png_decodes_exactly_for_every_colour_type_even_at_pil_s_limit(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    rng = np.random.default_rng(6)
    images = {
        "L": Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8)),
        "RGBA": Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)),
        "P": Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).convert("P"),
    }
    for mode, source in images.items():
        path = tmp_path / f"{mode}.png"
        source.save(path)
        loaded = transforms.load_image(path, max_pixels=99)
        assert loaded.dtype == torch.uint8 and loaded.shape == (3, 9, 11)
        assert torch.equal(loaded, decode_image(str(path), mode=ImageReadMode.RGB)), mode
    # 16-bit grey: torchvision returns uint16; the contract is uint8, the high byte.
    deep = (np.arange(99, dtype=np.uint16).reshape(9, 11) * 661)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    loaded = transforms.load_image(tmp_path / "deep.png")
    assert loaded.dtype == torch.uint8
    assert torch.equal(loaded, torch.from_numpy((deep >> 8).astype(np.uint8)).expand(3, 9, 11))


def test_an_animated_gif_is_refused(tmp_path: Path):
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    path = tmp_path / "moving.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(OSError, match=r"moving\.gif: an animated GIF of 3 frames"):
        transforms.load_image(path)


def test_a_gif_frame_larger_than_its_screen_counts(tmp_path: Path):
    data = bytearray(encoded("GIF", 8, 6))
    descriptor = data.index(b"\x2c\x00\x00\x00\x00")  # image separator, left = top = 0
    struct.pack_into("<HH", data, descriptor + 5, 20000, 20000)
    path = tmp_path / "frame.gif"
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="20000 x 20000"):
        transforms.load_image(path)


# A corrupt PNG makes torchvision's decoder (libpng) crash the whole process, so the files are
# read in a child process: a crash shows as a signal exit status instead of killing pytest.
CORRUPT_FILES = {
    "garbage.jpg": lambda: b"\x00garbage, not an image" * 10,
    "truncated.jpg": lambda: encoded("JPEG")[:300],
    "header-only.jpg": lambda: encoded("JPEG")[:2],
    "zeroed.png": lambda: (lambda d: d[: len(d) // 2] + bytes(len(d) - len(d) // 2))(encoded("PNG")),
    "scrambled.png": lambda: (lambda d: d[:60] + bytes(b ^ 0x5A for b in d[60:]))(encoded("PNG")),
    "truncated.png": lambda: encoded("PNG")[:20],
    "truncated.gif": lambda: encoded("GIF")[:200],
    "truncated.webp": lambda: encoded("WEBP")[:25],
}
READ_EACH = """
import sys
from arcface.transforms import load_image
for path in sys.argv[1:]:
    print(path, flush=True)  # the last path printed is the one a crash happened on
    try:
        load_image(path)
        print(repr("decoded"), flush=True)
    except OSError as error:
        print(repr(str(error)), flush=True)
"""


def test_a_corrupt_file_is_one_line_oserror_naming_it_never_a_crash(tmp_path: Path):
    paths = []
    for name, make in CORRUPT_FILES.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(make())
    child = subprocess.run([sys.executable, "-c", READ_EACH, *map(str, paths)], capture_output=True,
                           text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    lines = child.stdout.splitlines()
    assert child.returncode == 0, f"exit status {child.returncode} on {lines[-1:]}: {child.stderr[-500:]}"
    for path, message in zip(lines[0::2], lines[1::2]):
        message = ast.literal_eval(message)
        assert message.startswith(f"{path}: cannot decode this image: "), message
        assert "\n" not in message and ".cpp" not in message  # no decoder source locations
    assert len(lines) == 2 * len(paths)
