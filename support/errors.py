"""The one front door for errors of every command (launchers, tools, `python -m arcface.*`).

Bad input and runs the user must act on end in one line, `error: <what, naming the file, key or
rank>`, never a traceback; a traceback is left for bugs. Free of torch, so that a command that
does not need it (the folder conversion) starts at once; the rank and the collective failures
are read from torch.distributed only when the command has imported it.

One line per job: in a job of several processes every rank may fail, most for the same reason
(a bad file each of them reads) or only because a peer stopped (a failed collective). The ranks
on a node share a report folder (`REPORT_DIR_ENV`, set by `support.runtime.spawn`, or torchrun's
per-attempt log folder), and the first rank to report a real error claims the job's line there
and prints it, tagged `[rank N]`; the others stay quiet. A rank whose collective failed waits
`COLLECTIVE_GRACE_S` for a real error to be claimed before it prints its own line. Jobs of several
nodes print at most one line per node. Under torchrun the real error is also written to the
worker's TORCHELASTIC_ERROR_FILE, so that torchrun's own failure report (which it prints after
our line, with a traceback of torchrun itself that no worker can suppress) names it as the root
cause instead of "To enable traceback see ...".
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from arcface.textfile import DataError


class UserError(Exception):
    """Bad input, or a run the user must act on: reported in one line, never with a traceback.

    Configuration errors (exit status 2), unusable snapshots, a run directory in use, data
    errors and divergence derive from it; a traceback is left for bugs.
    """

    exit_status = 1


_Main = TypeVar("_Main", bound=Callable[..., Any])

# Set by support.runtime.spawn for its workers: the folder where the ranks of one job claim its line.
REPORT_DIR_ENV = "ARCFACE_REPORT_DIR"
CLAIM_FILE = "arcface-error.json"  # the job's line, claimed by the first rank with a real error
COLLECTIVE_CLAIM_FILE = "arcface-collective.json"  # a collective failure's line, when no real error came
# How long a rank whose collective failed waits for the peer that stopped to claim its real error
# (it reports right after tearing its process group down: milliseconds, unless the disk is slow).
COLLECTIVE_GRACE_S = 2.0


def one_line_errors(main: _Main | None = None, *, also: tuple[type[BaseException], ...] = ()) -> Any:
    """Wraps a command's main: a UserError, a DataError (a bad input file), a file-system error,
    a failed collective, or one of `also` (a tool's bad argument) ends the process with
    `error: <one line>` (naming the rank when there are several, once per job) and exit status 1
    (2 for configuration errors). Ctrl-C ends it with status 130 and no traceback, and a closed
    output pipe (`... | head`), even one found only when the output is flushed at the end, quietly
    with status 1; other exceptions are bugs and keep their traceback.
    Use as `@one_line_errors` or `@one_line_errors(also=(ValueError,))`.
    """
    def wrap(function: _Main) -> _Main:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                result = function(*args, **kwargs)
            except SystemExit:
                _finish_output()
                raise
            except BrokenPipeError:
                _finish_output()
                _report("", 1, collective=False)  # nothing to say, but the job's other ranks stay quiet
                sys.exit(1)
            except KeyboardInterrupt:
                _finish_output()
                _report(f"{rank_tag()}interrupted", 128 + signal.SIGINT, collective=False)
                sys.exit(128 + signal.SIGINT)
            except (UserError, DataError, OSError, RuntimeError, *also) as error:
                # A peer that stopped can surface as a RuntimeError or as an OSError (a reset connection).
                collective = not isinstance(error, (UserError, DataError)) and collective_failed(error)
                if not isinstance(error, (UserError, DataError, OSError, *also)) and not collective:
                    raise  # a plain RuntimeError is a bug: its traceback is wanted
                status = getattr(error, "exit_status", 1)
                _finish_output()
                _report(f"error: {rank_tag()}{user_message(error)}", status, collective)
                sys.exit(status)
            if _finish_output():
                sys.exit(1)  # the reader left before the output was flushed
            return result
        return run  # type: ignore[return-value]

    return wrap(main) if main is not None else wrap


def _finish_output() -> bool:
    """Flushes stdout and stderr; points one whose reader is gone at /dev/null, else Python's own
    flush at exit would print "Exception ignored ... BrokenPipeError". Whether one was gone."""
    closed = False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            closed = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):  # no file descriptor behind it
                pass
        except (OSError, ValueError, AttributeError):  # closed, or replaced by an object without flush
            pass
    return closed


def _say(line: str) -> None:
    """The line on stderr; a closed stderr (`2>&1 | head`) only silences it."""
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _finish_output()


def rank_and_size() -> tuple[int, int]:
    """This process's global rank and the job's number of processes: from the process group, else
    from the launcher's environment (torchrun and support.runtime.spawn set RANK and WORLD_SIZE),
    which outlives the group: the launchers tear it down before an error reaches the front door."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # not set by a launcher: this process is on its own
        return 0, 1


def rank_tag() -> str:
    """"[rank N] " in a job of several processes, "" otherwise: which process a line comes from."""
    rank, size = rank_and_size()
    return f"[rank {rank}] " if size > 1 else ""


def report_dir() -> Path | None:
    """The folder the ranks of this job on this node share for their error lines; None when this
    process is alone, or when no launcher gave one (then every rank prints its own line)."""
    if rank_and_size()[1] <= 1:
        return None
    given = os.environ.get(REPORT_DIR_ENV)
    if given:
        return Path(given) if os.path.isdir(given) else None
    elastic = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if elastic and elastic != os.devnull:
        # torchrun's layout: <log_dir>/<run_id>/attempt_<restart>/<local_rank>/error.json, one
        # folder per attempt, so a restarted job reports afresh.
        attempt = Path(elastic).parent.parent
        if attempt.name.startswith("attempt_") and attempt.is_dir():
            return attempt
    return None


def _report(line: str, status: int, collective: bool) -> None:
    """Prints the job's line, unless another rank of the job claimed it first (module docstring)."""
    folder = report_dir()
    if folder is None:
        if line:
            _say(line)
        return
    rank = rank_and_size()[0]
    if not collective:
        if line:
            _write_elastic_error_file(line)
        claim_and_say(folder, line, status, rank)
        return
    deadline = time.monotonic() + COLLECTIVE_GRACE_S
    while time.monotonic() < deadline:
        if (folder / CLAIM_FILE).exists():
            return  # the rank that stopped said why
        time.sleep(0.05)
    claim_and_say(folder, line, status, rank, COLLECTIVE_CLAIM_FILE)


def claim_and_say(folder: Path, line: str, status: int, rank: int, name: str = CLAIM_FILE) -> None:
    """Prints `line` (if any) if this is the first claim of `name` in the job's report folder."""
    if _claim(folder / name, {"line": line, "status": status, "rank": rank, "time": time.time()}) and line:
        _say(line)


def _claim(path: Path, record: dict[str, Any]) -> bool:
    """Creates `path` holding `record` unless it exists; whether this call created it. Written
    aside and linked into place: a reader never sees half a record, and only one link can win."""
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".claim-")
    except OSError:
        return True  # the folder is gone or read-only: better a line twice than none
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(record, file)
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        return True
    finally:
        os.unlink(temporary)


def read_claim(folder: Path) -> dict[str, Any] | None:
    """The line a rank of the job claimed in `folder` (a real error before a collective failure)."""
    for name in (CLAIM_FILE, COLLECTIVE_CLAIM_FILE):
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def _write_elastic_error_file(line: str) -> None:
    """Under torchrun, the line in torch's error-file format: its failure report then shows it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    if not path or path == os.devnull or os.path.exists(path):
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file)
    except OSError:
        pass  # the report is torch's extra; the line is printed anyway


def first_line(error: BaseException) -> str:
    """"Type: first line of the message": enough to recognise an error from a library."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# How gloo and NCCL word a peer that stopped answering, when DDP's reducer raises a plain RuntimeError.
_COLLECTIVE_FAILURES = ("third_party/gloo", "NCCL", "Timed out waiting", "Connection closed by peer",
                        "Connection reset by peer")


def collective_failed(error: BaseException) -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(error, getattr(dist, "DistError", ())):
        return True
    return any(marker in str(error) for marker in _COLLECTIVE_FAILURES)


def user_message(error: BaseException) -> str:
    """The error's own line. An error raised in a DataLoader worker arrives with the worker's
    traceback folded into its message; its last line is the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if not isinstance(error, UserError) and collective_failed(error):
        first = text.splitlines()[0] if text else type(error).__name__
        first = re.sub(r"^\[[^\]]*\] ", "", first)  # the backend's source location
        return (f"a collective operation failed ({first}): another process of the job stopped, "
                f"died or is stuck; collective_timeout_s bounds the wait")
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__
