"""python -m arcface.from_folder: a class-per-folder tree becomes an In-Shop-layout root that trains."""
import errno
import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from arcface import from_folder
from arcface.from_folder import convert
from arcface.inshop import InShop
from arcface.partition import read_partition

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """counts[class] images per class folder, JPEG and PNG in turn, each a different colour."""
    for index, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for view in range(count):
            colour = ((37 * index) % 256, (71 * view) % 256, (13 * index + 101 * view) % 256)
            image = Image.new("RGB", (size, size), colour)
            if view % 2:
                image.save(folder / f"{view:02d}.png", format="PNG")
            else:
                image.save(folder / f"{view:02d}.jpg", format="JPEG")
    return root


def jpeg_bytes(size: int = 8) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (size, size), (200, 30, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def statuses_by_item(out: Path) -> dict[str, Counter]:
    """item id -> Counter of its statuses, read from the partition file without arcface.inshop."""
    lines = (out / "Eval" / "list_eval_partition.txt").read_text(encoding="utf-8").split("\n")
    statuses: dict[str, Counter] = defaultdict(Counter)
    for line in lines[2:-1]:
        _, item, status = line.split()
        statuses[item][status] += 1
    return statuses


def partition_bytes(out: Path) -> bytes:
    return (out / "Eval" / "list_eval_partition.txt").read_bytes()


def cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "arcface.from_folder", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir() if ".partial-" in path.name or ".previous-" in path.name]


COUNTS = {f"class_{index:02d}": 2 + index % 4 for index in range(10)} | {"lonely": 1}
TOTAL = sum(COUNTS.values())  # 34


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "images", COUNTS)


# ---- the root ----


def test_the_root_loads_for_every_split_with_the_expected_counts(tree: Path, tmp_path: Path):
    summary = convert(tree, tmp_path / "out")
    out = tmp_path / "out"
    statuses = statuses_by_item(out)
    assert set(statuses) == set(COUNTS)  # the item id is the class name
    test_items = {item for item, count in statuses.items() if count["query"] or count["gallery"]}
    train_items = {item for item, count in statuses.items() if count["train"]}
    assert not test_items & train_items
    assert len(test_items) == 5  # half (rounded half up) of the 10 classes with 2+ images
    for item in test_items:
        images = COUNTS[item]
        assert statuses[item] == Counter(query=(images + 1) // 2, gallery=images // 2)

    train, query, gallery = (InShop(out, split) for split in ("train", "query", "gallery"))
    assert len(train) == sum(COUNTS[item] for item in train_items) == summary.split.count("train")
    assert len(query) == sum((COUNTS[item] + 1) // 2 for item in test_items)
    assert len(gallery) == sum(COUNTS[item] // 2 for item in test_items)
    assert set(train.item_ids) == train_items and train.num_classes == 6
    assert set(query.item_ids) == set(gallery.item_ids) == test_items
    assert set(query.labels.tolist()) == set(gallery.labels.tolist())  # every query has a gallery image
    # Every listed file is the source image, under its class folder.
    for path, label in train.samples + query.samples:
        relative = Path(path).relative_to(out / "Img" / "img")
        assert Path(path).read_bytes() == (tree / relative).read_bytes()
    assert len(train) + len(query) + len(gallery) == TOTAL


def test_the_partition_file_has_in_shops_format(tree: Path, tmp_path: Path):
    convert(tree, tmp_path / "out")
    lines = partition_bytes(tmp_path / "out").decode().split("\n")
    assert lines[0] == str(TOTAL) and lines[1] == "image_name item_id evaluation_status"
    assert lines[-1] == ""
    names = [line.split()[0] for line in lines[2:-1]]
    assert len(set(names)) == len(names)
    for line in lines[2:-1]:
        name, item, _ = line.split()
        assert name.startswith(f"img/{item}/") and name.count("/") == 2  # relative to Img/, as In-Shop
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"Eval", "Img", "from_folder.json"}


def test_a_test_class_alternates_query_and_gallery_in_name_order(tmp_path: Path):
    tree = make_tree(tmp_path / "images", {"a": 5, "b": 5})
    summary = convert(tree, tmp_path / "out")
    (test_item,) = summary.split.test
    rows = [(name, status) for name, item, status in summary.split.rows if item == test_item]
    assert [status for _, status in rows] == ["query", "gallery", "query", "gallery", "query"]
    assert [name for name, _ in rows] == sorted(name for name, _ in rows)


def test_single_image_classes_are_trained_on_and_reported(tree: Path, tmp_path: Path):
    summary = convert(tree, tmp_path / "out")
    assert summary.split.single_image == ("lonely",)
    assert statuses_by_item(tmp_path / "out")["lonely"] == Counter(train=1)
    text = from_folder.format_summary(summary)
    assert "1 class(es) with a single image cannot be searched" in text and "lonely" in text


# ---- determinism ----


def test_same_tree_and_seed_give_identical_bytes_whatever_the_listing_order(tree: Path, tmp_path: Path, monkeypatch):
    convert(tree, tmp_path / "first", seed=3)
    real_scandir = os.scandir

    class ReversedListing:
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = sorted(entries, key=lambda entry: entry.name, reverse=True)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(from_folder.os, "scandir", ReversedListing)
    convert(tree, tmp_path / "second", seed=3)
    assert partition_bytes(tmp_path / "first") == partition_bytes(tmp_path / "second")


def test_another_seed_chooses_other_test_classes(tmp_path: Path):
    tree = make_tree(tmp_path / "images", {f"c{index:02d}": 2 for index in range(20)})
    tests = [set(convert(tree, tmp_path / f"out{seed}", test_fraction=0.25, seed=seed).split.test) for seed in (0, 1)]
    assert len(tests[0]) == len(tests[1]) == 5
    assert tests[0] != tests[1]


# ---- links and copies ----


def test_images_are_hard_linked_by_default(tree: Path, tmp_path: Path):
    summary = convert(tree, tmp_path / "out")
    assert summary.links == {"hard link": TOTAL, "symbolic link": 0, "copy": 0}
    target = tmp_path / "out" / "Img" / "img" / "class_00" / "00.jpg"
    assert not target.is_symlink() and os.path.samefile(target, tree / "class_00" / "00.jpg")
    assert f"{TOTAL} hard links" in from_folder.format_summary(summary)


def test_copy_flag_copies(tree: Path, tmp_path: Path):
    summary = convert(tree, tmp_path / "out", copy=True)
    assert summary.links == {"hard link": 0, "symbolic link": 0, "copy": TOTAL}
    target = tmp_path / "out" / "Img" / "img" / "class_00" / "00.jpg"
    assert not target.is_symlink() and not os.path.samefile(target, tree / "class_00" / "00.jpg")
    assert target.read_bytes() == (tree / "class_00" / "00.jpg").read_bytes()
    assert f"{TOTAL} copies" in from_folder.format_summary(summary)


def test_without_hard_links_images_are_symlinked_else_copied(tree: Path, tmp_path: Path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(from_folder.os, "link", no_link)
    summary = convert(tree, tmp_path / "symlinked")
    target = tmp_path / "symlinked" / "Img" / "img" / "class_00" / "00.jpg"
    assert summary.links["symbolic link"] == TOTAL and target.is_symlink()
    assert Path(os.readlink(target)).is_absolute() and os.path.samefile(target, tree / "class_00" / "00.jpg")
    assert len(InShop(tmp_path / "symlinked", "gallery")) > 0
    assert f"{TOTAL} symbolic links" in from_folder.format_summary(summary)

    monkeypatch.setattr(from_folder.os, "symlink", no_link)
    summary = convert(tree, tmp_path / "copied")
    assert summary.links["copy"] == TOTAL
    assert not (tmp_path / "copied" / "Img" / "img" / "class_00" / "00.jpg").is_symlink()


# ---- names and skipped files ----


def test_whitespace_in_names_becomes_underscores(tmp_path: Path):
    tree = make_tree(tmp_path / "images", {"golden retriever": 2, "tabby\tcat": 2, "owl": 2})
    (tree / "owl" / "00.jpg").rename(tree / "owl" / "front view.jpg")
    summary = convert(tree, tmp_path / "out")
    rows = read_partition(tmp_path / "out" / "Eval" / "list_eval_partition.txt")
    assert {row.item_id for row in rows} == {"golden_retriever", "tabby_cat", "owl"}
    assert "img/owl/front_view.jpg" in {row.image_name for row in rows}
    assert (tmp_path / "out" / "Img" / "img" / "owl" / "front_view.jpg").is_file()
    for split in ("train", "query", "gallery"):
        InShop(tmp_path / "out", split)
    assert "3 name(s) with whitespace renamed in OUT: 'golden retriever' -> 'golden_retriever'" in (
        from_folder.format_summary(summary))


def test_long_class_names_keep_the_columns_apart(tmp_path: Path):
    long_name = "a_class_name_longer_than_twenty_characters"
    tree = make_tree(tmp_path / "images", {long_name: 2, "b": 2, "c": 2})
    convert(tree, tmp_path / "out")
    assert long_name in {row.item_id for row in read_partition(tmp_path / "out" / "Eval" / "list_eval_partition.txt")}


def test_hidden_and_system_files_and_top_level_files_are_skipped(tmp_path: Path):
    tree = make_tree(tmp_path / "images", {"a": 2, "b": 2})
    (tree / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tree / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tree / ".thumbnails").mkdir()
    (tree / "__MACOSX" / "a").mkdir(parents=True)
    (tree / "README.txt").write_text("my photos\n")
    summary = convert(tree, tmp_path / "out")
    assert len(summary.split.rows) == 4
    assert summary.tree.skipped == (".thumbnails", "__MACOSX", "a/.DS_Store", "b/Thumbs.db")
    assert summary.tree.top_level_files == ("README.txt",)
    text = from_folder.format_summary(summary)
    assert "skipped 4 hidden or system file(s)" in text and "ignored 1 file(s) at the top level" in text


def test_a_jpeg_with_a_large_block_before_its_frame_header_is_an_image(tmp_path: Path):
    tree = make_tree(tmp_path / "images", {"a": 2, "b": 2})
    data = jpeg_bytes()
    filler = b"\xff\xe2" + struct.pack(">H", 65002) + bytes(65000)  # an APP2 block, twice: > HEADER_BYTES
    (tree / "a" / "02.jpg").write_bytes(data[:2] + filler + filler + data[2:])
    summary = convert(tree, tmp_path / "out")
    assert "img/a/02.jpg" in {name for name, _, _ in summary.split.rows}


# ---- OUT: reruns, replacing, crashes ----


def test_a_rerun_rebuilds_its_own_output(tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert not convert(tree, out).replaced
    make_tree(tree, {"new_class": 3})
    summary = convert(tree, out)
    assert summary.replaced and "new_class" in statuses_by_item(out)
    assert leftovers(tmp_path) == []
    assert json.loads((out / "from_folder.json").read_text())["images"] == str(tree.resolve())


def test_an_output_for_other_images_is_replaced_only_with_force(tree: Path, tmp_path: Path):
    other = make_tree(tmp_path / "other", {"x": 2, "y": 2})
    out = tmp_path / "out"
    convert(tree, out)
    with pytest.raises(ValueError, match="pass --force"):
        convert(other, out)
    assert "class_00" in statuses_by_item(out)
    convert(other, out, force=True)
    assert set(statuses_by_item(out)) == {"x", "y"}


def test_an_empty_out_folder_is_filled(tree: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    convert(tree, tmp_path / "out")
    assert (tmp_path / "out" / "Eval" / "list_eval_partition.txt").is_file()


def test_a_failed_write_leaves_nothing_behind_and_the_previous_output_intact(tree: Path, tmp_path: Path, monkeypatch):
    real_place = from_folder._place
    calls = []

    def fail_after_three(source, target, copy):
        calls.append(target)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_place(source, target, copy)

    monkeypatch.setattr(from_folder, "_place", fail_after_three)
    with pytest.raises(OSError, match="No space left"):
        convert(tree, tmp_path / "out")
    assert len(calls) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images"]

    monkeypatch.setattr(from_folder, "_place", real_place)
    convert(tree, tmp_path / "out", seed=1)
    before = partition_bytes(tmp_path / "out")
    monkeypatch.setattr(from_folder, "_place", fail_after_three)
    with pytest.raises(OSError, match="No space left"):
        convert(tree, tmp_path / "out", seed=2)
    assert partition_bytes(tmp_path / "out") == before
    assert leftovers(tmp_path) == []


def test_a_rebuild_refused_by_permissions_leaves_nothing_aside(tree: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    convert(tree, out)
    before = partition_bytes(out)
    real_rename = os.rename

    def refuse_moving_out(source, target):
        if Path(source) == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
        real_rename(source, target)

    monkeypatch.setattr(from_folder.os, "rename", refuse_moving_out)
    with pytest.raises(PermissionError):
        convert(tree, out, seed=3)
    assert partition_bytes(out) == before and leftovers(tmp_path) == []


SLOW_COPY = """
import sys, time
from arcface import from_folder
real_place = from_folder._place
def place_then_hang(source, target, copy):
    kind = real_place(source, target, copy)
    time.sleep(600)  # killed here, one image into its staging folder
from_folder._place = place_then_hang
from_folder.convert(sys.argv[1], sys.argv[2], copy=True)
"""


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_run_killed_mid_copy_leaves_a_folder_that_the_next_run_removes(tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, "-c", SLOW_COPY, str(tree), str(out)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob(".out.partial-*/Img/img/*/*")):
            assert killed.poll() is None and time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.05)
    finally:
        killed.kill()
        killed.wait()
    left = leftovers(tmp_path)
    assert len(left) == 1 and f"-{killed.pid}-" in left[0]
    summary = convert(tree, out)
    assert summary.leftovers == (left[0],) and leftovers(tmp_path) == []
    assert "removed 1 folder(s) that killed runs left next to OUT" in from_folder.format_summary(summary)


def test_only_dead_runs_leftovers_are_removed_and_a_moved_aside_root_comes_back(tree: Path, tmp_path: Path):
    out = tmp_path / "out"
    convert(tree, out, seed=5)
    before = partition_bytes(out)
    prefix = lambda kind, pid: from_folder._work_prefix(out, kind).replace(f"-{os.getpid()}-", f"-{pid}-")
    aside = tmp_path / f"{prefix('previous', dead_pid())}x1"  # killed between its two renames
    aside.mkdir()
    out.rename(aside / "root")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [tmp_path / f"{prefix('partial', live.pid)}x2", tmp_path / f".other.partial-{dead_pid()}-x3",
                tmp_path / f"{prefix('partial', dead_pid())}x4".replace(from_folder._host(), "another-host")]
        for folder in kept:
            folder.mkdir()
        assert from_folder.remove_leftovers(out) == [aside.name]
        assert partition_bytes(out) == before  # the root moved aside is OUT again
        assert all(folder.is_dir() for folder in kept)
    finally:
        live.kill()
        live.wait()


# ---- identical images in two classes ----


def test_identical_images_in_two_classes_are_counted_and_only_files_of_equal_size_are_hashed(tmp_path: Path, monkeypatch):
    tree = make_tree(tmp_path / "images", {"a": 2, "b": 2, "c": 2})
    (tree / "c" / "copy.jpg").write_bytes((tree / "a" / "00.jpg").read_bytes())
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tree / "b" / "big.png", format="PNG")  # a size no other file has
    hashed = []
    real_digest = from_folder._digest
    monkeypatch.setattr(from_folder, "_digest", lambda path: hashed.append(path.name) or real_digest(path))
    summary = convert(tree, tmp_path / "out")
    assert summary.tree.duplicates == (("a/00.jpg", "c/copy.jpg"),)
    assert "big.png" not in hashed
    assert "warning: 2 images in 1 group(s) have the same bytes as an image of another class" in \
        from_folder.format_summary(summary)


# ---- bad trees and arguments, through the command line ----


def _tree(tmp_path: Path, counts: dict[str, int]) -> Path:
    return make_tree(tmp_path / "images", counts)


def _missing(tmp_path):
    return [tmp_path / "nothing"], "nothing: no such folder"


def _a_file(tmp_path):
    (tmp_path / "images").write_text("not a folder")
    return [tmp_path / "images"], "images: not a folder"


def _empty(tmp_path):
    (tmp_path / "images").mkdir()
    return [tmp_path / "images"], "no class folders (it is empty)"


def _one_class_folder(tmp_path):
    tree = _tree(tmp_path, {"a": 3})
    return [tree / "a"], "no class folders (3 file(s) at the top level)"


def _empty_class(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    (tree / "c").mkdir()
    (tree / "c" / ".DS_Store").write_bytes(b"x")
    return [tree], "1 class folder(s) hold no images: c"


def _nested(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    make_tree(tree / "a", {"sub": 1})
    return [tree], "a/sub: a folder inside class folder 'a'"


def _not_an_image(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    (tree / "a" / "notes.txt").write_text("hello\n")
    return [tree], "a/notes.txt (not a JPEG, PNG, GIF or WebP file"


def _corrupt_image(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    (tree / "b" / "cut.jpg").write_bytes(jpeg_bytes()[:4])
    return [tree], "b/cut.jpg (JPEG header is truncated)"


def _broken_link(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    (tree / "a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    return [tree], "a/gone.jpg (a broken link)"


def _class_link(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    (tree / "z").symlink_to("a", target_is_directory=True)
    return [tree], f"{tree / 'z'}: a link to class folder {tree / 'a'}: the same images would be in two classes"


def _image_link_into_another_class(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    (tree / "b" / "borrowed.jpg").symlink_to(tree / "a" / "00.jpg")
    return [tree], f"{tree / 'b' / 'borrowed.jpg'}: a link to {tree / 'a' / '00.jpg'}, an image of class folder 'a'"


def _animated_gif(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tree / "a" / "moving.gif", save_all=True, append_images=frames[1:])
    return [tree], "a/moving.gif (an animated GIF of 2 frames)"


def _too_many_pixels(tmp_path):
    return [_tree(tmp_path, {"a": 2, "b": 2}), "--max_image_pixels", 63], "claims 8 x 8 pixels, more than the limit of 63"


def _not_utf8(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    os.rename(tree / "b", os.fsencode(tree) + b"/caf\xe9")
    return [tree], "b'caf\\xe9': the name is not UTF-8"


def _whitespace_collision(tmp_path):
    return [_tree(tmp_path, {"a b": 2, "a_b": 2, "c": 2})], "'a b' and 'a_b' both become 'a_b'"


def _one_class(tmp_path):
    return [_tree(tmp_path, {"a": 3})], "1 class folder (a); need at least 2"


def _no_searchable_class(tmp_path):
    return [_tree(tmp_path, {"a": 1, "b": 1})], "no class folder holds 2 or more images"


def _all_to_test(tmp_path):
    return [_tree(tmp_path, {"a": 2, "b": 2}), "--test_fraction", 0.9], "sends all 2 classes to test"


def _no_test_class(tmp_path):
    return [_tree(tmp_path, {"a": 2, "b": 2, "c": 1}), "--test_fraction", 0.2], "is no test class"


def _out_not_ours(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    return [_tree(tmp_path, {"a": 2, "b": 2})], "not written by python -m arcface.from_folder"


def _out_for_other_images(tmp_path):
    convert(make_tree(tmp_path / "other", {"x": 2, "y": 2}), tmp_path / "out")
    return [_tree(tmp_path, {"a": 2, "b": 2})], "pass --force to replace it"


def _out_holds_other_files(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    convert(tree, tmp_path / "out")
    (tmp_path / "out" / "runs").mkdir()
    return [tree, "--force"], "it also holds runs, which would be deleted"


def _out_inside_images(tmp_path):
    tree = _tree(tmp_path, {"a": 2, "b": 2})
    return [tree], "OUT is inside IMAGES"


BAD_TREES = {
    "missing": _missing, "a-file": _a_file, "empty": _empty, "one-class-folder": _one_class_folder,
    "empty-class": _empty_class, "nested": _nested, "not-an-image": _not_an_image, "corrupt": _corrupt_image,
    "broken-link": _broken_link, "class-link": _class_link, "image-link-into-another-class": _image_link_into_another_class,
    "animated-gif": _animated_gif, "too-many-pixels": _too_many_pixels,
    "not-utf8": _not_utf8, "whitespace-collision": _whitespace_collision, "one-class": _one_class,
    "no-searchable-class": _no_searchable_class, "all-to-test": _all_to_test, "no-test-class": _no_test_class,
    "out-not-ours": _out_not_ours, "out-for-other-images": _out_for_other_images,
    "out-holds-other-files": _out_holds_other_files, "out-inside-images": _out_inside_images,
}


@pytest.mark.parametrize("case", BAD_TREES, ids=list(BAD_TREES))
def test_a_bad_tree_ends_in_one_error_line(case: str, tmp_path: Path):
    args, fragment = BAD_TREES[case](tmp_path)
    out = args[0] / "out" if case == "out-inside-images" else tmp_path / "out"
    before = sorted(path.name for path in out.iterdir()) if out.is_dir() else None
    done = cli(args[0], out, *args[1:])
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert fragment in lines[0]
    assert done.stdout == ""
    assert (sorted(path.name for path in out.iterdir()) if out.is_dir() else None) == before
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("args, fragment", [
    (["--test_fraction", "1.5"], "strictly between 0 and 1"),
    (["--test_fraction", "half"], "expected a number"),
    (["--max_image_pixels", "0"], "positive integer"),
    (["--seed", "x"], "--seed"),
], ids=["fraction-too-big", "fraction-not-a-number", "no-pixels", "seed-not-an-integer"])
def test_a_bad_argument_exits_2_with_the_usage(args: list[str], fragment: str, tmp_path: Path):
    done = cli(_tree(tmp_path, {"a": 2, "b": 2}), tmp_path / "out", *args)
    assert done.returncode == 2 and fragment in done.stderr and "usage:" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_the_root_and_prints_a_summary(tree: Path, tmp_path: Path):
    done = cli(tree, tmp_path / "out", "--seed", "4")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    api = convert(tree, tmp_path / "api", seed=4)
    assert partition_bytes(tmp_path / "out") == partition_bytes(api.out)
    lines = done.stdout.splitlines()
    assert lines[0] == f"{tree} -> {tmp_path / 'out'}: 11 classes, {TOTAL} images"
    assert lines[1].split() == ["train:", "6", "classes", str(api.split.count("train")), "images"]
    assert "hard links" in done.stdout and "lonely" in done.stdout
    assert lines[-1].endswith(f"--data_root {tmp_path / 'out'}")
    helped = cli("--help")
    assert helped.returncode == 0 and "In-Shop" in helped.stdout and "--test_fraction" in helped.stdout


def test_the_module_does_not_import_torch_and_shares_the_loaders_constants():
    from arcface import inshop, transforms

    assert from_folder.PARTITION_FILE is inshop.PARTITION_FILE
    assert from_folder.MAX_IMAGE_PIXELS is transforms.MAX_IMAGE_PIXELS
    probe = "import sys, arcface.from_folder; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# ---- end to end ----


@pytest.mark.slow
def test_a_converted_tree_trains_with_the_smoke_config(tmp_path: Path):
    tree = make_tree(tmp_path / "images", {f"class_{index}": 4 for index in range(8)}, size=32)
    convert(tree, tmp_path / "root")
    command = [sys.executable, "single_gpu.py", "1", "--config", "configs/smoke.toml",
               "--data_root", str(tmp_path / "root"), "--out_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("recall@1" in record for record in records)
    assert (tmp_path / "run" / "snapshot.pt").is_file()
