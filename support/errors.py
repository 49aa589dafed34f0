"""The one front door for errors of every command (launchers, tools, `python -m arcface.*`).

Bad input and runs the user must act on end in one line, `error: <what, naming the file, key or
rank>`, never a traceback; a traceback is left for bugs. Free of torch, so that a command that
does not need it (the folder conversion) starts at once; the rank and the collective failures
are read from torch.distributed only when the command has imported it.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from arcface.textfile import DataError


class UserError(Exception):
    """Bad input, or a run the user must act on: reported in one line, never with a traceback.

    Configuration errors (exit status 2), unusable snapshots, a run directory in use, data
    errors and divergence derive from it; a traceback is left for bugs.
    """

    exit_status = 1


_Main = TypeVar("_Main", bound=Callable[..., Any])


def one_line_errors(main: _Main | None = None, *, also: tuple[type[BaseException], ...] = ()) -> Any:
    """Wraps a command's main: a UserError, a DataError (a bad input file), a file-system error,
    a failed collective, or one of `also` (a tool's bad argument) ends the process with
    `error: <one line>` (naming the rank when there are several) and exit status 1 (2 for
    configuration errors). Ctrl-C ends it with status 130 and no traceback, and a closed output
    pipe (`... | head`) quietly; other exceptions are bugs and keep their traceback.
    Use as `@one_line_errors` or `@one_line_errors(also=(ValueError,))`.
    """
    def wrap(function: _Main) -> _Main:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except BrokenPipeError:
                _silence_stdout()  # the reader is gone: Python would complain again when flushing at exit
                sys.exit(1)
            except KeyboardInterrupt:
                print(f"{rank_tag()}interrupted", file=sys.stderr, flush=True)
                sys.exit(128 + signal.SIGINT)
            except (UserError, DataError, OSError, RuntimeError, *also) as error:
                if (isinstance(error, RuntimeError) and not isinstance(error, (UserError, DataError, OSError, *also))
                        and not collective_failed(error)):
                    raise  # a plain RuntimeError is a bug: its traceback is wanted
                print(f"error: {rank_tag()}{user_message(error)}", file=sys.stderr, flush=True)
                sys.exit(getattr(error, "exit_status", 1))
        return run  # type: ignore[return-value]

    return wrap(main) if main is not None else wrap


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout: nothing will be flushed
        pass


def rank_tag() -> str:
    """"[rank N] " in a job of several processes, "" otherwise: which process a line comes from."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ""
    return f"[rank {dist.get_rank()}] "


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
