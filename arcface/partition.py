"""The In-Shop partition file, `Eval/list_eval_partition.txt`: its format, read and written here only.

Line 1 the number of images, line 2 the header ``image_name item_id evaluation_status``, then one
image per line (a path relative to ``Img/``, an item id, and train / query / gallery), columns
separated by runs of spaces. Read by `arcface.inshop`; written by `arcface.synthetic` and
`arcface.from_folder`. Free of torch, so the conversion command starts at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from arcface.textfile import DataError, read_text

SPLITS = ("train", "query", "gallery")
HEADER = ("image_name", "item_id", "evaluation_status")
PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
EXPECTED_LAYOUT = (
    "expected the DeepFashion In-Shop layout: ROOT/Eval/list_eval_partition.txt and images under "
    "ROOT/Img/img/<GENDER>/<Category>/<item_id>/*.jpg"
)


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


def partition_text(rows: list[tuple[str, str, str]]) -> str:
    """The partition file: count line, header line, space-padded columns with trailing spaces."""
    name_width = max(len(name) for name, _, _ in rows) + 8
    item_width = max(20, max(len(item) for _, item, _ in rows) + 1)  # a space after the longest item id
    lines = [f"{len(rows)}", " ".join(HEADER)]
    lines += [f"{name:<{name_width}}{item:<{item_width}}{status:<12}" for name, item, status in rows]
    return "\n".join(lines) + "\n"
