"""The run directory (`out_dir`): one owner at a time, its config.toml and metrics.jsonl.

Global rank 0 owns it for the whole run through an exclusive `flock` on `<out_dir>/.lock`, and
owns the run's snapshot file the same way (`.<name>.lock` beside it: a snapshot may live outside
the run directory, and two runs writing one file would each lose the other's training). The
kernel drops a lock when the process ends, however it ends, so a run killed by SIGKILL or a lost
node never blocks the next one, while a second run started on a directory or snapshot in use is
refused at once, naming the owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

import torch

from support import runtime
from support.atomicfile import atomic_write_text, stale_temporaries
from support.errors import UserError

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
RESUMES_FILE = "resumes.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunDirBusy(UserError, RuntimeError):
    """Another live process owns the run directory or its snapshot file."""


class OwnerLock:
    """An exclusive flock on `path` that names its holder in the file; dropped when the process ends."""

    def __init__(self, path: Path, what: str, busy: Callable[[str], Exception] | None = None) -> None:
        """`what` says what the lock guards ("runs/a is the run directory"); `busy(owner)` makes the
        error raised when another process holds it (default: RunDirBusy naming `what` and owner)."""
        self.path, self.what = path, what
        self.busy = busy or (lambda owner: RunDirBusy(
            f"{what} of a run still in progress ({owner}). Wait for it to end, stop it, or choose "
            f"another --out_dir"))
        self._file: TextIO | None = None

    def acquire(self) -> None:
        """Takes the lock or raises `busy(owner)`, naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "a process that has not written its name yet"
            lock.close()
            raise self.busy(owner) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


class RunDir:
    def __init__(self, path: str | os.PathLike, snapshot_path: Path | None = None, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / METRICS_FILE
        self.snapshot_path = snapshot_path or self.path / "snapshot.pt"
        self.tensorboard = tensorboard
        self._locks = [
            OwnerLock(self.path / LOCK_FILE, f"{self.path} is the run directory"),
            OwnerLock(self.snapshot_path.with_name(f".{self.snapshot_path.name}.lock"),
                      f"{self.snapshot_path} is the snapshot file"),
        ]
        self._events: Any = None  # a SummaryWriter, opened by start()

    # ------------------------------------------------------------------------------------
    # Ownership

    def acquire(self) -> None:
        """Takes the directory and the snapshot file, or raises RunDirBusy naming their owner."""
        try:
            for lock in self._locks:
                lock.acquire()
        except RunDirBusy:
            self.release()
            raise

    def release(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        for lock in self._locks:
            lock.release()

    # ------------------------------------------------------------------------------------
    # Files

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary files of the run's files (snapshot, config.toml, metrics.jsonl) left by writes
        that were killed before their rename; never one that a live process is writing."""
        removed = []
        for target in (self.snapshot_path, self.path / CONFIG_FILE, self.metrics_path):
            for stale in stale_temporaries(target):
                stale.unlink(missing_ok=True)
                removed.append(stale)
        return removed

    def start(self, config_text: str, history: list[dict[str, Any]]) -> None:
        """config.toml of this run, and metrics.jsonl made to agree with the snapshot it resumes."""
        atomic_write_text(self.path / CONFIG_FILE, config_text)
        # Lines logged after the snapshot was taken belong to work that is about to be redone.
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        if self.tensorboard:
            from torch.utils.tensorboard import (
                SummaryWriter,  # optional: config checked it is there
            )

            # purge_step hides events of epochs that are about to be redone, as in metrics.jsonl.
            done = max((r["epoch"] for r in history), default=0)
            self._events = SummaryWriter(str(self.path / TENSORBOARD_DIR), purge_step=done + 1)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")  # one write per line: no partial line on a crash
        if self._events is not None:
            group = "train" if "loss" in record else "eval"
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._events.add_scalar(f"{group}/{key}", value, record["epoch"])
            self._events.flush()

    def record_resume(self, epochs_run: int, step_in_epoch: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """resumes.jsonl: which settings a resume changed, so config.toml's history is not lost."""
        record = {"epochs_run": epochs_run, "step_in_epoch": step_in_epoch,
                  "changed": {key: list(values) for key, values in changes.items()}}
        with open(self.path / RESUMES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def claim_run_dir(run_dir: RunDir, device: torch.device) -> None:
    """Global rank 0 takes the run directory; when it cannot, every rank stops with its reason."""
    runtime.one_rank_decides(run_dir.acquire, RunDirBusy, device)


def format_record(record: dict[str, Any], total_epochs: int) -> str:
    """A metrics.jsonl record as the console line that the run prints with it."""
    if "loss" in record:
        return (f"epoch {record['epoch']}/{total_epochs} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                f"{record['images_per_s']:.0f} img/s | {record['seconds']:.1f} s")
    metrics = " | ".join(f"{k} {v:.2f}" for k, v in record.items() if "@" in k)
    return f"eval  {record['epoch']}/{total_epochs} | {metrics} | {record['seconds']:.1f} s"
