"""Your own images: a class-per-folder image tree -> a data root in the DeepFashion In-Shop layout.

    python tools/from_folder.py IMAGES OUT [--test_fraction 0.5] [--seed 0] [--copy] [--force]
    (or python -m arcface.from_folder IMAGES OUT ...)

reads ``IMAGES/<class>/<image>`` (torchvision's ImageFolder convention, one level deep) and writes

    OUT/Eval/list_eval_partition.txt      count, header, one "img/<class>/<image> <class> <split>" row per image
    OUT/Img/img/<class>/<image>           hard links to IMAGES, else symbolic links, else copies
    OUT/from_folder.json                  the arguments, so that a later run recognises its own output

so that ``--data_root OUT`` trains on it with every launcher and tool. The rules (docs/TOOLS.md,
"Your own images", explains them for users):

- Classes, not images, are split between train and test, as In-Shop's items are: a test class's
  images are searched for among the other images of the test classes, never trained on.
  ``test_fraction`` of the classes with at least 2 images go to test (rounded half up), chosen by
  a hash of (seed, class name): the same tree and seed give a byte-identical partition file,
  whatever order the file system lists the folders in, and adding a class moves no other class.
- A test class's images, sorted by name, alternate query, gallery, query ...: at least one of each.
  A class with a single image cannot be searched (its query would have no gallery image): it is
  always a train class, and the summary counts such classes. ArcFace is a classification loss, so
  a train class with one image still trains its class centre; no class needs a second image.
- Refused, with a one-line DataError naming the path: IMAGES missing or not a folder; no class
  folders; a folder inside a class folder (ImageFolder would take its images into the class, but
  the usual cause is IMAGES pointing one level too high, which would silently make one class of
  each split); an empty class folder; a file that is not a JPEG, PNG, GIF or WebP image by its
  header (what the loader decodes), an animated GIF, or an image whose header claims more than
  ``max_pixels`` pixels (the loader would refuse them mid-training); an unreadable file; a name
  that is not UTF-8; a class folder that is a link to another class folder, or an image that is a
  link into another class folder (the same images would be train under one name and query or
  gallery under the other: the test split would leak). Skipped and counted: hidden files and folders (``.*``), Thumbs.db,
  desktop.ini and __MACOSX, and files at the top level of IMAGES (ImageFolder ignores them too).
- Images with the same bytes in two classes (copies, hard links) are not refused, since a real
  data set may hold genuine duplicates, but the summary warns with their count and the first
  groups. Only files whose size equals that of a file in another class are hashed, so the check
  costs a stat per image on a real tree.
- The partition file is whitespace-separated, so whitespace in a class or file name becomes "_"
  in OUT (the class "golden retriever" has the item id ``golden_retriever``); two names that
  become the same are refused.
- OUT is built in a sibling folder ``.OUT.partial-HOST-PID-*`` and renamed into place, so a crash
  leaves no half root; a rebuild moves the old root aside to ``.OUT.previous-HOST-PID-*`` first.
  A run killed (SIGKILL, power cut) leaves those folders behind: the next run for OUT removes the
  ones of processes of this machine that no longer exist, never a live run's, and gives OUT back
  when a run was killed between its two renames. An existing OUT must be empty, or a previous output of this command (it holds
  from_folder.json and nothing but Eval/, Img/ and that file) for the same IMAGES, which is
  rebuilt; one made from other IMAGES is replaced only with ``force``. A folder this command
  did not write is never deleted.

Deliberately free of torch (and of arcface.inshop and arcface.transforms, which import it): the
command starts in a fraction of a second. The partition format and the pixel limit come from the
torch-free modules that own them (arcface.partition, arcface.imageheader).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from arcface.imageheader import GIF_SIGNATURES, MAX_IMAGE_PIXELS, HeaderError, read_header
from arcface.partition import PARTITION_FILE, partition_text
from arcface.textfile import DataError, read_text

MARKER_FILE = "from_folder.json"
OUTPUT_ENTRIES = frozenset({"Eval", "Img", MARKER_FILE})  # all that a previous output may hold
TOOL_VERSION = 1
DEFAULT_TEST_FRACTION = 0.5  # In-Shop: 3,997 train items, 3,985 query/gallery items
DEFAULT_SEED = 0
SKIPPED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})  # compared case-insensitively
HEADER_BYTES = 1 << 16  # enough for a JPEG's frame header unless its EXIF block is larger: then all is read
SHOWN = 3  # how many paths an error message or the summary lists
EXPECTED_TREE = "expected IMAGES/<class>/<image>: one folder per class, the images directly inside it"
LINK_KINDS = ("hard link", "symbolic link", "copy")


@dataclass(frozen=True)
class ClassFolder:
    name: str  # the folder's name in IMAGES
    item_id: str  # its name in OUT and in the partition file: the name, whitespace replaced by "_"
    images: tuple[tuple[Path, str], ...]  # (source file, its name in OUT), sorted by source name


@dataclass(frozen=True)
class Tree:
    root: Path
    classes: tuple[ClassFolder, ...]  # sorted by name
    skipped: tuple[str, ...]  # hidden and system files and folders, relative to root
    top_level_files: tuple[str, ...]  # files directly in IMAGES, in no class: ignored
    renamed: tuple[tuple[str, str], ...]  # (path relative to root, its new name) for names with whitespace
    duplicates: tuple[tuple[str, ...], ...] = ()  # images with the same bytes in 2+ classes, relative to root


@dataclass(frozen=True)
class Split:
    rows: tuple[tuple[str, str, str], ...]  # (image_name, item_id, status), as the partition file lists them
    sources: tuple[Path, ...]  # the source file of each row
    train: tuple[str, ...]  # item ids of the train classes
    test: tuple[str, ...]  # item ids of the test (query and gallery) classes
    single_image: tuple[str, ...]  # item ids of the classes with one image: train, since unsearchable

    def count(self, status: str) -> int:
        return sum(1 for _, _, row_status in self.rows if row_status == status)


@dataclass(frozen=True)
class Summary:
    tree: Tree
    split: Split
    out: Path
    links: dict[str, int]  # LINK_KINDS -> how many images were written that way
    replaced: bool  # OUT held a previous output, now replaced
    leftovers: tuple[str, ...] = ()  # folders that killed runs left next to OUT, removed


# ---- reading the tree ----


def scan_tree(images: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Tree:
    """The class folders of IMAGES and their images, every image's header checked; DataError if unusable."""
    root = Path(images)
    if not root.exists():
        raise DataError(f"{root}: no such folder; {EXPECTED_TREE}")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; {EXPECTED_TREE}")
    skipped: list[str] = []
    top_level_files: list[str] = []
    class_entries: list[os.DirEntry] = []
    for entry in _sorted_entries(root):
        if _is_skipped(entry.name):
            skipped.append(entry.name)
        elif entry.is_dir():
            class_entries.append(entry)
        else:
            top_level_files.append(entry.name)
    if not class_entries:
        found = f"{len(top_level_files)} file(s) at the top level" if top_level_files else "it is empty"
        hint = "; if IMAGES is one class's folder, pass the folder above it" if top_level_files else ""
        raise DataError(f"{root}: no class folders ({found}); {EXPECTED_TREE}{hint}")
    _check_names(root, [entry.name for entry in class_entries])
    class_paths = _class_paths(root, class_entries)

    nested: list[str] = []
    bad_files: list[str] = []
    renamed = [(entry.name, _safe(entry.name)) for entry in class_entries if _safe(entry.name) != entry.name]
    classes: list[ClassFolder] = []
    for class_entry in class_entries:
        folder = root / class_entry.name
        files = []
        for entry in _sorted_entries(folder):
            relative = f"{class_entry.name}/{entry.name}"
            if _is_skipped(entry.name):
                skipped.append(relative)
            elif entry.is_dir():
                nested.append(relative)
            else:
                if entry.is_symlink():
                    _check_link_stays_in_its_class(folder / entry.name, class_entry.name, class_paths)
                reason = _image_problem(folder / entry.name, max_pixels)
                if reason:
                    bad_files.append(f"{root / relative} ({reason})")
                else:
                    files.append(entry.name)
        _check_names(folder, files)
        renamed += [(f"{class_entry.name}/{name}", _safe(name)) for name in files if _safe(name) != name]
        images = tuple((folder / name, _safe(name)) for name in files)
        classes.append(ClassFolder(class_entry.name, _safe(class_entry.name), images))

    if nested:
        first = nested[0]
        raise DataError(
            f"{root / first}: a folder inside class folder {first.split('/')[0]!r} ({len(nested)} nested "
            f"folder(s) in all); {EXPECTED_TREE}; if the classes are one level down, pass that folder as IMAGES"
        )
    if bad_files:
        raise DataError(
            f"{root}: {len(bad_files)} file(s) are not images the loader reads (JPEG, PNG, GIF or WebP): "
            f"{_listing(bad_files)}; remove or convert them (hidden files, Thumbs.db and desktop.ini are skipped)"
        )
    empty = [cls.name for cls in classes if not cls.images]
    if empty:
        raise DataError(f"{root}: {len(empty)} class folder(s) hold no images: {_listing(empty)}; "
                        "remove them or add images")
    return Tree(root, tuple(classes), tuple(skipped), tuple(top_level_files), tuple(renamed),
                find_duplicates(classes))


def find_duplicates(classes: list[ClassFolder] | tuple[ClassFolder, ...]) -> tuple[tuple[str, ...], ...]:
    """Groups of images with the same bytes in two or more classes ("class/name", sorted). Only
    files whose size equals that of a file in another class are read and hashed: on a real tree
    few are, so this costs a stat per image, not a second read of the tree."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for cls in classes:
        for source, _ in cls.images:
            by_size[source.stat().st_size].append((cls.name, source))
    groups: list[tuple[str, ...]] = []
    for candidates in by_size.values():
        if len({name for name, _ in candidates}) < 2:
            continue
        by_digest: dict[str, list[tuple[str, Path]]] = defaultdict(list)
        for name, source in candidates:
            by_digest[_digest(source)].append((name, source))
        groups += [tuple(sorted(f"{name}/{source.name}" for name, source in same))
                   for same in by_digest.values() if len({name for name, _ in same}) >= 2]
    return tuple(sorted(groups))


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _class_paths(root: Path, class_entries: list[os.DirEntry]) -> dict[Path, str]:
    """Each class folder's real path -> its name; DataError if two are the same folder (a link to
    another class): its images would be train under one name and query or gallery under the other."""
    first_of: dict[Path, str] = {}
    for entry in class_entries:
        real = (root / entry.name).resolve()
        other = first_of.setdefault(real, entry.name)
        if other != entry.name:
            link, target = (entry.name, other) if entry.is_symlink() else (other, entry.name)
            where = "" if real == Path(os.path.abspath(root / target)) else f" ({real})"
            raise DataError(f"{root / link}: a link to class folder {root / target}{where}: the same images "
                            f"would be in two classes, and the test split would hold images trained on; "
                            f"remove the link, or merge the classes")
    return first_of


def _check_link_stays_in_its_class(path: Path, class_name: str, class_paths: dict[Path, str]) -> None:
    """DataError if the linked image lies in another class folder: the same file in two classes."""
    real = path.resolve()
    for folder in real.parents:
        other = class_paths.get(folder)
        if other is not None and other != class_name:
            raise DataError(f"{path}: a link to {real}, an image of class folder {other!r}: the same image "
                            f"would be in two classes; remove the link or one of the images")


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    # Sorted by name: the file system's listing order must not change the output.
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _is_skipped(name: str) -> bool:
    return name.startswith(".") or name.casefold() in SKIPPED_NAMES


def _safe(name: str) -> str:
    """The name with every whitespace character (all that str.split splits on) replaced by "_"."""
    return "".join("_" if char.isspace() else char for char in name)


def _check_names(folder: Path, names: list[str]) -> None:
    """Names must be UTF-8 (the partition file is) and stay distinct once whitespace is replaced."""
    first_of: dict[str, str] = {}
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{folder}/{os.fsencode(name)!r}: the name is not UTF-8 (the partition file "
                            "is UTF-8 text); rename it") from None
        other = first_of.setdefault(_safe(name), name)
        if other != name:
            raise DataError(f"{folder}: {other!r} and {name!r} both become {_safe(name)!r} in OUT "
                            "(whitespace becomes '_'); rename one of them")


def _image_problem(path: Path, max_pixels: int) -> str:
    """Why the loader would refuse the file ("" if it would not), from its header alone."""
    if not path.is_file():
        return "not a regular file" if path.exists() else "a broken link"
    try:
        with open(path, "rb") as file:
            data = file.read(HEADER_BYTES)
            if data[:6] in GIF_SIGNATURES:
                data += file.read()  # frames are counted through the whole file
            try:
                header = read_header(data)
            except HeaderError:
                if len(data) < HEADER_BYTES:
                    raise
                header = read_header(data + file.read())  # a JPEG with a large block before its frame header
    except HeaderError as error:
        return str(error)
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"
    if header.frames > 1:
        return f"an animated GIF of {header.frames} frames"
    if header.pixels > max_pixels:
        return (f"its header claims {header.width} x {header.height} pixels, more than the limit of "
                f"{max_pixels:,} (max_image_pixels)")
    return ""


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


# ---- the split ----


def split_classes(tree: Tree, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SEED) -> Split:
    """Train and test classes, and each test class's images as query or gallery; DataError if impossible."""
    _check_test_fraction(test_fraction)
    classes = tree.classes
    if len(classes) < 2:
        raise DataError(f"{tree.root}: {len(classes)} class folder ({classes[0].name}); need at least 2, since "
                        "train and test classes are disjoint")
    searchable = [cls.item_id for cls in classes if len(cls.images) >= 2]
    if not searchable:
        raise DataError(f"{tree.root}: no class folder holds 2 or more images; a test class needs a query and "
                        "a gallery image")
    test_count = math.floor(test_fraction * len(searchable) + 0.5)  # half up, unlike round()
    if test_count == 0:
        raise DataError(f"{tree.root}: test_fraction={test_fraction} of the {len(searchable)} class(es) with 2+ "
                        "images is no test class; raise it or add classes")
    if test_count == len(classes):
        raise DataError(f"{tree.root}: test_fraction={test_fraction} sends all {len(classes)} classes to test, "
                        "none is left to train on; lower it or add classes")
    # A hash, not a shuffle: stable across Python and library versions, and a class's split does
    # not depend on the other classes' names.
    by_hash = sorted(searchable, key=lambda item_id: hashlib.sha256(f"{seed}/{item_id}".encode()).hexdigest())
    test = set(by_hash[:test_count])

    rows: list[tuple[str, str, str]] = []
    sources: list[Path] = []
    for cls in classes:
        for index, (source, name) in enumerate(cls.images):
            if cls.item_id not in test:
                status = "train"
            else:
                status = "query" if index % 2 == 0 else "gallery"
            rows.append((f"img/{cls.item_id}/{name}", cls.item_id, status))
            sources.append(source)
    return Split(
        rows=tuple(rows),
        sources=tuple(sources),
        train=tuple(cls.item_id for cls in classes if cls.item_id not in test),
        test=tuple(cls.item_id for cls in classes if cls.item_id in test),
        single_image=tuple(cls.item_id for cls in classes if len(cls.images) == 1),
    )


def _check_test_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a value strictly between 0 and 1")


# ---- writing OUT ----


def write_images(split: Split, img_dir: Path, copy: bool = False) -> dict[str, int]:
    """Put every row's image under img_dir (the root's Img/); how many of each LINK_KINDS were made.

    A hard link costs no space and survives moving IMAGES, but shares the file: editing an image in
    place edits it in both trees. Where hard links are impossible (another file system, or a file
    another user owns under fs.protected_hardlinks) a symbolic link to the absolute source path
    follows, then a copy.
    """
    links = dict.fromkeys(LINK_KINDS, 0)
    for (image_name, _, _), source in zip(split.rows, split.sources):
        target = img_dir / image_name
        target.parent.mkdir(parents=True, exist_ok=True)
        links[_place(source, target, copy)] += 1
    return links


def _place(source: Path, target: Path, copy: bool) -> str:
    if not copy:
        try:
            os.link(source, target)
            return "hard link"
        except FileExistsError:
            raise
        except OSError:
            pass
        try:
            os.symlink(os.path.abspath(source), target)
            return "symbolic link"
        except FileExistsError:
            raise
        except OSError:
            pass
    shutil.copy2(source, target)
    return "copy"


def _marker(tree: Tree, test_fraction: float, seed: int, copy: bool, max_pixels: int) -> dict:
    return {
        "tool": "arcface.from_folder",
        "version": TOOL_VERSION,
        "images": str(tree.root.resolve()),
        "test_fraction": test_fraction,
        "seed": seed,
        "copy": copy,
        "max_image_pixels": max_pixels,
    }


def check_out(images: Path, out: Path, force: bool = False) -> bool:
    """Whether OUT holds a previous output to replace (False: it is missing or empty); DataError if OUT is unusable."""
    images_path, out_path = images.resolve(), out.resolve()
    if out_path == images_path or images_path in out_path.parents:
        raise DataError(f"{out}: OUT is inside IMAGES ({images}); choose a folder outside it")
    if out_path in images_path.parents:
        raise DataError(f"{out}: IMAGES ({images}) is inside OUT; choose another OUT")
    if not out.exists():
        return False
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another OUT")
    entries = sorted(path.name for path in out.iterdir())
    if not entries:
        return False
    marker = out / MARKER_FILE
    if not marker.is_file():
        raise DataError(f"{out}: exists, is not empty and was not written by python -m arcface.from_folder "
                        f"(no {MARKER_FILE}); choose another folder or empty it")
    others = [name for name in entries if name not in OUTPUT_ENTRIES]
    if others:
        raise DataError(f"{out}: a previous output, but it also holds {_listing(others)}, which would be "
                        "deleted with it; move them out or choose another OUT")
    try:
        found = json.loads(read_text(marker))
    except json.JSONDecodeError as error:
        raise DataError(f"{marker}:{error.lineno}: not valid JSON: {error.msg}") from None
    made_from = found.get("images") if isinstance(found, dict) else None
    if made_from != str(images_path) and not force:
        raise DataError(f"{out}: holds the output for {made_from}, not for {images_path}; pass --force to "
                        "replace it, or choose another OUT")
    return True


def convert(
    images: str | os.PathLike,
    out: str | os.PathLike,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SEED,
    copy: bool = False,
    force: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Summary:
    """Write the In-Shop-layout root of the tree IMAGES to OUT (see the module's rules); what was done."""
    _check_test_fraction(test_fraction)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive integer, got {max_pixels!r}")
    images, out = Path(images), Path(out)
    leftovers = remove_leftovers(out)  # first: a run killed between its renames gives OUT back
    replace = check_out(images, out, force)  # before reading thousands of headers
    tree = scan_tree(images, max_pixels)
    split = split_classes(tree, test_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "partial"), dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; OUT gets a plain folder's mode
        links = write_images(split, staging / "Img", copy)
        (staging / PARTITION_FILE).parent.mkdir()
        (staging / PARTITION_FILE).write_text(partition_text(list(split.rows)), encoding="utf-8")
        marker = _marker(tree, test_fraction, seed, copy, max_pixels)
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out, replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Summary(tree, split, out, links, replace, tuple(leftovers))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out: Path, replace: bool) -> None:
    """Rename staging to out; a previous output is moved aside first and deleted after.

    Two renames, not one: POSIX rename replaces only an empty folder. Between them OUT is briefly
    absent; it never holds a mix of two outputs.
    """
    if not replace:
        os.rename(staging, out)  # an empty out is replaced; a non-empty one (a race) raises
        return
    aside = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "previous"), dir=out.parent))
    try:
        os.rename(out, aside / "root")
    except BaseException:
        aside.rmdir()  # OUT cannot be moved (permissions): nothing was changed
        raise
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside / "root", out)
        aside.rmdir()
        raise
    # Removes the links, never what they point to; what cannot be removed now, the next run will.
    shutil.rmtree(aside, ignore_errors=True)


def _work_prefix(out: Path, kind: str) -> str:
    """The name start of a working folder next to OUT: ".OUT.partial-HOST-PID-" (the new root being
    written) or ".OUT.previous-HOST-PID-" (the old root, moved aside): whose it is, so that a later
    run removes it only once that process is gone (`remove_leftovers`)."""
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _host() -> str:
    # A folder next to OUT may be on a file system that other machines share; their processes
    # are not ours to look up.
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "localhost"


def remove_leftovers(out: Path) -> list[str]:
    """Removes the working folders that runs of this command for OUT left next to it when they were
    killed (SIGKILL, a power cut), and only those: named for OUT, made on this machine by a process
    that no longer exists; a live run's folder is never touched. A run killed between its two
    renames left OUT missing and the previous root aside: it is renamed back first. The names removed.
    """
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|previous)-{re.escape(_host())}-(\d+)-[^/]+")
    removed = []
    for path in sorted(out.parent.iterdir()):
        found = pattern.fullmatch(path.name)
        if found is None or path.is_symlink() or not path.is_dir() or _alive(int(found[2])):
            continue
        if found[1] == "previous" and (path / "root").is_dir() and not os.path.lexists(out):
            os.rename(path / "root", out)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid() or sys.platform == "win32":  # Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: no signal, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---- the summary the command prints ----


def format_summary(summary: Summary) -> str:
    tree, split = summary.tree, summary.split
    lines = [
        f"{tree.root} -> {summary.out}: {len(tree.classes)} classes, {len(split.rows)} images",
        f"  train:   {len(split.train):>6} classes {split.count('train'):>8} images",
        f"  query:   {len(split.test):>6} classes {split.count('query'):>8} images",
        f"  gallery: {len(split.test):>6} classes {split.count('gallery'):>8} images",
    ]
    if split.single_image:
        lines.append(f"  {len(split.single_image)} class(es) with a single image cannot be searched, so they are "
                     f"train classes, not test: {_listing(list(split.single_image))}")
    if tree.duplicates:
        shown = [" = ".join(group[:2]) + (f" (+{len(group) - 2})" if len(group) > 2 else "") for group in tree.duplicates]
        lines.append(f"  warning: {sum(map(len, tree.duplicates))} images in {len(tree.duplicates)} group(s) have the "
                     f"same bytes as an image of another class (a test image may match its own copy, or be "
                     f"trained on under another name): {_listing(shown)}")
    if tree.renamed:
        shown = [f"{old!r} -> {new!r}" for old, new in tree.renamed]
        lines.append(f"  {len(tree.renamed)} name(s) with whitespace renamed in OUT: {_listing(shown)}")
    if tree.skipped:
        lines.append(f"  skipped {len(tree.skipped)} hidden or system file(s): {_listing(list(tree.skipped))}")
    if tree.top_level_files:
        lines.append(f"  ignored {len(tree.top_level_files)} file(s) at the top level of IMAGES (in no class): "
                     f"{_listing(list(tree.top_level_files))}")
    plural = {"hard link": "hard links", "symbolic link": "symbolic links", "copy": "copies"}
    made = ", ".join(f"{count} {kind if count == 1 else plural[kind]}" for kind, count in summary.links.items() if count)
    lines.append(f"  images: {made}" + _link_note(summary.links))
    if summary.replaced:
        lines.append("  replaced the previous output")
    if summary.leftovers:
        lines.append(f"  removed {len(summary.leftovers)} folder(s) that killed runs left next to OUT: "
                     f"{_listing(list(summary.leftovers))}")
    lines.append(f"wrote {summary.out / PARTITION_FILE}; train on it with --data_root {summary.out}")
    return "\n".join(lines)


def _link_note(links: dict[str, int]) -> str:
    notes = []
    if links["hard link"]:
        notes.append("hard links share the file with IMAGES: editing an image edits both")
    if links["symbolic link"]:
        notes.append("symbolic links need IMAGES to stay where it is")
    return f" ({'; '.join(notes)})" if notes else ""

