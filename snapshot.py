"""Snapshots: their format, the checks a resume makes, atomic writes, and the cross-rank fetch.

A snapshot is one `torch.save` file of tensors and plain data (so `weights_only=True` always loads
it): the unwrapped model's state dict, optimizer, loss scaler, the position reached, the
configuration, the metrics history and the RNG state. The Trainer writes it (global rank 0) and
reads it back on resume; the tools read it without importing the Trainer.

Every file the project writes goes through `atomic_output`: a temporary file next to the target,
flushed to disk, then moved into place with `os.replace`, so a crash leaves the old file or the
new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from arcface.partial_fc import PartialFCHead
from config import Config
from runtime import UserError

SNAPSHOT_VERSION = 1
SNAPSHOT_KEYS = ("format_version", "model", "optimizer", "scaler", "epochs_run", "step_in_epoch",
                 "steps_per_epoch", "num_classes", "config", "history", "best", "rng")
# Config fields that decide what a run is: a snapshot made with other values belongs to another run.
RUN_IDENTITY = ("arch", "pooling", "embedding_dim", "sub_centers", "data_root",
                "synthetic_items", "synthetic_views", "synthetic_size", "synthetic_seed")
# What a resumed run may change: how long it runs, how often it saves, evaluates and logs, where
# its files are, and how fast it computes. Every other field shapes the training itself, so a
# change would make config.toml describe a run that never happened.
RESUMABLE = ("total_epochs", "save_every", "eval_every", "log_every", "out_dir", "snapshot",
             "synthetic_dir", "num_workers", "eval_batch_size", "device", "amp", "channels_last",
             "compile", "recall_at", "map_at", "ap_mode", "max_image_pixels", "collective_timeout_s", "tensorboard",
             # How a step's batch is split (the global batch is checked on its own, below).
             "batch_size", "grad_accum_steps", "global_batch_size")
# Fields holding paths: compared by the file they name, not by how it is spelled.
PATH_FIELDS = ("data_root", "margin_file", "pretrained", "out_dir", "snapshot", "synthetic_dir")


class SnapshotError(UserError, RuntimeError):
    """A snapshot that cannot be used: unreadable, incomplete, damaged or of another format."""


class SnapshotMismatch(SnapshotError):
    """A readable snapshot of another run: another model, class count or data set, or a longer run."""


def position_text(epochs_run: int, step_in_epoch: int) -> str:
    """A position of the run as every message names it: the epoch in progress counts from 1."""
    if step_in_epoch:
        return f"at epoch {epochs_run + 1} step {step_in_epoch}"
    return f"after epoch {epochs_run}"


# ------------------------------------------------------------------------------------------
# Atomic files


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` (same suffix) for the block to write; on success it is
    flushed to disk and moved onto `path`, on failure removed. Readers see the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as written:  # the rename must not reach the disk before the data
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_snapshot(snapshot: dict[str, Any], path: Path) -> None:
    """atomic_torch_save, with a failed write (a full disk, most often) said in one line."""
    try:
        atomic_torch_save(snapshot, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error) or _nearly_full(path)
        reason = "the disk holding it is full" if full else _first_line_of(error)
        previous = "the previous snapshot there is intact" if path.exists() else "there was no earlier snapshot"
        raise SnapshotWriteError(f"{path}: the snapshot could not be written ({reason}); {previous}") from error


class SnapshotWriteError(UserError, OSError):
    """A snapshot that could not be written; the previous one is untouched."""


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < 16 * 2**20
    except OSError:
        return False


def _first_line_of(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ------------------------------------------------------------------------------------------
# The dense layout of a sharded head


def dense_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's state dicts as a snapshot keeps them.

    A Partial FC head (and its momentum) is gathered into the dense ArcFace layout on rank 0, so
    that every tool and any world size reads the snapshot: a collective then, on every rank.
    """
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    head = getattr(model, "head", None)
    if isinstance(head, PartialFCHead):
        weight = head.gather_dense(head.weight, dst=0)
        momentum = head.gather_optimizer_state(optimizer, dst=0)
        if head.rank == 0:
            model_state["head.weight"] = weight
            if momentum:
                optimizer_state["state"][_param_index(optimizer, head.weight)] = momentum
    return model_state, optimizer_state


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                  optimizer_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A snapshot's dense head (and momentum) cut to this process's Partial FC shard."""
    head = model.head
    model_state = {**model_state, "head.weight": head.local_rows(model_state["head.weight"])}
    index = _param_index(optimizer, head.weight)
    saved = optimizer_state["state"].get(index)
    if saved:
        rows = head.num_classes * head.sub_centers
        local = {k: head.local_rows(v) if torch.is_tensor(v) and v.ndim == 2 and v.shape[0] == rows else v
                 for k, v in saved.items()}
        optimizer_state = {**optimizer_state, "state": {**optimizer_state["state"], index: local}}
    return model_state, optimizer_state


def _param_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """`param`'s key in optimizer.state_dict()["state"]."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)


# ------------------------------------------------------------------------------------------
# Reading and checking


def load_snapshot(path: Path) -> dict[str, Any]:
    """weights_only: a snapshot from elsewhere can hold tensors and plain data, never code."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise SnapshotError(f"{path}: cannot be read as a snapshot ({_first_line(e)})") from e
    if not isinstance(snapshot, dict) or "format_version" not in snapshot:
        raise SnapshotError(f"{path}: not a snapshot of this project (no 'format_version' key)")
    missing = [key for key in SNAPSHOT_KEYS if key not in snapshot]
    if missing:
        raise SnapshotError(f"{path}: not a complete snapshot (missing {', '.join(missing)})")
    return snapshot


def snapshot_position(path: Path) -> tuple[int, int] | None:
    """(epochs, step) of the snapshot at `path`, read through mmap so the weights stay on disk."""
    if not path.exists():
        return None
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(snapshot["epochs_run"]), int(snapshot["step_in_epoch"])
    except Exception as e:
        raise SnapshotError(f"{path}: cannot be read as a snapshot ({_first_line(e)})") from e


def check_snapshot(snapshot: dict[str, Any], path: Path, cfg: Config, num_classes: int,
                   steps_per_epoch: int, global_batch: int) -> dict[str, tuple[Any, Any]]:
    """Raises SnapshotError / SnapshotMismatch when this run cannot continue `snapshot`; returns
    the settings it changes, {field: (snapshot's value, this run's)}, all of them RESUMABLE, and
    "global_batch" when the images per step change (at an epoch's end only)."""
    if snapshot.get("format_version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"{path}: snapshot format {snapshot.get('format_version')!r}, "
                            f"expected {SNAPSHOT_VERSION}")
    changed = config_changes(snapshot["config"], cfg)
    diffs = [f"{k}: snapshot {old!r} vs now {new!r}" for k, (old, new) in changed.items() if k in RUN_IDENTITY]
    if snapshot["num_classes"] != num_classes:
        diffs.append(f"num_classes: snapshot {snapshot['num_classes']!r} vs now {num_classes!r}")
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
    if snapshot["epochs_run"] > cfg.total_epochs:
        raise SnapshotMismatch(
            f"{path} has run {snapshot['epochs_run']} epochs, more than total_epochs "
            f"{cfg.total_epochs}. Give total_epochs >= {snapshot['epochs_run']} to continue it, or "
            f"another --out_dir (or --snapshot) for a new run."
        )
    if snapshot["step_in_epoch"] >= snapshot["steps_per_epoch"]:
        raise SnapshotError(f"{path}: step {snapshot['step_in_epoch']} is not inside an epoch of "
                            f"{snapshot['steps_per_epoch']} steps; the snapshot is damaged")
    saved_batch = snapshot.get("global_batch")  # absent from snapshots of older versions
    if saved_batch is not None and saved_batch != global_batch:
        if snapshot["step_in_epoch"]:
            raise SnapshotMismatch(
                f"{path} stopped in the middle of an epoch of steps of {saved_batch} images, but this "
                f"run's steps have {global_batch} (batch_size x processes x grad_accum_steps). Resume "
                f"with --global_batch_size {saved_batch} (any number of processes whose batch_size "
                f"product divides it), or from a snapshot at an epoch's end."
            )
        changed["global_batch"] = (saved_batch, global_batch)
    elif snapshot["step_in_epoch"] and snapshot["steps_per_epoch"] != steps_per_epoch:
        raise SnapshotMismatch(
            f"{path} stopped in the middle of an epoch of {snapshot['steps_per_epoch']} steps, but "
            f"this run has {steps_per_epoch} steps per epoch (another batch size or world size). "
            f"Resume with the settings it was started with."
        )
    return changed


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, cfg's value)} for every field that differs in meaning. Fields the
    snapshot does not know (added since) are not changes."""
    current = asdict(cfg)
    changed = {}
    for key, value in saved.items():
        if key not in current:
            continue
        old, new = value, list(current[key]) if isinstance(current[key], tuple) else current[key]
        if key in PATH_FIELDS:
            same = _same_path(old, new)
        else:
            same = old == new
        if not same:
            changed[key] = (old, new)
    return changed


def _same_path(a: Any, b: Any) -> bool:
    """"data/x", "./data/x/" and its absolute path are the same folder ("" and "imagenet" are not paths)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or "" in (a, b) or "imagenet" in (a, b):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _first_line(error: Exception) -> str:
    """Why torch.load failed, in one line. Its advice to retry with weights_only=False is left out:
    a snapshot never needs code to load, so a file that does is not one."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a torch file of tensors and plain data"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}; truncated, or not written by torch.save"


# ------------------------------------------------------------------------------------------
# Across ranks


def fetch_newest_snapshot(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The newest snapshot any process can see at `path`, on every process (a collective).

    Nodes need not share a file system: each process reports the position of the snapshot on
    its own disk, and the owner of the newest one sends it to the rest over the process group.
    An unusable file stops every rank with its reason instead of leaving the others waiting.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load_snapshot(path) if path.exists() else None
    positions: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(positions, _or_reason(snapshot_position, path))
    _raise_any_reason(positions)
    seen = [(position, rank) for rank, position in enumerate(positions) if position is not None]
    if not seen:
        return None
    _, source = max(seen, key=lambda item: (tuple(item[0]), -item[1]))
    box = [_or_reason(load_snapshot, path) if dist.get_rank() == source else None]
    dist.broadcast_object_list(box, src=source, device=device if device.type == "cuda" else None)
    _raise_any_reason(box)
    return box[0]


def _or_reason(read: Callable[[Path], Any], path: Path) -> Any:
    """read(path), or the message of the SnapshotError it raised: it travels through the collective
    in place of the result."""
    try:
        return read(path)
    except SnapshotError as unusable:
        return str(unusable)


def _raise_any_reason(results: list[Any]) -> None:
    reasons = [r for r in results if isinstance(r, str)]
    if reasons:
        raise SnapshotError(reasons[0])
