"""The run directory (`out_dir`): one owner at a time, its config.toml and metrics.jsonl.

Global rank 0 owns it for the whole run through an exclusive `flock` on `<out_dir>/.lock`. The
kernel drops that lock when the process ends, however it ends, so a run killed by SIGKILL or a
lost node never blocks the next one, while a second run started on a directory in use is refused
at once instead of interleaving its lines with the first one's.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from runtime import UserError
from snapshot import atomic_write_text

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
RESUMES_FILE = "resumes.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunDirBusy(UserError, RuntimeError):
    """Another live process owns the run directory."""


class RunDir:
    def __init__(self, path: str | os.PathLike, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.metrics_path = self.path / METRICS_FILE
        self.tensorboard = tensorboard
        self._lock: TextIO | None = None
        self._events: Any = None  # a SummaryWriter, opened by start()

    # ------------------------------------------------------------------------------------
    # Ownership

    def acquire(self) -> None:
        """Takes the directory or raises RunDirBusy naming the process that holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.path / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "a process that has not written its name yet"
            lock.close()
            raise RunDirBusy(f"{self.path} is the run directory of a run still in progress ({owner}). "
                             f"Wait for it to end, stop it, or choose another --out_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    # ------------------------------------------------------------------------------------
    # Files

    def remove_stale_temporaries(self, *targets: Path) -> list[Path]:
        """Temporary files of `targets` left by writes that were killed before their rename.

        Only the owner calls this, so no write of its own run is in flight.
        """
        removed = []
        for target in targets:
            patterns = (f".{target.stem}.*.tmp{target.suffix}",  # atomic_output's names
                        f".{target.name}.*.tmp")  # older versions' names
            for pattern in patterns:
                for stale in target.parent.glob(pattern):
                    stale.unlink(missing_ok=True)
                    removed.append(stale)
        return removed

    def start(self, config_text: str, history: list[dict[str, Any]]) -> None:
        """config.toml of this run, and metrics.jsonl made to agree with the snapshot it resumes."""
        atomic_write_text(self.path / CONFIG_FILE, config_text)
        # Lines logged after the snapshot was taken belong to work that is about to be redone.
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: config checked it is there

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

    def record_resume(self, record: dict[str, Any]) -> None:
        """resumes.jsonl: which settings a resume changed, so config.toml's history is not lost."""
        with open(self.path / RESUMES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def claim_run_dir(run_dir: RunDir, device: torch.device) -> None:
    """Global rank 0 takes the run directory; when it cannot, every rank stops with its reason
    (a collective when there are several processes)."""
    distributed = dist.is_available() and dist.is_initialized()
    reason = None
    if not distributed or dist.get_rank() == 0:
        try:
            run_dir.acquire()
        except RunDirBusy as busy:
            reason = str(busy)
    if distributed and dist.get_world_size() > 1:
        box = [reason]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        reason = box[0]
    if reason:
        raise RunDirBusy(reason)


def format_record(record: dict[str, Any], total_epochs: int) -> str:
    """A metrics.jsonl record as the console line that the run prints with it."""
    if "loss" in record:
        return (f"epoch {record['epoch']}/{total_epochs} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                f"{record['images_per_s']:.0f} img/s | {record['seconds']:.1f} s")
    metrics = " | ".join(f"{k} {v:.2f}" for k, v in record.items() if "@" in k)
    return f"eval  {record['epoch']}/{total_epochs} | {metrics} | {record['seconds']:.1f} s"
