"""Image decoding and the train / test pipelines."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
        with pytest.raises(ValueError, match=f"resize={resize}, crop={crop}"):
            make(resize, crop)


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
