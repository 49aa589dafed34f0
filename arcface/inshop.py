"""DeepFashion In-Shop Clothes Retrieval: the partition file and the train / query / gallery sets.

Layout (the DeepFashion download, also used by mmpretrain)::

    ROOT/Eval/list_eval_partition.txt
    ROOT/Img/img/MEN/Denim/id_00000080/01_1_front.jpg ...

The partition file's format: arcface/partition.py.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from arcface.partition import PARTITION_FILE, SPLITS, read_partition
from arcface.textfile import DataError
from arcface.transforms import MAX_IMAGE_PIXELS, check_max_pixels, load_image

MISSING_SHOWN = 5  # how many missing image paths an error message lists


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
