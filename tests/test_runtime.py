"""runtime: one-line errors, signal forwarding to mp.spawn workers."""

import os
import signal
import sys
import threading
import time

import pytest
import torch.multiprocessing as mp

from support import runtime
from support.errors import one_line_errors
from support.config import ConfigError


def test_one_line_errors_print_one_line_and_exit_with_the_errors_status(capsys):
    @one_line_errors
    def fails(error):
        raise error

    cases = [(ConfigError("lr: expected a value > 0, got 0"), 2, "error: lr: expected a value > 0, got 0"),
             (FileNotFoundError("data/x.jpg: no such file"), 1, "error: data/x.jpg: no such file"),
             (RuntimeError("[/w/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                           "5000ms for recv operation to complete"), 1,
              "error: a collective operation failed (Timed out waiting 5000ms for recv operation to complete): "
              "another process of the job stopped, died or is stuck; collective_timeout_s bounds the wait"),
             (OSError("Caught ImageFileError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                      "call last):\n  File \"x.py\", line 1\narcface.transforms.ImageFileError: a.jpg: cannot "
                      "decode this image"), 1, "error: a.jpg: cannot decode this image")]
    for error, status, line in cases:
        with pytest.raises(SystemExit) as exited:
            fails(error)
        assert exited.value.code == status
        assert capsys.readouterr().err.splitlines() == [line]


def test_a_bug_keeps_its_traceback():
    @one_line_errors
    def buggy():
        raise RuntimeError("shape mismatch in my new layer")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        buggy()


def _wait_for_sigterm(rank: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(1))  # mp.spawn's parent-death signal
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)


def test_sigterm_to_the_launcher_reaches_every_spawned_worker():
    context = mp.spawn(_wait_for_sigterm, nprocs=2, join=False)
    time.sleep(3)  # the workers install their handlers
    previous = signal.getsignal(signal.SIGTERM)
    # The signal arrives while the launcher waits in join_forwarding_signals, as from Slurm or kill.
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    status = runtime.join_forwarding_signals(context)
    assert status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous  # the launcher's handlers are put back
