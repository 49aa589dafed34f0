"""Your own images: turn a class-per-folder tree into an In-Shop-layout data root.

    python tools/from_folder.py IMAGES OUT [--test_fraction 0.5] [--seed 0] [--copy] [--force]

The rules and what is refused: arcface/from_folder/__init__.py and docs/TOOLS.md, "Your own images".
(`python -m arcface.from_folder` runs this same command.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's root on the path, as the launchers have it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arcface.from_folder import DEFAULT_SEED, DEFAULT_TEST_FRACTION, MAX_IMAGE_PIXELS, convert, format_summary  # noqa: E402
from support.errors import one_line_errors  # noqa: E402


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value strictly between 0 and 1, got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


@one_line_errors(also=(ValueError,))  # DataError is a ValueError
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/from_folder.py",
        description="Turn a class-per-folder image tree (IMAGES/<class>/<image>) into a data root in the "
        "DeepFashion In-Shop layout (OUT/Eval/list_eval_partition.txt, OUT/Img/img/<class>/<image>) for "
        "--data_root. Classes are split between train and test; each test class's images alternate query "
        "and gallery. docs/TOOLS.md, 'Your own images', gives the rules.",
    )
    parser.add_argument("images", type=Path, metavar="IMAGES", help="the tree: one folder per class, images inside")
    parser.add_argument("out", type=Path, metavar="OUT", help="the root to write (missing, empty, or a previous "
                        "output of this command for IMAGES, which is rebuilt)")
    parser.add_argument("--test_fraction", type=_fraction, default=DEFAULT_TEST_FRACTION,
                        help=f"share of the classes with 2+ images that go to test (default {DEFAULT_TEST_FRACTION})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"chooses the test classes (default {DEFAULT_SEED})")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("--force", action="store_true",
                        help="replace an output of this command made from other IMAGES")
    parser.add_argument("--max_image_pixels", type=_positive, default=MAX_IMAGE_PIXELS,
                        help=f"refuse images whose header claims more pixels, as training would "
                        f"(default {MAX_IMAGE_PIXELS})")
    args = parser.parse_args(argv)
    summary = convert(args.images, args.out, args.test_fraction, args.seed, args.copy, args.force,
                      args.max_image_pixels)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
