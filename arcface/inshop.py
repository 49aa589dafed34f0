"""DeepFashion In-Shop Clothes Retrieval: the partition file and the train / query / gallery sets.

Layout (the DeepFashion download, also used by mmpretrain)::

    ROOT/Eval/list_eval_partition.txt
    ROOT/Img/img/MEN/Denim/id_00000080/01_1_front.jpg ...

The partition file: line 1 the number of images, line 2 the header
``image_name item_id evaluation_status``, then one image per line (a path relative to ``Img/``,
an item id, and train / query / gallery), columns separated by runs of spaces.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from arcface.textfile import DataError, read_text
from arcface.transforms import MAX_IMAGE_PIXELS, check_max_pixels, load_image

SPLITS = ("train", "query", "gallery")
HEADER = ("image_name", "item_id", "evaluation_status")
PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
EXPECTED_LAYOUT = (
    "expected the DeepFashion In-Shop layout: ROOT/Eval/list_eval_partition.txt and images under "
    "ROOT/Img/img/<GENDER>/<Category>/<item_id>/*.jpg"
)
MISSING_SHOWN = 5  # how many missing image paths an error message lists


@dataclass(frozen=True)
class PartitionRow:
    image_name: str  # relative to ROOT/Img, starts with "img/"
    item_id: str
    status: str  # train, query or gallery
    line: int  # 1-based line number in the partition file, for error messages


def read_partition(path: str | os.PathLike) -> list[PartitionRow]:
    """Parse and validate list_eval_partition.txt.

    A missing file raises FileNotFoundError; anything else wrong raises DataError (a ValueError)
    whose message is one line starting with the file and, where there is one, the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: partition file not found; {EXPECTED_LAYOUT}")
    # Split on newlines only (read_text turned CRLF into LF), so line numbers are an editor's;
    # str.splitlines would also break at form feeds and other separators.
    lines = read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and a header line, found {len(lines)} line(s)")
    declared_count = _parse_count(path, lines[0])
    _check_header(path, lines[1])
    rows = [_parse_row(path, number, line) for number, line in enumerate(lines[2:], start=3) if line.strip()]
    if declared_count != len(rows):
        raise DataError(f"{path}:1: the count line says {declared_count} images but the file lists {len(rows)}")
    _check_unique_images(path, rows)
    _check_test_items_not_in_train(path, rows)
    _check_queries_have_gallery(path, rows)
    return rows


def _parse_count(path: Path, line: str) -> int:
    try:
        return int(line.strip())
    except ValueError:
        raise DataError(f"{path}:1: expected the number of images (an integer), got {line.strip()!r}") from None


def _check_header(path: Path, line: str) -> None:
    if tuple(line.split()) != HEADER:
        raise DataError(f"{path}:2: expected the header {' '.join(HEADER)!r}, got {line.strip()!r}")


def _parse_row(path: Path, number: int, line: str) -> PartitionRow:
    fields = line.split()  # runs of spaces or tabs; trailing whitespace is ignored
    if len(fields) != 3:
        raise DataError(
            f"{path}:{number}: expected 3 columns (image_name item_id evaluation_status), "
            f"got {len(fields)}: {line.strip()!r}"
        )
    image_name, item_id, status = fields
    if status not in SPLITS:
        raise DataError(f"{path}:{number}: unknown evaluation_status {status!r}, expected one of {', '.join(SPLITS)}")
    if not image_name.startswith("img/"):
        raise DataError(
            f"{path}:{number}: expected an image path relative to Img/ starting with 'img/', got {image_name!r}"
        )
    return PartitionRow(image_name, item_id, status, number)


def _check_unique_images(path: Path, rows: list[PartitionRow]) -> None:
    first_line: dict[str, int] = {}
    for row in rows:
        seen_at = first_line.setdefault(row.image_name, row.line)
        if seen_at != row.line:
            raise DataError(f"{path}:{row.line}: image {row.image_name!r} is already listed on line {seen_at}")


def _check_test_items_not_in_train(path: Path, rows: list[PartitionRow]) -> None:
    train_line = {}
    for row in rows:
        if row.status == "train":
            train_line.setdefault(row.item_id, row.line)
    for row in rows:
        if row.status != "train" and row.item_id in train_line:
            raise DataError(
                f"{path}:{row.line}: item {row.item_id!r} is in {row.status} but also in train "
                f"(line {train_line[row.item_id]}); query and gallery items must not be train items"
            )


def _check_queries_have_gallery(path: Path, rows: list[PartitionRow]) -> None:
    gallery_items = {row.item_id for row in rows if row.status == "gallery"}
    for row in rows:
        if row.status == "query" and row.item_id not in gallery_items:
            raise DataError(f"{path}:{row.line}: query item {row.item_id!r} has no gallery image")


def contiguous_labels(item_ids: Iterable[str]) -> dict[str, int]:
    """Item id -> class index 0, 1, 2 ... in order of first appearance."""
    labels: dict[str, int] = {}
    for item_id in item_ids:
        labels.setdefault(item_id, len(labels))
    return labels


def find_missing_files(paths: list[str]) -> list[str]:
    """The paths that do not exist, in input order.

    Lists each folder once instead of calling stat on every file: In-Shop's images sit in item
    folders of several views each, so this makes several times fewer file-system calls, and on a
    network file system each call is a round trip.
    """
    present_by_folder: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        present = present_by_folder.get(folder)
        if present is None:
            try:
                present = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                present = set()
            present_by_folder[folder] = present
        if name not in present:
            missing.append(path)
    return missing


class InShop(Dataset):
    """One split of In-Shop (or of a synthetic set in the same layout).

    Train labels are the train items numbered 0..num_classes-1 in order of first appearance.
    Query and gallery share one numbering built from the query and gallery rows, so a query and a
    gallery image have the same label exactly when they show the same item. ``item_ids[label]``
    is the item id of a label. ``max_pixels`` is passed on to `load_image`: an image whose header
    claims more pixels is refused before it is decoded.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Callable[[Any], Any] | None = None,
        check_files: bool = True,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        check_max_pixels(max_pixels)
        self.max_pixels = max_pixels
        self.root = Path(root)
        self.split = split
        self.transform = transform
        partition_file = self.root / PARTITION_FILE
        rows = read_partition(partition_file)
        numbered_rows = [row for row in rows if (row.status == "train") == (split == "train")]
        label_of = contiguous_labels(row.item_id for row in numbered_rows)
        self.item_ids: list[str] = list(label_of)
        self.num_classes: int = len(label_of)
        image_dir = self.root / "Img"
        self.samples: list[tuple[str, int]] = [
            (str(image_dir / row.image_name), label_of[row.item_id]) for row in rows if row.status == split
        ]
        if not self.samples:
            raise DataError(f"{partition_file}: no {split!r} rows")
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        if check_files:
            self._check_files_exist(partition_file)

    def _check_files_exist(self, partition_file: Path) -> None:
        missing = find_missing_files([path for path, _ in self.samples])
        if missing:
            shown = ", ".join(missing[:MISSING_SHOWN])
            more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
            raise FileNotFoundError(
                f"{partition_file}: {len(missing)} of {len(self.samples)} {self.split} images listed there "
                f"are missing under {self.root / 'Img'}: {shown}{more}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path, self.max_pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
