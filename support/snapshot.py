"""Snapshots: the one owner of their format. It builds them from a run's state, restores a run
from them, writes and reads the files, checks them, and finds the newest one across ranks.

A snapshot is one `torch.save` file of tensors and plain data (so `weights_only=True` always loads
it), holding a `Snapshot`'s fields and a checksum: the unwrapped model's state dict (a Partial FC
head in the dense layout), optimizer, loss scaler, the position reached, the configuration, the
metrics history, the RNG state and the preprocessing the images had (mean, std, interpolation),
which the tools apply. The Trainer hands its state to `capture` and gets it back from
`restore`; the tools read files through `read_snapshot`, which applies every check the Trainer
does (format, fields, checksum), without importing the Trainer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arcface.model import preprocessing_for
from arcface.partial_fc import gather_dense_state, shard_dense_state
from arcface.transforms import IMAGENET, Preprocessing
from support import runtime
from support.atomicfile import atomic_torch_save
from support.config import PATH_FIELDS, PRETRAINED_NAMES, RESUMABLE, RUN_IDENTITY, Config, to_plain
from support.errors import UserError, first_line
from support.schedule import Schedule

# 2: global_batch required, a checksum over the contents, every field checked on reading.
SNAPSHOT_VERSION = 2
CHECKSUM_KEY = "checksum"


class SnapshotError(UserError, RuntimeError):
    """A snapshot that cannot be used: unreadable, incomplete, damaged or of another format."""


class SnapshotMismatch(SnapshotError):
    """A readable snapshot of another run: another model, class count or data set, or a longer run."""


class SnapshotWriteError(UserError, OSError):
    """A snapshot that could not be written; the previous one is untouched."""


@dataclass
class Progress:
    """Where a run stands: what a resume continues from."""

    epochs_run: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps done in epoch `epochs_run` (a mid-epoch stop)
    history: list[dict[str, Any]] = field(default_factory=list)  # every metrics.jsonl line
    best: dict[str, Any] = field(default_factory=dict)  # {"epoch", "recall@1"} of the best evaluation


@dataclass
class Snapshot:
    """The contents of a snapshot file; its field names are the file's keys."""

    format_version: int
    model: dict[str, torch.Tensor]  # the unwrapped module's state: no `module.` prefixes
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    epochs_run: int
    step_in_epoch: int
    steps_per_epoch: int
    global_batch: int  # images per optimizer step: a step is the same at any world size with it
    num_classes: int
    config: dict[str, Any]  # support.config.to_plain of the run's Config
    history: list[dict[str, Any]]
    best: dict[str, Any]
    rng: dict[str, Any]  # {"torch": CPU generator state, "cuda": one state per CUDA device}
    # arcface.transforms.Preprocessing.as_dict() of the images the run trained and evaluated on.
    # Files written before it was recorded lack it; every run then used ImageNet's (the default).
    preprocessing: dict[str, Any] = field(default_factory=IMAGENET.as_dict)

    @property
    def progress(self) -> Progress:
        return Progress(self.epochs_run, self.step_in_epoch, list(self.history), dict(self.best))


SNAPSHOT_KEYS = tuple(f.name for f in fields(Snapshot))
# Keys a version-2 file may lack (written before they were added); the field's default stands in.
LATER_KEYS = ("preprocessing",)


def position_text(epochs_run: int, step_in_epoch: int) -> str:
    """A position of the run as every message names it: the epoch in progress counts from 1."""
    if step_in_epoch:
        return f"at epoch {epochs_run + 1} step {step_in_epoch}"
    return f"after epoch {epochs_run}"


# ------------------------------------------------------------------------------------------
# A run's state <-> a snapshot


def capture(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            progress: Progress, schedule: Schedule, cfg: Config) -> Snapshot | None:
    """The run's snapshot on global rank 0, None elsewhere. Every rank must call it: a Partial FC
    head is gathered into the dense layout (a collective)."""
    model_state, optimizer_state = gather_dense_state(model, optimizer, dst=0)
    if not runtime.is_main_process():
        return None
    return Snapshot(
        format_version=SNAPSHOT_VERSION, model=model_state, optimizer=optimizer_state,
        scaler=scaler.state_dict(), epochs_run=progress.epochs_run, step_in_epoch=progress.step_in_epoch,
        steps_per_epoch=schedule.steps_per_epoch, global_batch=schedule.global_batch,
        num_classes=model.head.num_classes, config=to_plain(cfg), history=list(progress.history),
        best=dict(progress.best),
        rng={"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        preprocessing=preprocessing_for(cfg.arch).as_dict(),  # what datautils.load_datasets applied
    )


def restore(snapshot: Snapshot, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler) -> Progress:
    """Loads the snapshot's weights, optimizer, scaler and RNG state (a Partial FC head takes its
    shard of the dense layout); returns where the run stands."""
    # Tensors arrive on the CPU and are copied into the model's device by load_state_dict,
    # which avoids holding a second copy of the weights on the accelerator.
    model_state, optimizer_state = shard_dense_state(model, optimizer, snapshot.model, snapshot.optimizer)
    model.load_state_dict(model_state, strict=True)
    optimizer.load_state_dict(optimizer_state)
    scaler.load_state_dict(snapshot.scaler)
    torch.set_rng_state(snapshot.rng["torch"])
    if snapshot.rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snapshot.rng["cuda"])
    return snapshot.progress


# ------------------------------------------------------------------------------------------
# Files


def write_snapshot(snapshot: Snapshot, path: Path) -> None:
    """Writes the snapshot and its checksum atomically; a failed write (a full disk, most often)
    is said in one line, and the previous file stays as it was."""
    contents = {key: getattr(snapshot, key) for key in SNAPSHOT_KEYS}
    contents[CHECKSUM_KEY] = checksum(contents)
    try:
        atomic_torch_save(contents, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error) or _nearly_full(path)
        reason = "the disk holding it is full" if full else first_line(error)
        previous = "the previous snapshot there is intact" if path.exists() else "there was no earlier snapshot"
        raise SnapshotWriteError(f"{path}: the snapshot could not be written ({reason}); {previous}") from error


def read_snapshot(path: str | Path, mmap: bool = False) -> Snapshot:
    """The snapshot at `path`, checked: format version, every field's type and range, checksum.

    weights_only: a snapshot from elsewhere can hold tensors and plain data, never code. `mmap`
    leaves the weights on disk until they are touched (reading the position only).
    """
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file" if not path.exists() else
                            f"{path}: not a file (expected a snapshot written by training)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: say which one
        raise SnapshotError(f"{path}: cannot be read as a snapshot ({_load_failure(e)})") from e
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise SnapshotError(f"{path}: not a snapshot of this project (no 'format_version' key)")
    version = raw["format_version"]
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"{path}: snapshot format {version!r}, but this version of the project reads format "
            f"{SNAPSHOT_VERSION} only; use the version that wrote it (to finish or evaluate that run), "
            f"or start a new run in another --out_dir")
    missing = [key for key in (*SNAPSHOT_KEYS, CHECKSUM_KEY) if key not in raw and key not in LATER_KEYS]
    if missing:
        raise SnapshotError(f"{path}: not a complete snapshot (missing {', '.join(missing)})")
    problem = _field_problem(raw)
    if problem:
        raise SnapshotError(f"{path}: {problem}; the snapshot is damaged")
    if checksum(raw) != raw[CHECKSUM_KEY]:
        raise SnapshotError(f"{path}: its contents do not match the checksum written with them; the "
                            f"file is damaged (resume from another copy, or delete it to start over)")
    return Snapshot(**{key: raw[key] for key in SNAPSHOT_KEYS if key in raw})


def checksum(contents: dict[str, Any]) -> str:
    """SHA-256 over every value but the checksum itself: tensors by dtype, shape and bytes, plain
    data by type and value, in a fixed order. Independent of how torch.save lays out the file."""
    digest = hashlib.sha256()
    for key in sorted(k for k in contents if k != CHECKSUM_KEY):
        digest.update(key.encode())
        _hash_value(digest, contents[key])
    return digest.hexdigest()


def _hash_value(digest: Any, value: Any) -> None:
    if torch.is_tensor(value):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        if flat.numel():
            digest.update(np.asarray(flat.view(torch.uint8)).data)  # no copy: the bytes as they are
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _hash_value(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _hash_value(digest, item)
    else:  # numbers, strings, booleans, None: repr is exact (floats round-trip)
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _field_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with the fields a resume and the tools rely on, or None."""
    def whole(key: str, low: int, high: int | None = None) -> str | None:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            return f"field {key}: expected an integer, got {type(value).__name__}"
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            return f"field {key}: expected an integer {bounds}, got {value}"
        return None

    for key, value_type in (("model", dict), ("optimizer", dict), ("scaler", dict), ("config", dict),
                            ("history", list), ("best", dict), ("rng", dict), (CHECKSUM_KEY, str)):
        if not isinstance(raw[key], value_type):
            return f"field {key}: expected a {value_type.__name__}, got {type(raw[key]).__name__}"
    for key, low, high in (("steps_per_epoch", 1, None), ("epochs_run", 0, None), ("global_batch", 1, None),
                           ("num_classes", 1, None)):
        if problem := whole(key, low, high):
            return problem
    if problem := whole("step_in_epoch", 0, raw["steps_per_epoch"] - 1):
        return problem + " (a step inside the epoch)"
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in raw["model"].items()):
        return "field model: expected a state dict of named tensors"
    if not isinstance(raw["optimizer"].get("state"), dict) or not isinstance(raw["optimizer"].get("param_groups"), list):
        return "field optimizer: expected an optimizer state dict (state, param_groups)"
    if not torch.is_tensor(raw["rng"].get("torch")) or raw["rng"]["torch"].dtype != torch.uint8:
        return "field rng: expected the CPU generator's state as a uint8 tensor"
    epochs = [r.get("epoch") if isinstance(r, dict) else None for r in raw["history"]]
    if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e <= raw["epochs_run"] for e in epochs):
        return f"field history: expected records with an epoch in [0, {raw['epochs_run']}]"
    if epochs != sorted(epochs):
        return "field history: epochs out of order"
    if "preprocessing" in raw:
        try:
            Preprocessing.from_dict(raw["preprocessing"])
        except ValueError as error:
            return f"field {error}"
    return None


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < 16 * 2**20
    except OSError:
        return False


def _load_failure(error: Exception) -> str:
    """Why torch.load failed, in one line. Its advice to retry with weights_only=False is left out:
    a snapshot never needs code to load, so a file that does is not one."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a torch file of tensors and plain data"
    return f"{first_line(error)}; truncated, or not written by torch.save"


# ------------------------------------------------------------------------------------------
# Resuming


def check_resume(snapshot: Snapshot, path: Path, cfg: Config, num_classes: int,
                 schedule: Schedule) -> dict[str, tuple[Any, Any]]:
    """Raises SnapshotMismatch when this run cannot continue `snapshot`; returns the settings it
    changes, {field: (snapshot's value, this run's)}, all of them RESUMABLE, and "global_batch"
    when the images per step change (at an epoch's end only)."""
    changed = config_changes(snapshot.config, cfg)
    diffs = [f"{k}: snapshot {old!r} vs now {new!r}" for k, (old, new) in changed.items() if k in RUN_IDENTITY]
    if snapshot.num_classes != num_classes:
        diffs.append(f"num_classes: snapshot {snapshot.num_classes!r} vs now {num_classes!r}")
    if diffs:
        raise SnapshotMismatch(f"{path} belongs to another run ({', '.join(diffs)}). Start this run in "
                               f"another --out_dir (or --snapshot); the snapshot stays usable by its own run.")
    fixed = [f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items() if k not in RESUMABLE]
    if fixed:
        raise SnapshotMismatch(
            f"{path}: {', '.join(fixed)} cannot change when a run resumes (only {', '.join(RESUMABLE[:4])}, "
            f"paths, workers and speed settings can). Resume with the run's settings "
            f"(--config {Path(cfg.out_dir) / 'config.toml'}), or start a new run in another --out_dir."
        )
    preprocessing = preprocessing_for(cfg.arch).as_dict()
    if Preprocessing.from_dict(snapshot.preprocessing) != Preprocessing.from_dict(preprocessing):
        # Another timm version can give a tag other statistics: the images would change mid-run.
        raise SnapshotMismatch(
            f"{path} trained on images preprocessed with {snapshot.preprocessing}, but {cfg.arch} now gives "
            f"{preprocessing}; resume with the timm version that started the run, or start a new run "
            f"in another --out_dir")
    if snapshot.epochs_run > cfg.total_epochs:
        raise SnapshotMismatch(
            f"{path} has run {snapshot.epochs_run} epochs, more than total_epochs "
            f"{cfg.total_epochs}. Give total_epochs >= {snapshot.epochs_run} to continue it, or "
            f"another --out_dir (or --snapshot) for a new run."
        )
    if snapshot.global_batch != schedule.global_batch:
        if snapshot.step_in_epoch:
            raise SnapshotMismatch(
                f"{path} stopped in the middle of an epoch of steps of {snapshot.global_batch} images, but "
                f"this run's steps have {schedule.global_batch} (batch_size x processes x grad_accum_steps). "
                f"Resume with --global_batch_size {snapshot.global_batch} (any number of processes whose "
                f"batch_size product divides it), or from a snapshot at an epoch's end."
            )
        changed["global_batch"] = (snapshot.global_batch, schedule.global_batch)
    return changed


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, cfg's value)} for every field that differs in meaning. Fields the
    snapshot does not know (added since) are not changes."""
    current = to_plain(cfg)
    changed = {}
    for key, old in saved.items():
        if key not in current:
            continue
        new = current[key]
        same = _same_path(old, new) if key in PATH_FIELDS else old == new
        if not same:
            changed[key] = (old, new)
    return changed


def _same_path(a: Any, b: Any) -> bool:
    """"data/x", "./data/x/" and its absolute path are the same folder ("", "imagenet" and "timm" are
    not paths)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or any(name in (a, b) for name in PRETRAINED_NAMES):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


# ------------------------------------------------------------------------------------------
# Across ranks


def fetch_newest_snapshot(path: Path, device: torch.device) -> Snapshot | None:
    """The newest snapshot any process can see at `path`, on every process (a collective).

    Nodes need not share a file system: each process reports the position of the snapshot on
    its own disk, and the owner of the newest one sends it to the rest over the process group.
    An unusable file stops every rank with its reason instead of leaving the others waiting.
    """
    if runtime.world_size() == 1:
        return read_snapshot(path) if path.exists() else None
    positions = runtime.all_gather_outcomes(lambda: _position(path), SnapshotError)
    seen = [(position, rank) for rank, position in enumerate(positions) if position is not None]
    if not seen:
        return None
    _, source = max(seen, key=lambda item: (tuple(item[0]), -item[1]))
    return runtime.one_rank_decides(lambda: read_snapshot(path), SnapshotError, device, src=source)


def _position(path: Path) -> tuple[int, int] | None:
    """(epochs, step) of the snapshot at `path`, read through mmap so the weights stay on disk."""
    if not path.exists():
        return None
    snapshot = read_snapshot(path, mmap=True)
    return snapshot.epochs_run, snapshot.step_in_epoch
