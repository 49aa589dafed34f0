"""Atomic files: a reader sees the old file or the new one, never half of one.

Every file the project writes in place (snapshots, config.toml, metrics.jsonl rewritten on resume,
tool outputs, benchmark reports) goes through `atomic_output`: a temporary file next to the target,
flushed to disk, then moved into place with `os.replace` (as timm's checkpoint saver does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def temporary_name(path: Path, pid: int | None = None) -> Path:
    """Where process `pid` (default: this one) writes `path` before the rename."""
    return path.with_name(f".{path.stem}.{os.getpid() if pid is None else pid}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` (same suffix) for the block to write; on success it is
    flushed to disk and moved onto `path`, on failure removed. Readers see the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
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


def stale_temporaries(target: Path) -> list[Path]:
    """Temporary files of `target` left by writes that died before their rename.

    A temporary of a process that is still alive on this machine is never stale: another run may
    be writing it right now (its owner then also holds the target's lock, and is refused).
    """
    stale = []
    for candidate in target.parent.glob(f".{target.stem}.*.tmp{target.suffix}"):
        pid = candidate.name[len(target.stem) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        stale.append(candidate)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
