"""Where the job runs: the device, its autocast dtype, the process group, and stop signals.

Shared by the launchers (which decide the device, once), the Trainer and the tools. Global rank 0
does the once-per-job work (snapshots, logs, metrics); LOCAL_RANK only picks the device.
(Named so that it cannot be mistaken for `torch.distributed`.)
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support import errors

_T = TypeVar("_T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The process's index on its own node; launchers set LOCAL_RANK (torchrun does it for us)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return global_rank() == 0


def one_rank_decides(decide: Callable[[], _T], errors: type[BaseException] | tuple[type[BaseException], ...],
                     device: torch.device, src: int = 0) -> _T:
    """`decide()` on rank `src`, its result on every rank (a collective in a process group).

    When it raises one of `errors`, every rank raises that error, instead of the others waiting
    forever for a result that never comes.
    """
    if world_size() == 1:
        return decide()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if global_rank() == src:
        try:
            box[0] = decide()
        except errors as raised:
            failure = raised
            box[0] = _Failure(raised)
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    if failure is not None:
        raise failure
    if isinstance(box[0], _Failure):
        raise box[0].error()
    return box[0]


def all_gather_outcomes(compute: Callable[[], _T], errors: type[BaseException] | tuple[type[BaseException], ...]) -> list[_T]:
    """Every rank's `compute()`, on every rank, in rank order (a collective in a process group).
    When any rank's raises one of `errors`, every rank raises the first such error."""
    try:
        outcome: Any = compute()
    except errors as raised:
        outcome = _Failure(raised)
    outcomes: list[Any] = [outcome]
    if world_size() > 1:
        outcomes = [None] * world_size()
        dist.all_gather_object(outcomes, outcome)
    failed = next((o for o in outcomes if isinstance(o, _Failure)), None)
    if failed is not None:
        raise failed.error()
    return outcomes


class _Failure:
    """An exception as it travels to the other ranks: itself when it pickles, else its text."""

    def __init__(self, error: BaseException) -> None:
        try:
            pickle.loads(pickle.dumps(error))
            self._error: BaseException | None = error
        except Exception:
            self._error = None
        self._text = f"{type(error).__name__}: {error}"

    def error(self) -> BaseException:
        return self._error if self._error is not None else RuntimeError(self._text)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA when supported ("auto"), as requested otherwise; None means full precision."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA, else MPS, else CPU for "auto"; a named device that is not there is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' was requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device: 'mps' was requested but MPS is not available")
    return torch.device(requested)


def backend_for(device: torch.device) -> str:
    """nccl moves CUDA tensors; gloo runs everywhere else (CPU, MPS), so every path is testable on a CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    """A TCP port that is free now: mp.spawn jobs need their own rendezvous port, never a hard-coded one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Preemption asks a job to stop with these (Slurm: USR1 before the time limit, TERM on scancel or
# preemption; torchrun forwards TERM): the Trainer then stops after a snapshot.
# Ctrl-C (SIGINT) asks the same of a person at the terminal; a second Ctrl-C stops at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Records the first stop signal (Slurm sends SIGUSR1 or SIGTERM before the time limit,
    torchrun forwards SIGTERM, a person presses Ctrl-C) so that training stops after the current
    step, with a snapshot, instead of dying. A second Ctrl-C while that stop is pending raises
    KeyboardInterrupt: the person wants out now (errors.one_line_errors ends it with status 130)."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def catch(self) -> None:
        # Python only delivers signals to the main thread; elsewhere (a notebook's worker thread)
        # the process keeps its own handlers.
        if sys.platform != "win32" and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            again = "; Ctrl-C again stops at once, without one" if signum == signal.SIGINT else ""
            print(f"[rank {self.rank}] {signal.Signals(signum).name} received: stopping after the current step "
                  f"with a snapshot{again}", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: loader workers ignore the stop signals.

    Slurm and torchrun signal the whole process group. A worker killed by SIGTERM makes the
    main process raise instead of finishing its step and saving; a forked worker would also run
    the Trainer's handler. Workers still exit when their main process does.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_loader_workers() -> None:
    """At exit multiprocessing sends SIGTERM to its daemonic children (the loader workers) and
    waits for them; workers that ignore it would be waited for forever, e.g. after an error."""
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report a worker crash
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_workers_killed_at_exit = False


def stop_signal_safe_workers() -> Callable[[int], None]:
    """The worker_init_fn for loaders that live through a graceful stop: `ignore_stop_signals`.

    Workers that ignore SIGTERM need their process to kill them at exit, so the first call
    registers `_kill_loader_workers` with multiprocessing's exit function (which runs it before it
    terminates and joins children, at interpreter exit and when an mp.spawn process ends).
    """
    global _workers_killed_at_exit
    if not _workers_killed_at_exit:
        multiprocessing.util.Finalize(None, _kill_loader_workers, exitpriority=100)
        _workers_killed_at_exit = True
    return ignore_stop_signals


# After a worker fails, how long the others get to end by themselves (most fail within
# milliseconds, their collective broken, and report) before they are sent SIGTERM, and then how
# long SIGTERM gets before SIGKILL.
SPAWN_GRACE_S = 10.0


def spawn(main: Callable[..., Any], args: tuple, nprocs: int) -> int:
    """Runs `main(rank, *args)` in `nprocs` processes (mp.spawn) and waits for them: the exit status
    for the launcher (`join_forwarding_signals`).

    Each worker gets RANK, LOCAL_RANK and WORLD_SIZE, as under torchrun (so that an error line can
    name its rank after the process group is gone), and the job's report folder, where the first
    rank to fail claims the job's one `error:` line (support.errors). A worker killed by a signal
    cannot say so itself: the launcher claims the line for it. The status is that of the claimed
    line when there is one (2 for a configuration error), else the first failed worker's.
    """
    _start_quiet_resource_tracker()
    with tempfile.TemporaryDirectory(prefix="arcface-job-") as folder:
        context = mp.spawn(_spawned, args=(main, nprocs, folder, args), nprocs=nprocs, join=False)

        def killed(index: int, exit_code: int) -> None:
            if exit_code < 0:
                name = _signal_name(-exit_code)
                errors.claim_and_say(Path(folder), f"error: [rank {index}] the process was killed by {name}",
                                     128 - exit_code, index)

        status = join_forwarding_signals(context, on_failure=killed)
        claim = errors.read_claim(Path(folder))
        return claim["status"] if status and claim else status


def _start_quiet_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker, which the workers share, told to ignore its own
    warning about leaked semaphores: they are those of a worker killed after an error that has
    been reported (tqdm's lock), and the warning would be the job's last line. The tracker is a
    process of its own: only the -W options it is started with reach it."""
    previous = list(sys.warnoptions)
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = previous


def _spawned(index: int, main: Callable[..., Any], nprocs: int, folder: str, args: tuple) -> None:
    os.environ.update({"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(nprocs),
                       errors.REPORT_DIR_ENV: folder})
    try:
        main(index, *args)
    except SystemExit as stop:  # the worker's own status: 128 + signal after a stop, 1 or 2 after an error
        exit_process(stop.code if isinstance(stop.code, int) else int(stop.code is not None))
    exit_process(0)


def exit_process(code: int = 0) -> None:
    """Ends a spawned worker whose work is done without the interpreter's teardown.

    After the process group is destroyed, gloo's threads can still abort the process while the
    interpreter is torn down ("terminate called without an active exception", SIGABRT; about one
    spawned process in a few hundred on torch 2.14; pytorch/pytorch#179291), turning a finished
    job into a failed one. Multiprocessing's own exit work still runs first (it kills the loader
    workers), and the output is flushed.
    """
    multiprocessing.util._exit_function()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def join_forwarding_signals(context: mp.ProcessContext, grace_s: float = SPAWN_GRACE_S,
                            on_failure: Callable[[int, int], None] | None = None) -> int:
    """Waits for mp.spawn(..., join=False) workers; returns the exit status for the launcher.

    SIGTERM and SIGUSR1 sent to the launcher are passed on to every worker, whose Trainer then
    stops after a snapshot. Left alone, the launcher would die and its workers would get SIGINT
    (mp.spawn's parent-death signal) and stop without one. A worker's exit status, such as
    128 + signal after a graceful stop, becomes the launcher's. Ctrl-C is not passed on: the
    terminal sends it to every process of the job already, and a second copy would read as a
    second Ctrl-C (stop at once).

    When a worker fails, `on_failure(rank, exit code)` runs (a negative code: killed by that
    signal) and the others get `grace_s` to end by themselves, then SIGTERM, then SIGKILL; quietly,
    unlike mp.spawn's own join, whose "Terminating process ..." warning would follow the error
    line. A worker's traceback (a bug) is printed, as mp.spawn's join would raise it.
    """
    def forward(signum: int, frame: object) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    def wait_for_workers(signum: int, frame: object) -> None:
        pass

    previous = {sig: signal.signal(sig, wait_for_workers if sig == signal.SIGINT else forward) for sig in STOP_SIGNALS}
    try:
        failed = _first_failure(context)
        if failed is not None:
            if on_failure is not None:
                on_failure(*failed)
            _stop_workers(context, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is None:
        return 0
    _print_worker_traceback(context, failed[0])
    exit_code = failed[1]
    return exit_code if exit_code > 0 else 128 - exit_code  # -N: killed by signal N


def _first_failure(context: mp.ProcessContext) -> tuple[int, int] | None:
    """(rank, exit code) of the first worker to end with a non-zero status; None when all succeed."""
    pending = {process.sentinel: index for index, process in enumerate(context.processes)}
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            index = pending.pop(sentinel)
            process = context.processes[index]
            process.join()
            if process.exitcode != 0:
                return index, process.exitcode
    return None


def _stop_workers(context: mp.ProcessContext, grace_s: float) -> None:
    for stop in (None, "terminate", "kill"):
        if stop is not None:
            for process in context.processes:
                if process.is_alive():
                    getattr(process, stop)()
        deadline = time.monotonic() + grace_s
        for process in context.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        if not any(process.is_alive() for process in context.processes):
            return


def _print_worker_traceback(context: mp.ProcessContext, first: int) -> None:
    """mp.spawn's wrapper saves the traceback of a worker's uncaught exception (a bug, since the
    front door reports the rest) in a file: the first failed worker's, else any other's."""
    for index in [first, *range(len(context.processes))]:
        try:
            with open(context.error_files[index], "rb") as file:
                trace = pickle.load(file)
        except (OSError, EOFError, pickle.UnpicklingError):
            continue
        print(f"-- process {index} (rank {index}) ended with this error:\n{trace}", file=sys.stderr, end="", flush=True)
        return


def restart_safe_store() -> dist.Store | None:
    """Under torchrun, a store namespaced per restart attempt; None elsewhere.

    torchrun's c10d rendezvous hands every worker generation the same agent-hosted TCPStore.
    Gloo's address keys in it are never deleted, so a restarted worker can read the address of a
    dead peer and fail or hang while connecting (pytorch/pytorch#135712). Prefixing the keys with
    the restart count gives each attempt a clean namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(minutes=5),
        use_libuv=True,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"attempt_{attempt}", store)


def apply_slurm_env() -> None:
    """srun-only launch (one task per device, no torchrun): take rank and world size from Slurm."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    from support.slurm_env import torch_env_from_slurm

    os.environ.update(torch_env_from_slurm(os.environ))
