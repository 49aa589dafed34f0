"""Hostile conditions at the front door: a job of several processes ends with one `error:` line
(the first failing rank's, tagged), a reader that closes the pipe early, Ctrl-C.

The spawn cases run toy workers through support.runtime.spawn, as multigpu.py does, so that they
take seconds; tests/test_launchers.py runs the real launchers on bad data.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arcface.textfile import DataError
from support import errors, runtime
from support.config import ConfigError
from support.errors import one_line_errors

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""}


# ---- one line per job ----

@one_line_errors
def _every_rank_reads_the_same_bad_file(rank: int) -> None:
    raise DataError("data/part.txt:5: expected 3 columns, got 2")


@one_line_errors
def _one_rank_fails_after_the_other_lost_it(rank: int) -> None:
    if rank == 0:  # its collective breaks first, as when the peer tears its process group down
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    time.sleep(0.5)
    raise ConfigError("partial_fc: expected a value in (0, 1], got 2")


@one_line_errors
def _one_rank_is_killed(rank: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


def error_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines() if "error:" in line]


@pytest.mark.parametrize("main, status, expected", [
    (_one_rank_fails_after_the_other_lost_it, 2, r"error: \[rank 1\] partial_fc: expected a value in \(0, 1\], got 2"),
    (_one_rank_is_killed, 128 + signal.SIGKILL, r"error: \[rank 1\] the process was killed by SIGKILL"),
])
def test_a_spawned_job_ends_with_the_first_real_error_once_tagged_with_its_rank(capfd, main, status, expected):
    assert runtime.spawn(main, args=(), nprocs=2) == status
    err = capfd.readouterr().err
    assert len(error_lines(err)) == 1 and re.fullmatch(expected, error_lines(err)[0]), err
    assert "Terminating process" not in err and "leaked semaphore" not in err and "Traceback" not in err, err


def test_identical_errors_of_torchrun_ranks_print_once_and_torchruns_report_names_them(tmp_path, monkeypatch, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    attempt = tmp_path / "run" / "attempt_0"
    files = [attempt / str(rank) / "error.json" for rank in range(2)]
    for file in files:
        file.parent.mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 1 fails first; rank 0 the same way after it
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[rank]))
        with pytest.raises(SystemExit):
            _every_rank_reads_the_same_bad_file(rank)
    assert capsys.readouterr().err.splitlines() == ["error: [rank 1] data/part.txt:5: expected 3 columns, got 2"]
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(files[1]))
    assert failure.message["extraInfo"]["py_callstack"] == "error: [rank 1] data/part.txt:5: expected 3 columns, got 2"
    assert json.loads((attempt / errors.CLAIM_FILE).read_text())["rank"] == 1


def test_a_collective_failure_is_reported_when_no_peer_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(errors.REPORT_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(errors, "COLLECTIVE_GRACE_S", 0.1)
    with pytest.raises(SystemExit) as exited:
        _one_rank_is_killed(0)
    assert exited.value.code == 1
    assert capsys.readouterr().err.startswith("error: [rank 0] a collective operation failed (Connection closed by peer)")
