"""Embed every image of a folder tree or an In-Shop root into a catalog folder, on one process or many.

    python tools/embed.py runs/demo/snapshot.pt data/inshop runs/demo/catalog         # all of Img/
    python tools/embed.py runs/demo/snapshot.pt data/inshop OUT --split gallery --dtype float16
    python tools/embed.py runs/demo/snapshot.pt my_photos/ OUT --shard_size 4096
    torchrun --nproc_per_node=4 tools/embed.py runs/demo/snapshot.pt my_photos/ OUT    # same files

OUT receives embeddings.npy (N x D, L2-normalised rows; float32, or float16 with --dtype
float16), paths.txt (one path per line, relative to IMAGES, in row order), meta.json (the
model's fingerprint, the dimension, count, dtype, preprocessing and images root: what
tools/catalog.read_catalog reads) and skipped.txt (images that could not be embedded, each with
its reason: unreadable, corrupt, not an image, or over --max_image_pixels).

The images are cut into shards of --shard_size, each written atomically to OUT/shards/ when
done. A rerun skips the shards that exist, so a killed or preempted job continues where it
stopped. Under torchrun every rank embeds its share of the missing shards; rank 0 then assembles
the final files (OUT must be on a disk every rank sees). An OUT made by another model, from
other images or with other settings is refused. tools/index.py builds a FAISS index beside the
files, tools/search.py --index OUT searches them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from arcface.partition import PARTITION_FILE, read_partition
from arcface.textfile import DataError
from arcface.transforms import MAX_IMAGE_PIXELS, check_max_pixels, load_image
from support import runtime
from support.rundir import OwnerLock
from support.errors import user_message
from tools.catalog import (
    DTYPES,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    INDEX_INFO_FILE,
    META_FILE,
    PATHS_FILE,
    Catalog,
    CatalogError,
    IndexMismatch,
    read_json,
)
from tools.common import (
    TOOL_ERRORS,
    LoadedModel,
    add_max_pixels_arg,
    add_model_args,
    atomic_output,
    check_max_pixels_arg,
    is_inshop_root,
    list_images,
    model_from_args,
    run_cli,
    training_config,
)
from tools.evaluate import (
    process_group,  # the series' own: gloo on CPU, nccl on CUDA, under torchrun
)

CATALOG_FORMAT, CATALOG_VERSION = "arcface-catalog", 1
SKIPPED_FILE, SHARDS_DIR, MANIFEST_FILE, LOCK_FILE = "skipped.txt", "shards", "manifest.json", ".embed.lock"
DEFAULT_SHARD_SIZE = 4096  # a preempted job redoes at most this many images per rank
# What a catalog folder holds besides hidden files (the lock, temporaries). Anything else means
# OUT is somebody's folder, not a catalog: it is never written into nor deleted.
CATALOG_ENTRIES = frozenset({EMBEDDINGS_FILE, PATHS_FILE, META_FILE, SKIPPED_FILE, SHARDS_DIR, INDEX_FILE,
                             INDEX_INFO_FILE})
LINE_BREAKS = ("\n", "\r")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("images", metavar="IMAGES",
                        help="a folder (every image below it), an In-Shop root (all of Img/, or --split) or one image")
    parser.add_argument("out", metavar="OUT", help="the catalog folder to write")
    parser.add_argument("--split", default=None, choices=("train", "query", "gallery"),
                        help="with an In-Shop root: only this split (default: every image under Img/)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="of embeddings.npy; float16 halves it (default float32)")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                        help=f"images per shard, the unit a rerun skips (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--batch_size", type=int, default=None, help="images per batch; default: the training config's")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="loader processes per rank; default: the config's")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--amp", default=None, choices=("auto", "bf16", "fp16", "off"),
                        help="autocast dtype; default: the training config's (float32 on a CPU)")
    add_max_pixels_arg(parser)
    # Intermixed: `MODEL --flag v IMAGES OUT` must not give MODEL's place to IMAGES.
    args = parser.parse_intermixed_args(argv)
    for flag in ("shard_size", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag}: expected an integer >= 1, got {value}")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num_workers: expected an integer >= 0, got {args.num_workers}")
    check_max_pixels_arg(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with process_group(args.device) as device:
        model = model_from_args(args)
        images = list_catalog_images(args.images, args.split)
        settings = embed_settings(args, model)
        embed_catalog(model, images, Path(args.out), device, dtype=args.dtype, shard_size=args.shard_size,
                      max_pixels=args.max_image_pixels, **settings)
    return 0


def embed_settings(args: argparse.Namespace, model: LoadedModel) -> dict[str, Any]:
    """Flags where given, else the training configuration (as tools/evaluate.py), else defaults."""
    cfg = training_config(model.config, Path(model.source)) if model.config else None
    return {
        "batch_size": args.batch_size or (cfg.eval_batch_size if cfg else 64),
        "num_workers": args.num_workers if args.num_workers is not None else (cfg.num_workers if cfg else 4),
        "amp": args.amp or (cfg.amp if cfg else "off"),
        "channels_last": cfg.channels_last if cfg else False,
    }


# ------------------------------------------------------------------------------------------
# The images


@dataclass(frozen=True)
class CatalogImages:
    """The images of a catalog, in row order: absolute paths and the root their names are relative to."""

    root: Path
    split: str | None  # the In-Shop split, or None
    paths: list[str]

    @cached_property
    def names(self) -> list[str]:
        """Paths relative to the root, with forward slashes: what paths.txt holds."""
        return [Path(path).relative_to(self.root).as_posix() for path in self.paths]

    def describe(self) -> str:
        return f"{self.root}" + (f" (split {self.split})" if self.split else "")


def list_catalog_images(images: str | os.PathLike, split: str | None = None) -> CatalogImages:
    """A folder (every image below it, sorted), an In-Shop root (every image under Img/, or one
    split in partition order) or one image file."""
    path = Path(images).resolve()
    inshop = path.is_dir() and is_inshop_root(path)
    if split is not None and not inshop:
        raise ValueError(f"{path}: --split {split} needs an In-Shop root (a folder holding {PARTITION_FILE})")
    if inshop:
        listed = list_images(path, split) if split else list_images(path / "Img")
        return CatalogImages(path, split, listed.paths)
    if path.is_file():
        return CatalogImages(path.parent, None, [str(path)])
    return CatalogImages(path, None, list_images(path).paths)


@dataclass(frozen=True)
class Unreadable:
    """What MarkedImageFiles returns instead of an image it cannot use: the catalog skips it."""

    reason: str


class MarkedImageFiles(Dataset):
    """(index, image) for a list of paths; an unusable file gives (index, Unreadable(reason)).

    Unreadable, missing, corrupt and non-image files and headers over `max_pixels` all raise an
    OSError in load_image; here they become markers, so one bad file in a million does not stop
    the job (the loader cannot skip an item, but it can pass a marker on).
    """

    def __init__(self, paths: list[str], transform: Callable[[Tensor], Tensor],
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        check_max_pixels(max_pixels)
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | Unreadable]:
        path = self.paths[index]
        if any(mark in path for mark in LINE_BREAKS):
            return index, Unreadable("its name holds a line break, which paths.txt cannot list")
        try:
            return index, self.transform(load_image(path, self.max_pixels))
        except OSError as error:
            return index, Unreadable(_reason(error, path))


def _reason(error: OSError, path: str) -> str:
    """The error's one line without the path in front (skipped.txt names the file already)."""
    text = user_message(error)
    return text.removeprefix(f"{path}: ")


def collate_marked(samples: list[tuple[int, Tensor | Unreadable]]
                   ) -> tuple[Tensor | None, list[int], list[tuple[int, str]]]:
    """(stacked good images or None, their indices, [(index, reason)] of the bad ones)."""
    good = [(index, image) for index, image in samples if not isinstance(image, Unreadable)]
    bad = [(index, image.reason) for index, image in samples if isinstance(image, Unreadable)]
    images = torch.stack([image for _, image in good]) if good else None
    return images, [index for index, _ in good], bad


# ------------------------------------------------------------------------------------------
# What a catalog is made of, and refusing another one


def catalog_identity(model: LoadedModel, images: CatalogImages, dtype: str, autocast: torch.dtype | None,
                     max_pixels: int) -> dict[str, Any]:
    """Everything that decides the catalog's contents; an OUT made with other values is refused."""
    names = images.names
    return {
        "fingerprint": model.fingerprint, "model": model.source, "preprocess": model.preprocess.as_dict(),
        "images": str(images.root), "split": images.split, "listed": len(names),
        "names_digest": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
        "dtype": dtype, "autocast": str(autocast).removeprefix("torch.") if autocast else None,
        "max_image_pixels": max_pixels,
    }


def mismatch(made: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """Why a catalog (or its shards) made with `made` cannot continue as `wanted`, or None."""
    if made.get("fingerprint") != wanted["fingerprint"]:
        return (f"made by another model (fingerprint {made.get('fingerprint')}, {made.get('model')}; "
                f"this model {wanted['fingerprint']}, {wanted['model']})")
    if (made.get("images"), made.get("split")) != (wanted["images"], wanted["split"]):
        return f"made from other images ({_where(made)}; now {_where(wanted)})"
    if made.get("names_digest") != wanted["names_digest"]:
        return f"the image list changed ({made.get('listed')} images then, {wanted['listed']} now)"
    for key in ("dtype", "autocast", "max_image_pixels"):
        if made.get(key) != wanted[key]:
            return f"made with other settings ({key} {made.get(key)}, now {wanted[key]})"
    return None


def _where(identity: dict[str, Any]) -> str:
    return f"{identity.get('images')}" + (f", split {identity['split']}" if identity.get("split") else "")


def existing_mismatch(out: Path, wanted: dict[str, Any]) -> str | None:
    """Why OUT (finished, or shards of an unfinished run) is not the catalog `wanted`; None when it
    is, or when OUT holds nothing yet. A folder holding other files than a catalog's is refused."""
    for path in (out / META_FILE, out / SHARDS_DIR / MANIFEST_FILE):
        if path.is_file():
            return mismatch(_read_json(path), wanted)
    _check_only_catalog_files(out)
    return None


def _check_only_catalog_files(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CatalogError(f"{out}: not a folder; expected a catalog folder to write")
    if not out.is_dir():
        return
    foreign = sorted(entry.name for entry in out.iterdir()
                     if entry.name not in CATALOG_ENTRIES and not entry.name.startswith("."))
    if foreign:
        raise CatalogError(f"{out}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                           "which no catalog has; give an empty or new folder as OUT")


def _read_json(path: Path) -> dict[str, Any]:
    value = read_json(path, "; delete it to start over")
    if not isinstance(value, dict):
        raise CatalogError(f"{path}: expected a JSON object; delete it to start over")
    return value


def remove_catalog(out: Path) -> None:
    """Deletes a catalog folder that holds only a catalog's files (search.py's rebuild)."""
    _check_only_catalog_files(out)
    if out.is_dir():
        shutil.rmtree(out)


# ------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class Plan:
    """What rank 0 found in OUT: nothing to do (done), or the shards still missing."""

    done: bool
    shard_size: int
    shards: int
    pending: list[int]


def embed_catalog(model: LoadedModel, images: CatalogImages, out: Path, device: torch.device, *,
                  dtype: str = "float32", shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 64,
                  num_workers: int = 0, amp: str = "off", channels_last: bool = False,
                  max_pixels: int = MAX_IMAGE_PIXELS, progress: bool = True) -> dict[str, Any] | None:
    """Embeds `images` into OUT on this process, or with every rank of the process group.

    Returns meta.json's contents on rank 0 (None on the others). OUT is locked by rank 0 for the job.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    autocast = runtime.autocast_dtype(amp, device)
    wanted = catalog_identity(model, images, dtype, autocast, max_pixels)
    lock: list[OwnerLock] = []
    try:
        plan = runtime.one_rank_decides(lambda: _lock_and_plan(out, wanted, shard_size, lock), TOOL_ERRORS, device)
        if plan.done:
            if runtime.is_main_process():
                print(f"{out}: already holds these embeddings ({wanted['listed']} images); nothing to do")
            return _read_json(out / META_FILE) if runtime.is_main_process() else None
        mine = plan.pending[runtime.global_rank()::runtime.world_size()]
        _embed_shards(model, images, out, mine, plan.shard_size, device, dtype=dtype, batch_size=batch_size,
                      num_workers=num_workers, autocast=autocast, channels_last=channels_last,
                      max_pixels=max_pixels, progress=progress and runtime.is_main_process())
        _barrier(device)  # every shard is on disk
        if not runtime.is_main_process():
            return None
        meta = assemble(out, wanted, plan.shard_size, plan.shards)
        reasons = f" (reasons in {out / SKIPPED_FILE})" if meta["skipped"] else ""
        print(f"{out}: {meta['count']} of {meta['listed']} images embedded ({meta['count']} x {meta['dim']} "
              f"{dtype}), {meta['skipped']} skipped{reasons}")
        return meta
    finally:
        for held in lock:
            held.release()  # drops the flock


def _lock_and_plan(out: Path, wanted: dict[str, Any], shard_size: int, lock: list[OwnerLock]) -> Plan:
    """Rank 0: takes OUT, refuses another catalog's, and lists the shards still to embed."""
    reason = existing_mismatch(out, wanted)
    if reason is not None:
        raise IndexMismatch(f"{out}: {reason}; write to another OUT folder, or delete this one")
    lock.append(_take_lock(out))
    if (out / META_FILE).is_file():
        _remove_shards(out)  # an assembly that stopped before deleting them
        return Plan(True, shard_size, 0, [])
    manifest_path = out / SHARDS_DIR / MANIFEST_FILE
    if manifest_path.is_file():
        shard_size = int(_read_json(manifest_path).get("shard_size", shard_size))  # the shards' own
    else:
        _write_text(manifest_path, json.dumps({**wanted, "shard_size": shard_size}, indent=2) + "\n")
    _remove_temporaries(out / SHARDS_DIR)  # left by writes that a kill interrupted; OUT is ours now
    shards = math.ceil(wanted["listed"] / shard_size)
    pending = [shard for shard in range(shards)
               if not _shard_done(out, shard, _shard_range(shard, shard_size, wanted["listed"]))]
    done = shards - len(pending)
    if done:
        print(f"{out}: {done} of {shards} shards already embedded; embedding the other {len(pending)}")
    return Plan(False, shard_size, shards, pending)


def _take_lock(out: Path) -> OwnerLock:
    """An exclusive flock on OUT/.embed.lock: one job writes a catalog at a time. The kernel drops
    it when the process ends, however it ends, so a killed job never blocks its rerun."""
    lock = OwnerLock(out / LOCK_FILE, f"{out} is a catalog", busy=lambda owner: CatalogError(
        f"{out}: another embedding job is writing this catalog ({owner}); wait for it to end or stop it"))
    lock.acquire()
    return lock


def _barrier(device: torch.device) -> None:
    if runtime.is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
        else:
            dist.barrier()


# ------------------------------------------------------------------------------------------
# Shards


def _shard_range(shard: int, shard_size: int, count: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, count))


def _shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    """OUT/shards/00042.npy (its rows) and OUT/shards/00042.json (its names and skipped images)."""
    stem = out / SHARDS_DIR / f"{shard:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _shard_done(out: Path, shard: int, indices: range) -> bool:
    """Both files there and agreeing; the .json is written last, so it marks a finished shard."""
    try:
        record = _read_shard_record(out, shard)
        rows = np.load(_shard_paths(out, shard)[0], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, CatalogError):
        return False  # missing or damaged: embedded again
    names, skipped = record.get("names", []), record.get("skipped", [])
    return (record.get("first") == indices.start and len(names) + len(skipped) == len(indices)
            and rows.shape[0] == len(names))


def _read_shard_record(out: Path, shard: int) -> dict[str, Any]:
    return _read_json(_shard_paths(out, shard)[1])


def _embed_shards(model: LoadedModel, images: CatalogImages, out: Path, shards: list[int], shard_size: int,
                  device: torch.device, *, dtype: str, batch_size: int, num_workers: int,
                  autocast: torch.dtype | None, channels_last: bool, max_pixels: int, progress: bool) -> None:
    """This rank's shards, one loader over all of them (its workers start once), batches cut at
    shard ends so that each shard is written as soon as it is complete."""
    count = len(images.paths)
    batches = [list(indices[start:start + batch_size]) for shard in shards
               for indices in [_shard_range(shard, shard_size, count)] for start in range(0, len(indices), batch_size)]
    if not batches:
        return
    dataset = MarkedImageFiles(images.paths, model.preprocess.transform(), max_pixels)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_marked,
                        pin_memory=device.type == "cuda")
    total = sum(len(batch) for batch in batches)
    label = f"embedding (rank 0 of {runtime.world_size()})" if runtime.world_size() > 1 else "embedding"
    names = images.names
    module = model.module.to(device)
    with tqdm(total=total, desc=label, unit="img", disable=not progress) as bar:
        loaded = iter(loader)
        for shard in shards:
            indices = _shard_range(shard, shard_size, count)
            vectors, kept, skipped = [], [], []
            for _ in range(math.ceil(len(indices) / batch_size)):
                batch, good, bad = next(loaded)
                if batch is not None:
                    vectors.append(embed_batch(module, batch, device, autocast, channels_last))
                kept += [names[index] for index in good]
                skipped += [[names[index], reason] for index, reason in bad]
                bar.update(len(good) + len(bad))
            rows = torch.cat(vectors).numpy().astype(dtype) if vectors else np.zeros((0, 0), dtype=dtype)
            _write_shard(out, shard, indices.start, rows, kept, skipped)


def embed_batch(module: Callable[[Tensor], Tensor], images: Tensor, device: torch.device,
                autocast: torch.dtype | None = None, channels_last: bool = False) -> Tensor:
    """(B, D) L2-normalised float32 CPU embeddings of a batch, computed as arcface.retrieval does."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        embeddings = module(images)
    return F.normalize(embeddings.float(), dim=1).cpu()


def _write_shard(out: Path, shard: int, first: int, rows: np.ndarray, names: list[str],
                 skipped: list[list[str]]) -> None:
    rows_path, record_path = _shard_paths(out, shard)
    with atomic_output(rows_path) as tmp, open(tmp, "wb") as file:
        np.save(file, rows, allow_pickle=False)
    _write_text(record_path, json.dumps({"first": first, "names": names, "skipped": skipped}) + "\n")


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove_temporaries(folder: Path) -> None:
    for stale in folder.glob(".*.tmp*"):
        stale.unlink(missing_ok=True)


def _remove_shards(out: Path) -> None:
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# The final files


def assemble(out: Path, wanted: dict[str, Any], shard_size: int, shards: int) -> dict[str, Any]:
    """Rank 0, every shard on disk: embeddings.npy, paths.txt, skipped.txt, then meta.json last
    (a catalog is complete when meta.json exists), then the shards are deleted."""
    records = [_read_shard_record(out, shard) for shard in range(shards)]
    names = [name for record in records for name in record["names"]]
    skipped = [entry for record in records for entry in record["skipped"]]
    _write_text(out / SKIPPED_FILE, "".join(f"{name}\t{reason}\n" for name, reason in skipped))
    if not names:
        raise CatalogError(f"{out}: none of the {wanted['listed']} images could be embedded; the reasons are "
                           f"in {out / SKIPPED_FILE}")
    dim = _write_embeddings(out, records, len(names), wanted["dtype"])
    _write_text(out / PATHS_FILE, "".join(f"{name}\n" for name in names))
    meta = {"format": CATALOG_FORMAT, "format_version": CATALOG_VERSION, **wanted, "dim": dim,
            "count": len(names), "skipped": len(skipped), "shard_size": shard_size}
    _write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    _remove_shards(out)
    return meta


def _write_embeddings(out: Path, records: list[dict[str, Any]], count: int, dtype: str) -> int:
    """Concatenates the shards' rows into OUT/embeddings.npy, one shard in memory at a time."""
    dim = next(np.load(_shard_paths(out, shard)[0], mmap_mode="r").shape[1]
               for shard, record in enumerate(records) if record["names"])
    with atomic_output(out / EMBEDDINGS_FILE) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(count, dim))
        row = 0
        for shard, record in enumerate(records):
            if record["names"]:
                rows = np.load(_shard_paths(out, shard)[0], allow_pickle=False)
                array[row:row + len(rows)] = rows
                row += len(rows)
        array.flush()
        del array  # closes the map before the file is synced and moved into place
    return dim


# ------------------------------------------------------------------------------------------
# Reading a catalog back (tools/search.py, tools/api.py)


def catalog_paths(catalog: Catalog) -> list[str]:
    """The absolute path of every row: the images root joined with paths.txt's names."""
    root = Path(catalog.meta.get("images") or catalog.root)
    return [str(root / name) for name in catalog.paths or []]


def catalog_items(catalog: Catalog) -> list[str | None] | None:
    """Each row's In-Shop item id when the images root is an In-Shop root (else None)."""
    root = Path(catalog.meta["images"]) if catalog.meta.get("images") else None
    if root is None or not is_inshop_root(root):
        return None
    try:
        rows = read_partition(root / PARTITION_FILE)
    except (OSError, DataError):
        return None  # the images moved or changed: results simply carry no items
    item_of = {f"Img/{row.image_name}": row.item_id for row in rows}
    return [item_of.get(name) for name in catalog.paths or []]


def check_catalog_model(catalog: Catalog, model: LoadedModel) -> None:
    """IndexMismatch unless the catalog's embeddings were made by this model (its fingerprint)."""
    if catalog.fingerprint != model.fingerprint:
        raise IndexMismatch(f"{catalog.root}: embeddings of another model (fingerprint {catalog.fingerprint}, "
                            f"{catalog.meta.get('model', 'unknown')}; this model {model.fingerprint}, "
                            f"{model.source}); embed the images with this model: python tools/embed.py")


def check_catalog_dim(catalog: Catalog, dim: int) -> None:
    if catalog.dim != dim:
        raise IndexMismatch(f"{catalog.root}: embeddings of dimension {catalog.dim}, this model's have {dim}; "
                            "embed the images with this model: python tools/embed.py")


if __name__ == "__main__":
    sys.exit(run_cli(main))
