"""A synthetic data set in the DeepFashion In-Shop layout, for the demo and the tests.

Each item is a garment whose identity is a *combination* of silhouette (type, sleeves, length,
fit), colour pair and pattern (kind, orientation, frequency). Every single attribute is shared by
many items, so matching one of them (the dominant colour, say) does not find the item; a network
has to learn to combine them. Every view of an item changes pose (flip, scale, squeeze, shift,
rotation), lighting (brightness, contrast, colour cast) and background (colour, gradient,
clutter), so raw pixels do not match either.

    python -m arcface.synthetic data/synthetic --items 300 --views 12 --size 64 --seed 0

writes ``OUT/Eval/list_eval_partition.txt`` and ``OUT/Img/img/<GENDER>/<Category>/id_XXXXXXXX/
NN_V_view.jpg`` exactly as the real data set lays them out, plus ``OUT/synthetic.json`` (the
generation parameters, so that a finished set is recognised and reused).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from arcface.partition import PARTITION_FILE, partition_text
from arcface.textfile import DataError, read_text
from support.errors import one_line_errors

DEFAULT_ITEMS = 300
DEFAULT_VIEWS = 12
DEFAULT_SIZE = 64
DEFAULT_SEED = 0
DEFAULT_TRAIN_FRACTION = 0.5
JPEG_QUALITY = 90
PARAMS_FILE = "synthetic.json"
# Part of the parameters recorded in PARAMS_FILE: bump it whenever the same arguments would
# produce different images, so that a set made by an older generator is never taken for current.
GENERATOR_VERSION = 2

# Saturated, well separated colours (RGB): a colour cast or a dim light must not turn one into another.
PALETTE = np.array(
    [
        (200, 30, 40),  # red
        (240, 140, 20),  # orange
        (230, 210, 40),  # yellow
        (40, 150, 60),  # green
        (30, 170, 170),  # teal
        (40, 70, 190),  # blue
        (120, 50, 160),  # purple
        (235, 235, 235),  # white
        (30, 30, 30),  # black
        (120, 80, 40),  # brown
    ],
    dtype=np.float32,
)

# (image index, view code, view name) as the real file names use them: 01_1_front.jpg, 02_2_side.jpg ...
VIEW_NAMES = ((1, "front"), (2, "side"), (3, "back"), (4, "full"), (7, "additional"))

SHAPES = ("shirt", "dress", "jacket", "trousers", "skirt")
SLEEVES = ("none", "short", "long")
LENGTHS = ("short", "long")
# Second shape variant: the collar for jackets, the cut for trousers and skirts; unused otherwise.
CUTS = ("narrow", "wide")
PATTERNS = ("solid", "stripes", "dots", "checks")
# 0/45/90 only: a flipped view turns 45 into 135 degrees, so those two would be the same item.
STRIPE_ANGLES_DEG = (0, 45, 90)
PATTERN_PERIODS = (1 / 12, 1 / 6)  # of the image side

# Silhouette size in the canonical pose: about the largest that keeps every outline inside the canvas.
GARMENT_SCALE = 1.18

# How much views of one item differ (ranges of uniform draws). Pose, background and clutter defeat
# raw-pixel and untrained-network matching; lighting is kept mild because it is what slows a
# network down most: with a +-20% per-channel cast the Recall@1 a ResNet-18 gains in 10k
# training images fell from ~45 to ~17 points, with +-30 grey levels and 0.7-1.3 contrast to ~30.
POSE_SCALE = (0.8, 1.05)
POSE_SQUEEZE = (0.8, 1.0)  # horizontal only: a garment seen from the side looks narrower
POSE_ROTATION_DEG = 15.0
POSE_SHIFT = 0.1  # of the image side
LIGHT_CONTRAST = (0.94, 1.06)
LIGHT_BRIGHTNESS = 6.0  # grey levels
LIGHT_CAST = (0.98, 1.02)  # per-channel gain
NOISE_STD = 3.0  # grey levels
CLUTTER_SHAPES = (0, 3)  # how many random shapes the background holds: [low, high)
CLUTTER_SIZE = (0.1, 0.35)  # of the image side


@dataclass(frozen=True)
class Garment:
    """What makes an item: the attributes that together identify it."""

    shape: str
    sleeves: str  # shirts and dresses only ("none" elsewhere)
    length: str
    cut: str  # jackets, trousers, skirts only ("narrow" elsewhere)
    primary: int  # index into PALETTE
    secondary: int
    pattern: str
    angle_deg: int  # stripes only (0 elsewhere)
    period: float  # of the image side; unused for solid

    def category(self, gender: str) -> str:
        """The In-Shop category folder this garment would be filed under."""
        if self.shape == "shirt":
            return "Shirts_Polos" if gender == "MEN" else "Blouses_Shirts"
        if self.shape == "jacket":
            return "Jackets_Vests" if gender == "MEN" else "Jackets_Coats"
        if self.shape == "trousers":
            return "Pants" if self.length == "long" else "Shorts"
        return {"dress": "Dresses", "skirt": "Skirts"}[self.shape]


def random_garment(rng: np.random.Generator) -> Garment:
    shape = SHAPES[rng.integers(len(SHAPES))]
    has_sleeves = shape in ("shirt", "dress")
    primary, secondary = rng.choice(len(PALETTE), size=2, replace=False)
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    return Garment(
        shape=shape,
        sleeves=SLEEVES[rng.integers(len(SLEEVES))] if has_sleeves else "none",
        length=LENGTHS[rng.integers(len(LENGTHS))],
        cut=CUTS[rng.integers(len(CUTS))] if not has_sleeves else "narrow",
        primary=int(primary),
        secondary=int(secondary),
        pattern=pattern,
        angle_deg=STRIPE_ANGLES_DEG[rng.integers(len(STRIPE_ANGLES_DEG))] if pattern == "stripes" else 0,
        period=PATTERN_PERIODS[rng.integers(len(PATTERN_PERIODS))] if pattern != "solid" else 0.0,
    )


# ---- silhouettes: polygons in unit coordinates (x right, y down), garment centred at x = 0.5 ----


def _mirror(left_side: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Close a left half-outline (top centre -> bottom centre) with its mirror image."""
    return left_side + [(1.0 - x, y) for x, y in reversed(left_side)]


def _top_outline(sleeves: str, hem_y: float, half_width: float, neck_depth: float) -> list[tuple[float, float]]:
    """Left half of a shirt-like top, from the neck down to the hem centre."""
    left = 0.5 - half_width
    outline = [(0.5, 0.18 + neck_depth), (0.42, 0.17)]
    if sleeves == "none":
        outline += [(0.39, 0.18), (left, 0.32)]
    elif sleeves == "short":
        outline += [(left - 0.01, 0.19), (left - 0.13, 0.32), (left - 0.07, 0.37), (left, 0.33)]
    else:
        outline += [(left - 0.01, 0.19), (left - 0.17, 0.62), (left - 0.10, 0.64), (left, 0.36)]
    return outline + [(left, hem_y), (0.5, hem_y)]


def garment_outline(garment: Garment) -> list[tuple[float, float]]:
    """The silhouette polygon in canvas units ([0, 1] both ways), GARMENT_SCALE times the outline."""
    return [(0.5 + (x - 0.5) * GARMENT_SCALE, 0.5 + (y - 0.5) * GARMENT_SCALE) for x, y in _unit_outline(garment)]


def _unit_outline(garment: Garment) -> list[tuple[float, float]]:
    long = garment.length == "long"
    if garment.shape == "shirt":
        return _mirror(_top_outline(garment.sleeves, 0.80 if long else 0.62, 0.16, 0.06))
    if garment.shape == "jacket":
        neck_depth = 0.24 if garment.cut == "wide" else 0.04  # deep lapels vs a high collar
        return _mirror(_top_outline("long", 0.84 if long else 0.64, 0.20, neck_depth))
    if garment.shape == "dress":
        top = _top_outline(garment.sleeves, 0.40, 0.13, 0.07)[:-2]
        hem_y, hem_x = (0.92, 0.22) if long else (0.68, 0.28)
        return _mirror(top + [(0.37, 0.42), (hem_x, hem_y), (0.5, hem_y)])
    if garment.shape == "trousers":
        hem_y = 0.92 if long else 0.56
        outer, inner = (0.25, 0.43) if garment.cut == "wide" else (0.33, 0.44)
        return _mirror([(0.5, 0.36), (0.5, 0.10), (0.33, 0.10), (outer, hem_y), (inner, hem_y)])
    if garment.shape == "skirt":
        hem_y = 0.85 if long else 0.60
        hem_x = 0.18 if garment.cut == "wide" else 0.31
        return _mirror([(0.5, 0.28), (0.37, 0.28), (hem_x, hem_y), (0.5, hem_y)])
    raise ValueError(f"unknown garment shape {garment.shape!r}, expected one of {SHAPES}")


def garment_mask(garment: Garment, size: int) -> np.ndarray:
    """Anti-aliased silhouette in [0, 1], shape (size, size)."""
    supersample = 4  # draw large and shrink, so edges are smooth at 64 px
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon([(x * big, y * big) for x, y in garment_outline(garment)], fill=255)
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255.0


def pattern_weight(garment: Garment, size: int) -> np.ndarray:
    """Share of the secondary colour at each pixel, in [0, 1], shape (size, size)."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if garment.pattern == "solid":
        # A band of the secondary colour along the hem, so that both colours show on every item.
        hem_y = max(y for _, y in garment_outline(garment))
        return ((v > hem_y - 0.1) & (v < hem_y)).astype(np.float32)
    phase = 2 * math.pi / garment.period
    if garment.pattern == "stripes":
        angle = math.radians(garment.angle_deg)
        return _soft_step(np.sin(phase * (u * math.cos(angle) + v * math.sin(angle))))
    if garment.pattern == "checks":
        return 0.5 * (_soft_step(np.sin(phase * u)) + _soft_step(np.sin(phase * v)))
    if garment.pattern == "dots":
        # Distance to the nearest dot centre, in periods; dots cover a disc of radius 0.3 period.
        du = (u / garment.period) % 1.0 - 0.5
        dv = (v / garment.period) % 1.0 - 0.5
        return np.clip((0.3 - np.sqrt(du * du + dv * dv)) * size * garment.period + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown pattern {garment.pattern!r}, expected one of {PATTERNS}")


def _soft_step(wave: np.ndarray) -> np.ndarray:
    """A square wave with soft edges from a sine wave."""
    return np.clip(0.5 + 2.0 * wave, 0.0, 1.0)


def garment_rgba(garment: Garment, size: int) -> Image.Image:
    """The garment on a transparent canvas, in its canonical pose."""
    weight = pattern_weight(garment, size)[..., None]
    rgb = (1.0 - weight) * PALETTE[garment.primary] + weight * PALETTE[garment.secondary]
    alpha = garment_mask(garment, size)[..., None] * 255.0
    return Image.fromarray(np.concatenate([rgb, alpha], axis=-1).round().astype(np.uint8), "RGBA")


# ---- views: pose, background, lighting ----


def random_background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient in a random direction with a few random shapes on it."""
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (u - 0.5) * math.cos(angle) + (v - 0.5) * math.sin(angle), 0.0, 1.0)[..., None]
    background = Image.fromarray(((1 - t) * colours[0] + t * colours[1]).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(background)
    for _ in range(rng.integers(*CLUTTER_SHAPES)):
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(*CLUTTER_SIZE, size=2) * size
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        else:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
    return background


def pose_matrix(rng: np.random.Generator, size: int) -> tuple[float, ...]:
    """Output-to-input affine map (PIL's convention) of a random flip, scale, squeeze, rotation, shift."""
    scale = rng.uniform(*POSE_SCALE)
    squeeze = rng.uniform(*POSE_SQUEEZE)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    angle = math.radians(rng.uniform(-POSE_ROTATION_DEG, POSE_ROTATION_DEG))
    shift_x, shift_y = rng.uniform(-POSE_SHIFT, POSE_SHIFT, size=2) * size
    # Forward map about the image centre c: out = R @ diag(flip*scale*squeeze, scale) @ (in - c) + c + shift.
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = flip * scale * squeeze, scale
    forward = np.array([[cos * sx, -sin * sy], [sin * sx, cos * sy]])
    inverse = np.linalg.inv(forward)
    centre = np.array([size / 2, size / 2])
    offset = centre - inverse @ (centre + np.array([shift_x, shift_y]))
    return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def relight(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and colour cast, plus sensor noise; float32 RGB in, uint8 out."""
    contrast = rng.uniform(*LIGHT_CONTRAST)
    brightness = rng.uniform(-LIGHT_BRIGHTNESS, LIGHT_BRIGHTNESS)
    cast = rng.uniform(*LIGHT_CAST, size=3).astype(np.float32)
    mean = image.mean()
    image = ((image - mean) * contrast + mean + brightness) * cast
    image += rng.normal(0.0, NOISE_STD, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def render_view(garment_image: Image.Image, rng: np.random.Generator) -> Image.Image:
    size = garment_image.width
    posed = garment_image.transform(
        (size, size), Image.Transform.AFFINE, pose_matrix(rng, size), resample=Image.Resampling.BILINEAR
    )
    background = random_background(rng, size)
    background.paste(posed, (0, 0), posed)
    return Image.fromarray(relight(np.asarray(background, dtype=np.float32), rng), "RGB")


# ---- the data set ----


@dataclass(frozen=True)
class ItemPlan:
    item_id: str
    gender: str
    garment: Garment
    statuses: tuple[str, ...]  # one of train / query / gallery per view

    def image_name(self, view: int) -> str:
        """Path relative to Img/, as in the real partition file."""
        code, name = VIEW_NAMES[view % len(VIEW_NAMES)]
        folder = f"img/{self.gender}/{self.garment.category(self.gender)}/{self.item_id}"
        return f"{folder}/{view + 1:02d}_{code}_{name}.jpg"


def plan_items(items: int, views: int, seed: int, train_fraction: float) -> list[ItemPlan]:
    """Distinct garments, about train_fraction of them train, the rest split into query and gallery views."""
    rng = np.random.default_rng([seed, 0])
    garments: list[Garment] = []
    seen: set[Garment] = set()
    while len(garments) < items:
        garment = random_garment(rng)
        if garment not in seen:  # two items with identical attributes could not be told apart
            seen.add(garment)
            garments.append(garment)
    is_train = np.zeros(items, dtype=bool)
    is_train[rng.permutation(items)[: round(items * train_fraction)]] = True
    plans = []
    for index, garment in enumerate(garments):
        if is_train[index]:
            statuses = ("train",) * views
        else:
            # At least one query and one gallery view; which views are queries is random.
            query_views = set(rng.permutation(views)[: views // 2].tolist())
            statuses = tuple("query" if v in query_views else "gallery" for v in range(views))
        women_only = garment.shape in ("dress", "skirt")
        gender = "WOMEN" if women_only or rng.random() < 0.5 else "MEN"
        plans.append(ItemPlan(f"id_{index + 1:08d}", gender, garment, statuses))
    return plans


def write_data_set(root: Path, plans: list[ItemPlan], size: int, seed: int) -> None:
    rows = []
    for item_index, plan in enumerate(plans):
        garment_image = garment_rgba(plan.garment, size)
        for view, status in enumerate(plan.statuses):
            name = plan.image_name(view)
            path = root / "Img" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, 1, item_index, view])  # any one view can be re-rendered alone
            render_view(garment_image, rng).save(path, format="JPEG", quality=JPEG_QUALITY)
            rows.append((name, plan.item_id, status))
    (root / "Eval").mkdir()
    (root / PARTITION_FILE).write_text(partition_text(rows))


def generate_inshop(
    out_dir: str | os.PathLike,
    items: int = DEFAULT_ITEMS,
    views: int = DEFAULT_VIEWS,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
) -> Path:
    """Write a synthetic In-Shop-format data set to out_dir and return its path.

    The set is built in a temporary sibling folder and renamed into place, so out_dir either does
    not exist or holds a complete set. If out_dir already holds a set generated with the same
    parameters (and generator version) it is reused, so several processes may call this at once;
    an empty out_dir is filled; any other existing out_dir is an error.
    """
    _check_arguments(items, views, size, train_fraction)
    out_dir = Path(out_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "items": items,
        "views": views,
        "size": size,
        "seed": seed,
        "train_fraction": train_fraction,
    }
    if out_dir.exists() and not _is_empty_folder(out_dir):
        return _reuse(out_dir, params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_data_set(staging, plan_items(items, views, seed, train_fraction), size, seed)
        (staging / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        os.rename(staging, out_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if out_dir.exists() and not _is_empty_folder(out_dir):  # another process finished first
            return _reuse(out_dir, params)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_arguments(items: int, views: int, size: int, train_fraction: float) -> None:
    if views < 2:
        raise ValueError(f"views={views}: need at least 2 views per item (one query and one gallery image)")
    if size < 16:
        raise ValueError(f"size={size}: images must be at least 16 px to show a garment")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction}: expected a value strictly between 0 and 1")
    n_train = round(items * train_fraction)
    if n_train < 1 or items - n_train < 2:
        raise ValueError(f"items={items}, train_fraction={train_fraction}: need at least 1 train and 2 test items")


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _reuse(out_dir: Path, params: dict) -> Path:
    params_file = out_dir / PARAMS_FILE
    if not params_file.is_file():
        raise FileExistsError(
            f"{out_dir} exists and is not a synthetic data set (no {PARAMS_FILE}); choose another folder"
        )
    try:
        found = json.loads(read_text(params_file))
    except json.JSONDecodeError as error:
        raise DataError(f"{params_file}:{error.lineno}: not valid JSON: {error.msg}") from None
    if found != params:
        raise FileExistsError(
            f"{params_file}: holds a set generated with {found}, not {params}; remove it or choose another folder"
        )
    return out_dir


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m arcface.synthetic",
        description="Write a synthetic data set in the DeepFashion In-Shop layout "
        "(Eval/list_eval_partition.txt and Img/img/...).",
    )
    parser.add_argument(
        "out", type=Path, help="folder to create (must not exist, be empty, or hold a set made with the same arguments)"
    )
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help=f"garments (default {DEFAULT_ITEMS})")
    parser.add_argument("--views", type=int, default=DEFAULT_VIEWS, help=f"images each (default {DEFAULT_VIEWS})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument(
        "--train_fraction",
        type=float,
        default=DEFAULT_TRAIN_FRACTION,
        help=f"share of garments in the train split; the rest are split into query and gallery views "
        f"(default {DEFAULT_TRAIN_FRACTION})",
    )
    args = parser.parse_args(argv)
    try:
        root = generate_inshop(args.out, args.items, args.views, args.size, args.seed, args.train_fraction)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"wrote {args.items * args.views} images of {args.items} items to {root}")


if __name__ == "__main__":
    main()
