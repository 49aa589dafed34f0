"""The synthetic In-Shop-format generator: layout, file format, determinism, atomic writes, CLI."""
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcface import synthetic
from arcface.synthetic import generate_inshop

REPO = Path(__file__).resolve().parents[1]
IMAGE_NAME = re.compile(r"img/(MEN|WOMEN)/[A-Z][A-Za-z_]+/(id_\d{8})/\d{2}_\d_[a-z]+\.jpg")
ITEMS, VIEWS, SIZE = 12, 3, 32


def read_rows(root: Path) -> tuple[list[str], list[list[str]]]:
    """Raw lines, and rows split on whitespace, read independently of arcface.inshop."""
    lines = (root / "Eval" / "list_eval_partition.txt").read_text().split("\n")
    assert lines[-1] == ""  # the file ends with a newline
    return lines[:-1], [line.split() for line in lines[2:-1]]


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate_inshop(tmp_path_factory.mktemp("synthetic") / "set", items=ITEMS, views=VIEWS, size=SIZE, seed=5)


def test_partition_file_has_the_real_format(small_set: Path):
    lines, rows = read_rows(small_set)
    assert lines[0] == str(ITEMS * VIEWS) == str(len(rows))
    assert lines[1] == "image_name item_id evaluation_status"
    for line, row in zip(lines[2:], rows):
        assert len(row) == 3
        assert line.endswith(" ")  # trailing spaces, like the real file
        assert re.search(r"\.jpg {2,}id_", line)  # columns padded with runs of spaces
        assert IMAGE_NAME.fullmatch(row[0]), row[0]
        assert IMAGE_NAME.fullmatch(row[0]).group(2) == row[1]
        assert row[2] in ("train", "query", "gallery")


def test_every_listed_image_exists_with_the_right_size(small_set: Path):
    _, rows = read_rows(small_set)
    listed = {small_set / "Img" / name for name, _, _ in rows}
    assert listed == set((small_set / "Img").rglob("*.jpg"))
    for path in listed:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_splits_disjoint_items_with_query_and_gallery_for_every_test_item(small_set: Path):
    _, rows = read_rows(small_set)
    statuses = defaultdict(Counter)
    for _, item, status in rows:
        statuses[item][status] += 1
    assert len(statuses) == ITEMS
    train_items = [item for item, count in statuses.items() if count["train"]]
    assert len(train_items) == ITEMS // 2
    for item, count in statuses.items():
        assert sum(count.values()) == VIEWS
        if count["train"]:
            assert count["train"] == VIEWS  # a train item has no query or gallery image
        else:
            assert count["query"] >= 1 and count["gallery"] >= 1


def test_views_of_one_item_differ(small_set: Path):
    _, rows = read_rows(small_set)
    item = rows[0][1]
    views = [np.asarray(Image.open(small_set / "Img" / name), dtype=np.float32) for name, it, _ in rows if it == item]
    for a in range(len(views)):
        for b in range(a + 1, len(views)):
            assert np.abs(views[a] - views[b]).mean() > 5.0  # pose, light and background change


def test_items_are_distinct_combinations_of_shared_attributes():
    garments = [plan.garment for plan in synthetic.plan_items(items=200, views=2, seed=0, train_fraction=0.5)]
    assert len(set(garments)) == len(garments)
    # Each single attribute value is shared by many items: no one attribute identifies an item.
    for attribute in ("shape", "primary", "secondary", "pattern", "length"):
        counts = Counter(getattr(garment, attribute) for garment in garments)
        assert min(counts.values()) >= 5, (attribute, counts)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(small_set: Path, tmp_path: Path):
    again = generate_inshop(tmp_path / "again", items=ITEMS, views=VIEWS, size=SIZE, seed=5)
    other = generate_inshop(tmp_path / "other", items=ITEMS, views=VIEWS, size=SIZE, seed=6)
    reference = file_bytes(small_set)
    assert file_bytes(again) == reference
    other_bytes = file_bytes(other)
    differing = [name for name in reference if name.endswith(".jpg") and other_bytes.get(name) != reference[name]]
    assert len(differing) > len(reference) // 2


def test_existing_set_with_same_parameters_is_reused(small_set: Path):
    partition = small_set / "Eval" / "list_eval_partition.txt"
    before = partition.stat().st_mtime_ns
    assert generate_inshop(small_set, items=ITEMS, views=VIEWS, size=SIZE, seed=5) == small_set
    assert partition.stat().st_mtime_ns == before


def test_existing_folder_with_other_contents_is_refused(small_set: Path, tmp_path: Path):
    with pytest.raises(FileExistsError, match="synthetic.json"):
        generate_inshop(small_set, items=ITEMS, views=VIEWS, size=SIZE, seed=6)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a data set")
    with pytest.raises(FileExistsError, match="mine"):
        generate_inshop(tmp_path / "mine", items=4, views=2, size=32)
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_set_from_another_generator_version_is_refused(small_set: Path, monkeypatch):
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    with pytest.raises(FileExistsError, match="generator_version"):
        generate_inshop(small_set, items=ITEMS, views=VIEWS, size=SIZE, seed=5)


@pytest.mark.parametrize("content, message", [
    (b'{"items": 4,\n "seed": "\xe9"}\n', r"synthetic\.json:2: not UTF-8 text \(byte 0xE9 at column 11\)"),
    (b'{"items": 4,\n "seed": }\n', r"synthetic\.json:2: not valid JSON"),
], ids=["latin-1", "bad-json"])
def test_an_unreadable_parameter_file_names_its_line(tmp_path: Path, content: bytes, message: str):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / synthetic.PARAMS_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        generate_inshop(tmp_path / "set", items=4, views=2, size=32)


def test_an_empty_folder_is_filled(tmp_path: Path):
    (tmp_path / "set").mkdir()
    root = generate_inshop(tmp_path / "set", items=4, views=2, size=32)
    assert (root / "Eval" / "list_eval_partition.txt").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["set"]


def test_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    calls = []

    def fail_after_three_images(image, path, **kwargs):
        calls.append(path)
        if len(calls) > 3:
            raise OSError("disk full")
        Image.Image.save(image, path, **kwargs)

    monkeypatch.setattr(synthetic.Image.Image, "save", fail_after_three_images)
    with pytest.raises(OSError, match="disk full"):
        generate_inshop(tmp_path / "set", items=4, views=2, size=32)
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []  # neither the set nor its staging folder


@pytest.mark.parametrize(
    "kwargs, fragment", [({"views": 1}, "views=1"), ({"items": 2}, "items=2"), ({"size": 8}, "size=8")]
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, fragment: str):
    with pytest.raises(ValueError, match=fragment):
        generate_inshop(tmp_path / "set", **kwargs)
    assert not (tmp_path / "set").exists()


def test_command_line(tmp_path: Path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "arcface.synthetic", str(out)]
    command += ["--items", "4", "--views", "2", "--size", "24", "--seed", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines, rows = read_rows(out)
    assert lines[0] == "8" and len(rows) == 8
    assert all((out / "Img" / name).is_file() for name, _, _ in rows)
    assert file_bytes(out) == file_bytes(generate_inshop(tmp_path / "api", items=4, views=2, size=24, seed=1))

    refused = subprocess.run(command[:4] + ["--views", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "views=1" in refused.stderr

    helped = subprocess.run(command[:3] + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--items" in helped.stdout and "In-Shop" in helped.stdout
